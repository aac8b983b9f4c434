"""`fastv-merge-chunks`: one result file from the per-chunk JSONLs of `--num-chunks/--chunk-idx` runs."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..chunks import find_chunk_files, merge_chunks
from ..metrics import format_summary
from ..run_files import ConfigurationMismatch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastv-merge-chunks",
        description="Merge the chunk JSONLs (<stem>.chunk{i}of{n}.jsonl) written by eval_scivqa.py --num-chunks N "
        "--chunk-idx i into <stem>.jsonl and the result file <stem>.json. Chunks must share one configuration "
        "and be complete.",
    )
    parser.add_argument("files", nargs="*", help="chunk JSONLs of one configuration (default: every group of "
                        "chunk files found in --output-dir)")
    parser.add_argument("--output-dir", default=".", help="where to look for chunk files when none are named, and "
                        "where the merged files are written")
    parser.add_argument("--overwrite", action="store_true", help="replace a result file of a different "
                        "configuration")
    parser.add_argument("--allow-partial", action="store_true", help="merge even when chunks or samples are "
                        "missing (the result says complete: false)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    groups = {None: args.files} if args.files else find_chunk_files(args.output_dir)
    if not groups:
        print(f"error: no chunk files (*.chunk<i>of<n>.jsonl) in {args.output_dir}", file=sys.stderr)
        return 2
    command = shlex.join(["fastv-merge-chunks"] + list(argv if argv is not None else sys.argv[1:]))
    status = 0
    for files in groups.values():
        try:
            result = merge_chunks(files, args.output_dir, overwrite=args.overwrite,
                                  allow_partial=args.allow_partial, command=command)
        except (ValueError, ConfigurationMismatch) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(format_summary(result, result["result_file"], result["failures"]))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
