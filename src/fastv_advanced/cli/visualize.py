"""`fastv-visualize` (also `python -m fastv_advanced.cli.visualize`): pictures of the image tokens FastV keeps.

Reads the result files of `--results-dir` and their per-sample records written with `--save-selection`, and draws
(1) for chosen questions, the image as the model saw it with each configuration's kept patches side by side, and
(2) over the whole run, how often each patch position was kept, one heatmap per configuration. With `--run N -- SWEEP
FLAGS` it first runs the model itself: `fastv-sweep SWEEP FLAGS --save-selection` on the first N questions into
`--results-dir`. Exit status 2 for anything that cannot be drawn (the message names the flag, file or question), 1
without matplotlib.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import visualize
from .pipes import exit_quietly_on_broken_pipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastv-visualize",
        description="Draw which image patches each configuration kept, from the per-sample records of a results "
        "folder (run eval_scivqa.py, fastv-sweep or the suite script with --save-selection first, or use --run).",
        epilog="example: fastv-visualize --results-dir runs/pictures --run 5 -- --model-path MODEL --question-file Q "
        "--image-folder I --single-pred-prompt --pruning-method dart visionzip --pruning-preset 64",
    )
    parser.add_argument("--run", type=int, metavar="N", default=None, help="first run fastv-sweep with the flags "
                        "after '--' (and --save-selection) on the first N questions, into --results-dir")
    parser.add_argument("--results-dir", default=".", help="folder with the scienceqa_results_*.json files and "
                        "their .jsonl records (default: the current directory)")
    parser.add_argument("--question-id", nargs="+", metavar="ID", default=None, help="questions to draw (default: "
                        f"the first {visualize.DEFAULT_QUESTIONS} with an image on which the configurations' answers "
                        "differ, topped up with the first ones)")
    parser.add_argument("--output", metavar="PNG", default=None, help="per-question picture (default: "
                        "RESULTS_DIR/kept_patches.png)")
    parser.add_argument("--frequency-output", metavar="PNG", default=None, help="how often each patch was kept over "
                        "the whole run (default: RESULTS_DIR/keep_frequency.png)")
    parser.add_argument("--question-file", default=None, help="question file (default: the one the results record)")
    parser.add_argument("--image-folder", default=None, help="image folder (default: the one the results record)")
    return parser


def draw(args: argparse.Namespace) -> None:
    """Both pictures; `VisualizeError` for what cannot be drawn, `RuntimeError` without matplotlib."""
    configurations, warnings = visualize.load_configurations(args.results_dir)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    question_ids = args.question_id or visualize.default_question_ids(configurations)
    views = visualize.question_views(configurations, question_ids, args.question_file, args.image_folder)
    output = args.output or Path(args.results_dir) / "kept_patches.png"
    frequency = args.frequency_output or Path(args.results_dir) / "keep_frequency.png"
    path = visualize.draw_questions(configurations, views, output)
    print(f"kept patches of question(s) {', '.join(question_ids)} x {len(configurations)} configurations written "
          f"to {path}")
    path = visualize.draw_keep_frequency(configurations, frequency)
    print(f"keep frequency over the run written to {path}")


def _visualize(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.run is not None:
        if args.run < 1 or not sweep_args:
            print("error: --run N needs N >= 1 and the sweep's flags after '--'", file=sys.stderr)
            return 2
        from . import sweep

        code = sweep.main(sweep_args + ["--save-selection", "--num-samples", str(args.run), "--output-dir",
                                        str(args.results_dir)])
        if code != 0:
            return code
    try:
        draw(args)
    except visualize.VisualizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return exit_quietly_on_broken_pipe(lambda: _visualize(argv))


if __name__ == "__main__":
    raise SystemExit(main())
