"""The user's guide's path: `python ./src/HiMAP/inference/eval_scivqa.py ...` = the `fastv-eval-scivqa` command."""

from fastv_advanced.cli.eval_scivqa import main

if __name__ == "__main__":
    raise SystemExit(main())
