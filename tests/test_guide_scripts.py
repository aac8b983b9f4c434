"""The guide's `python test_fastv_advanced.py` and `python example_fastv_advanced.py`: FASTV_EMBEDDED=1 runs them on
the embedded model, the functional test runs without pytest warnings, the example's output closed early is quiet."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT
from fastv_advanced import embedded


def guide_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != embedded.ENV_VAR}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def run_guide_script(name: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, name], cwd=REPO_ROOT, env=guide_env(**extra), capture_output=True,
                          text=True, timeout=300)


def test_functional_test_runs_on_the_embedded_model_without_warnings():
    done = run_guide_script("test_fastv_advanced.py", FASTV_EMBEDDED="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "6 passed" in done.stdout and "warning" not in (done.stdout + done.stderr).lower()
    assert done.stdout.count("[embedded-model") == 6 and "random-tiny-llava" not in done.stdout


def test_example_answers_the_embedded_question_with_each_strategy():
    done = run_guide_script("example_fastv_advanced.py", FASTV_EMBEDDED="1")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"FASTV_EMBEDDED=1: the embedded toy model {embedded.MODEL_PATH} on question 1")
    assert "no pruning: answer 'A' -> A, correct" in lines
    strategies = [line for line in lines if "kept 288 of 576 image tokens; answer '" in line]
    assert [line.split(":")[0].split(",")[0] for line in strategies] == [
        "avg_all_heads", "max_head", "random", "weighted_combination"]
    grid = [line for line in lines if set(line) <= {"#", "."} and len(line) == 24]
    assert len(grid) == 4 * 24 and sum(line.count("#") for line in grid) == 4 * 288
    assert "generated ids" not in done.stdout


def test_example_output_closed_early_ends_quietly():
    process = subprocess.Popen([sys.executable, "example_fastv_advanced.py"], cwd=REPO_ROOT, env=guide_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # `| head` that has gone before the first line
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
