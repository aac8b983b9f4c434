"""The guide's suite script says which model and data it will use, FASTV_EMBEDDED included.

`PYTHON=true` stands in for the interpreter, so the script prints its banner and runs nothing.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO_ROOT
from fastv_advanced import embedded

SUITE = REPO_ROOT / "src" / "HiMAP" / "inference" / "eval_scivqa_fastv_advanced.sh"
GUIDE_MODEL = "liuhaotian/llava-v1.5-7b"
GUIDE_QUESTIONS = "/root/nfs/code/HiMAP/data/scienceqa/himap-inference-MCQ.json"


def banner(tmp_path, value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTV_EMBEDDED", "MODEL_PATH", "QUESTION_FILE")}
    env.update(PYTHON="true", COMPARE="0", GPU="")
    if value is not None:
        env["FASTV_EMBEDDED"] = value
    done = subprocess.run(["bash", str(SUITE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("== step 1/2")[0]


@pytest.mark.parametrize("value", ["1", " On ", "yes", "TRUE"])
def test_banner_shows_the_embedded_paths_the_sweep_will_use(tmp_path, value):
    assert embedded.embedded_enabled({"FASTV_EMBEDDED": value})
    text = banner(tmp_path, value)
    for path in (embedded.MODEL_PATH, embedded.QUESTION_FILE, embedded.IMAGE_FOLDER):
        assert str(path) in text
    assert "FASTV_EMBEDDED is on" in text and GUIDE_MODEL not in text and GUIDE_QUESTIONS not in text


@pytest.mark.parametrize("value", [None, "", "0", " off ", "No", "false"])
def test_banner_shows_the_guide_paths_when_the_embedded_files_are_off(tmp_path, value):
    assert not embedded.embedded_enabled({} if value is None else {"FASTV_EMBEDDED": value})
    text = banner(tmp_path, value)
    assert f"model {GUIDE_MODEL}\n" in text and f"questions {GUIDE_QUESTIONS};" in text
    assert str(embedded.MODEL_PATH) not in text
