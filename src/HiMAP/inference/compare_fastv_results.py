"""The user's guide's path: `python ./src/HiMAP/inference/compare_fastv_results.py` = the `fastv-compare` command.

Runs this checkout's package (the `src` folder two levels up) even when another copy is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastv_advanced.cli.compare import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="compare_fastv_results.py"))
