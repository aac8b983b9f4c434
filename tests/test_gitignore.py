"""What the guide's commands leave in a checkout is ignored by git; the project's own files are not."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

IGNORED = [
    "scienceqa_results_baseline.json",  # the guide's commands, run from the repository root
    "scienceqa_results_fastv_max_head.jsonl",
    ".scienceqa_results_fastv_max_head.jsonl.tmp.12345",  # run_files' atomic-write temporary of a killed run
    "runs/quick/.scienceqa_results_baseline.json.tmp.7",
    "data/converted.json.tmp",
]
TRACKED = ["tests/data/compare/scienceqa_results_baseline.json", "data/scienceqa/himap-inference-MCQ.json"]


def ignored(paths: list[str]) -> set[str]:
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=30)
    return set(done.stdout.split())


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs a git checkout")
def test_outputs_of_the_guide_commands_are_ignored_and_project_files_are_not():
    assert ignored(IGNORED) == set(IGNORED)
    assert ignored(TRACKED) == set()
