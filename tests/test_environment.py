"""What result files record about the machine: a CPU run says how busy the other processes kept its cores."""

from __future__ import annotations

import os

from fastv_advanced.run_files import busy_cores, environment_info


def test_busy_cores_is_a_core_count_and_recorded_for_cpu_runs():
    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)
    info = environment_info("cpu", "test CPU")
    assert "busy_cores" in info and (info["busy_cores"] is None or info["busy_cores"] >= 0.0)
    assert environment_info("meta", "no CPU")["busy_cores"] is None
