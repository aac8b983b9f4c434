"""The README's Python snippet runs as written on the embedded model and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippet_runs_as_written(one_torch_thread):
    section = README.read_text().split("## Use it from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert lines[1].startswith("Selection(layer=2, batch=1, kept 288 of 576 image tokens")
    assert lines[2] == "torch.Size([1, 288])"
    assert lines[3] == "[288, 144, 72]"
