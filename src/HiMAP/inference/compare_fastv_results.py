"""The user's guide's path: `python ./src/HiMAP/inference/compare_fastv_results.py` = the `fastv-compare` command."""

from fastv_advanced.cli.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
