"""`fastv-compare` (also `python ./src/HiMAP/inference/compare_fastv_results.py`): compare ScienceQA result files.

Reads every `scienceqa_results_*.json` in `--results-dir` (default: the current directory) and prints the guide's
table with Δ vs. the baseline, prefill speed-up, image tokens kept and the paired significance of each accuracy
difference; `--plot FILE` also draws accuracy against FLOPs and against prefill latency with the Pareto front.
Exit status 2 when there is nothing to compare or the runs are on different question sets/models (unless
`--allow-mixed`).
"""

from __future__ import annotations

import argparse
import shutil
import sys

from .. import compare, plotting
from .pipes import exit_quietly_on_broken_pipe


def build_parser(prog: str = "fastv-compare") -> argparse.ArgumentParser:
    """The command line; `prog` is the name usage and errors show (the guide's script passes its own)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare the ScienceQA results (scienceqa_results_*.json) of a folder: accuracy with Δ vs. the "
        "baseline, average latency, prefill speed-up, FLOPs ratio, image tokens kept, samples, and per "
        "configuration the exact McNemar p-value and a bootstrap 95% interval of Δ (paired by question id, from "
        "the per-sample .jsonl files).",
    )
    parser.add_argument("--results-dir", default=".", help="folder with the result files (default: the current "
                        "directory)")
    parser.add_argument("--format", choices=sorted(compare.FORMATTERS), default="table",
                        help="output written to standard output (default: table, the guide's layout)")
    parser.add_argument("--width", type=int, metavar="COLUMNS", default=None, help="fit the table into this many "
                        "terminal columns, splitting its columns into blocks one under the other (default: the "
                        "terminal's width when writing to a terminal, no limit otherwise; 0 = no limit)")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="also draw accuracy against the FLOPs ratio "
                        "and against prefill latency (two panels, Pareto front) into this image")
    parser.add_argument("--allow-mixed", action="store_true", help="compare runs on different question files or "
                        "models anyway (refused by default)")
    return parser


def table_width(width: int | None) -> int | None:
    """--width, or the terminal's width when standard output is a terminal (pipes and files keep the full table)."""
    if width is None:
        return shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    return width or None


def main(argv: list[str] | None = None, prog: str = "fastv-compare") -> int:
    """Exit status: 0, 1 (the plot cannot be drawn), 2 (nothing to compare, mixed runs), 141 (output closed)."""
    return exit_quietly_on_broken_pipe(lambda: _compare(argv, prog))


def _compare(argv: list[str] | None, prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    problem = compare.results_dir_problem(args.results_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    runs, warnings = compare.load_results(args.results_dir)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not runs:
        print(f"error: no result files ({compare.RESULT_GLOB}) to compare in {args.results_dir}"
              + (" (all were skipped, see the warnings above)" if warnings else "")
              + "; run eval_scivqa.py, fastv-sweep or eval_scivqa_fastv_advanced.sh first, or pass --results-dir",
              file=sys.stderr)
        return 2
    try:
        comparison = compare.build_comparison(runs, allow_mixed=args.allow_mixed, results_dir=args.results_dir)
    except compare.MixedRuns as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in comparison.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.format == "table":
        print(compare.format_table(comparison, width=table_width(args.width)))
    else:
        print(compare.FORMATTERS[args.format](comparison))
    if args.plot:
        try:
            path = plotting.plot_comparison(comparison, args.plot)
        except (RuntimeError, OSError) as exc:
            print(f"error: cannot draw {args.plot}: {exc}", file=sys.stderr)
            return 1
        print(f"plot written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
