"""`fastv-sweep`: evaluate a grid of FastV configurations (and the baseline) with one model load.

Writes exactly the files single `eval_scivqa.py` runs write (same names, same content, resumable), one pair per
configuration. The model, data, prompt and run flags are `eval_scivqa.py`'s (both take them from `cli/common.py`);
the grid flags replace its single-configuration FastV flags. Everything is checked before the model loads, and the
model is not loaded at all when every configuration is already finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import model_loading
from ..embedded import ENV_VAR
from ..evaluation import RunOptions
from ..model_loading import LoadedModel
from ..methods import get_method_class
from ..methods.fastv import DEFAULT_ALPHA, GUIDE_AGG_LAYER, GUIDE_ATTENTION_RANK, uses_alpha
from ..run_config import RunConfig
from ..run_files import ConfigurationMismatch
from ..run_loop import EvaluationError
from ..scienceqa import QuestionSet, image_path
from ..strategies import available_strategies
from ..sweep import DEFAULT_METHODS, Cost, MethodGrid, Sweep, SweepError, SweepGrid, expand_grid, expected_model_info
from ..sweep import format_report
from .common import (
    FLAG_OF_FIELD,
    HelpFormatter,
    Inputs,
    UsageError,
    add_data_arguments,
    add_fastv_span_arguments,
    add_method_arguments,
    add_prompt_arguments,
    add_run_arguments,
    check_inputs,
    command_line,
    describe_inputs,
    fastv_notices,
    flag_error,
    methods_epilog,
    note_input_warnings,
    parse_pruning_params,
    print_problems,
    resolve_paths,
    run_config_with,
)

# Configuration fields -> the sweep's flags that give them (the grid's flags replace the single-run FastV flags).
GRID_FLAGS = {
    **FLAG_OF_FIELD,
    "agg_layer": "--agg-layers",
    "attention_rank": "--ranks",
    "weighted_alpha": "--alphas",
    "token_selection_method": "--methods",
}

EXAMPLES = """examples:
  # the guide's suite: baseline, max_head, avg_all_heads, weighted_combination alpha 0.3/0.5/0.7 (R=288, K=2)
  fastv-sweep --model-path ./models/llava-1.5-7b-hf --question-file ./data/scienceqa/himap-inference-MCQ.json \\
      --image-folder ./data/scienceqa/images/test --single-pred-prompt --num-samples 100 \\
      --methods max_head avg_all_heads weighted_combination --alphas 0.3 0.5 0.7

  # the guide's alpha sweep, without the baseline
  fastv-sweep ... --no-baseline --methods weighted_combination --alphas 0.1 0.3 0.5 0.7 0.9

  # the guide's tuning grid: kept tokens x pruning layer
  fastv-sweep ... --methods avg_all_heads max_head --ranks 144 288 432 --agg-layers 1 2 4

  # other methods: a parameter grid, the papers' 192/128/64 presets, or equal FLOPs
  fastv-sweep ... --pruning-method pdrop --pruning-param ratio=0.3,0.5 --pruning-param "layers=[2,8,16]"
  fastv-sweep ... --pruning-method dart visionzip divprune --pruning-preset 192 128 64
  fastv-sweep ... --pruning-method fastv dart visionzip --flops-target 0.3 0.45
"""


class _SweepHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """eval_scivqa's help format, with the description and the examples printed as written."""


DESCRIPTION = f"""\
Evaluate a grid of FastV configurations on ScienceQA with ONE model load: every method x rank x aggregation
layer (weighted_combination also x alpha), plus the unpruned baseline. Each configuration writes the same
scienceqa_results_<config>.json + .jsonl as a single eval_scivqa.py run with the same flags; finished
configurations are skipped (the model is not even loaded when all are) and interrupted ones resume.
Set {ENV_VAR}=1 to use the embedded tiny model and sample data."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastv-sweep", description=DESCRIPTION, formatter_class=_SweepHelpFormatter,
        epilog=EXAMPLES + "\n" + methods_epilog(),
    )
    add_data_arguments(parser)
    add_prompt_arguments(parser)
    grid = parser.add_argument_group("grid (one result file per configuration)")
    grid.add_argument("--methods", nargs="*", default=None, metavar="METHOD",
                      help=f"FastV token-selection strategies ({', '.join(available_strategies())}, or "
                      "package.module:function); none = baseline only (default: "
                      f"{' '.join(DEFAULT_METHODS)}, or none with --pruning-method)")
    grid.add_argument("--alphas", nargs="+", type=float, default=[DEFAULT_ALPHA], metavar="ALPHA",
                      help=f"alphas of weighted_combination; other methods have none (default: {DEFAULT_ALPHA})")
    grid.add_argument("--ranks", nargs="+", type=int, default=[GUIDE_ATTENTION_RANK], metavar="R",
                      help="image tokens kept after layer K; the guide tunes 144, 288, 432 = 25/50/75%% of 576 "
                      f"(default: {GUIDE_ATTENTION_RANK})")
    grid.add_argument("--agg-layers", nargs="+", type=int, default=[GUIDE_AGG_LAYER], metavar="K",
                      help="layers from which tokens are dropped; the guide tunes 1, 2, 4 "
                      f"(default: {GUIDE_AGG_LAYER})")
    grid.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                      help="also evaluate the unpruned model, scienceqa_results_baseline.json (default: on)")
    add_fastv_span_arguments(grid)
    add_method_arguments(parser, grid=True)
    add_run_arguments(parser, single_run=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sweep = None
    try:
        with fastv_notices():
            sweep = _prepare(args, argv)
            if sweep is None:  # dry run
                return 0
            sweep.run(lambda: _load(args, sweep))
    except UsageError as exc:
        print_problems(exc)
        return 2
    except SweepError as exc:
        _print_report(sweep)
        print(f"error: {exc}\n(finished configurations are kept; fix the problem and re-run the same command to "
              "resume)", file=sys.stderr)
        return 1
    except (ConfigurationMismatch, EvaluationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _print_report(sweep)
        print("\ninterrupted: finished configurations and samples are saved; re-run the same command to resume",
              file=sys.stderr)
        return 130
    _print_report(sweep)
    return 0


def _print_report(sweep: Sweep | None) -> None:
    if sweep is not None and sweep.entries:
        print(format_report(sweep.entries, sweep.model_loaded), flush=True)


def _load(args: argparse.Namespace, sweep: Sweep) -> LoadedModel:
    todo = sum(1 for p in sweep.plan() if p.status != "done")
    print(f"loading {args.model_path} once for {todo} configurations to compute "
          f"({len(sweep.run_configs) - todo} already finished)", flush=True)
    return model_loading.load_model(args.model_path, args.model_base, device=sweep.expected_info.device,
                                    dtype=args.dtype, progress=not args.no_progress)


def _grid_run_configs(args: argparse.Namespace) -> list[RunConfig]:
    """The grid's configurations; `UsageError` naming the sweep's flag of a bad value."""
    rules = args.methods if args.methods is not None else ([] if args.pruning_method else list(DEFAULT_METHODS))
    if not any(uses_alpha(rule) for rule in rules) and args.alphas != [DEFAULT_ALPHA]:
        print("note: --alphas applies to weighted_combination only, which is not in --methods: ignored",
              file=sys.stderr)
    spec = _model_spec(args) if args.pruning_preset or args.flops_target else None
    grid = SweepGrid(tuple(rules), tuple(args.alphas), tuple(args.ranks), tuple(args.agg_layers), args.baseline,
                     method_grids(args, spec))
    template = run_config_with(args, None)
    try:
        run_configs = expand_grid(grid, template, sys_length=args.fast_v_sys_length,
                                  image_token_length=args.fast_v_image_token_length, cost=_cost(args, spec))
    except ValueError as exc:
        raise flag_error(exc, GRID_FLAGS) from exc
    if not run_configs:
        raise UsageError("nothing to evaluate: --no-baseline and no --methods or --pruning-method")
    return run_configs


def method_grids(args: argparse.Namespace, spec=None) -> tuple[MethodGrid, ...]:
    """One grid per `--pruning-method`: each gets the `--pruning-param`s it has (a parameter no listed method has
    is an error), the `--pruning-preset`s and the `--flops-target`s."""
    if not args.pruning_method:
        if args.pruning_param or args.pruning_preset or args.flops_target:
            raise UsageError("--pruning-param, --pruning-preset and --flops-target need --pruning-method")
        return ()
    params = parse_pruning_params(args.pruning_param, grid=True)
    layers = _preset_layers(spec) if args.pruning_preset else None
    grids, used = [], set()
    for name in args.pruning_method:
        try:
            fields = {f.name for f in get_method_class(name).parameter_fields()}
        except ValueError as exc:
            raise UsageError(f"--pruning-method: {exc}") from exc
        own = tuple((key, values) for key, values in params if key in fields)
        used |= {key for key, _ in own}
        grids.append(MethodGrid(name, own, tuple(args.pruning_preset or ()), tuple(args.flops_target),
                                layers))
    unknown = [key for key, _ in params if key not in used]
    if unknown:
        raise UsageError(f"--pruning-param {', '.join(unknown)}: no method of --pruning-method "
                         f"{' '.join(args.pruning_method)} has that parameter")
    return tuple(grids)


def _model_spec(args: argparse.Namespace):
    """The model's `ModelSpec` for presets and FLOPs targets (None when the model path cannot be read: that is
    reported on its own by the input checks)."""
    try:
        return model_loading.inspect_model_path(args.model_path)
    except ValueError:
        return None


def _preset_layers(spec) -> int | None:
    """The decoder layers presets are moved to, with a note when they are not the presets' 32."""
    layers = spec.num_layers if spec is not None else None
    if layers is not None and layers != 32:
        print(f"note: presets are written for 32 decoder layers; their layers are moved to the same relative depth "
              f"of this model's {layers}", file=sys.stderr)
    return layers


def _cost(args: argparse.Namespace, spec) -> Cost | None:
    """The shape FLOPs targets are solved for: the model's decoder and a prompt of its image tokens + 100 text
    tokens (None without targets or without a readable model)."""
    if not args.flops_target or spec is None or spec.decoder_shape is None or spec.num_image_tokens is None:
        return None
    return Cost(spec.decoder_shape, spec.num_image_tokens + 100, spec.num_image_tokens)


def _prepare(args: argparse.Namespace, argv) -> Sweep | None:
    """Check everything that can be checked without the model; the `Sweep` to run, or None after a dry run."""
    resolve_paths(args)
    run_configs, inputs = check_inputs(args, lambda: _grid_run_configs(args), GRID_FLAGS)
    pruned = [c for c in run_configs if c.method is not None]
    note_input_warnings(pruned[0] if pruned else run_configs[0], inputs.spec, inputs.problems)
    options = RunOptions(
        output_dir=Path(args.output_dir), image_folder=inputs.image_folder, overwrite=args.overwrite,
        on_error=args.on_error, save_selection=args.save_selection, num_samples=args.num_samples,
        command=command_line("fastv-sweep", argv), progress=not args.no_progress,
        log=lambda line: print(line, flush=True), batch_size=args.batch_size,
    )
    sweep = Sweep(
        run_configs, inputs.questions, expected_model_info(inputs.spec, args.model_base, inputs.device, inputs.dtype),
        options, unfixable=unfixable_questions(inputs.questions, inputs.image_folder),
    )
    if args.dry_run:
        print(describe_sweep(sweep, inputs))
        return None
    return sweep


def unfixable_questions(questions: QuestionSet, image_folder: str | None) -> frozenset[str]:
    """Ids whose entry is malformed or whose image is missing now: their error records cannot change on a re-run,
    so they do not make a finished configuration unfinished."""
    ids = set()
    for question in questions.questions:
        if question.error is not None:
            ids.add(question.id)
        elif question.image is not None and not image_path(image_folder, question).is_file():
            ids.add(question.id)
    return frozenset(ids)


def describe_sweep(sweep: Sweep, inputs: Inputs) -> str:
    """The dry run's description: the inputs, the shared settings and each configuration's plan."""
    plans = sweep.plan()
    template = sweep.run_configs[0]
    lines = [
        "Dry run: nothing is evaluated.",
        *describe_inputs(inputs),
        f"  prompt {template.conv_mode}, single-pred-prompt {template.single_pred_prompt}, images "
        f"{template.image_aspect_ratio}; "
        + ("greedy" if template.temperature == 0 else f"temperature {template.temperature}")
        + f", max {template.max_new_tokens} new tokens"
        + (f"; batches of {sweep.options.batch_size} questions" if sweep.options.batch_size > 1 else ""),
        f"  {len(plans)} configurations, one model load, written to {sweep.output_dir}:",
    ]
    width = max(len(p.label) for p in plans)
    for number, planned in enumerate(plans, start=1):
        action = {"done": "skip (finished)", "resume": "resume", "new": "compute", "conflict": "REFUSED"}[
            planned.status]
        lines.append(f"    {number:>2}. {planned.label:<{width}}  {action:<15} {planned.result_path.name}"
                     + (f"  ({planned.detail})" if planned.detail and planned.status != "conflict" else ""))
    for planned in Sweep.conflicts(plans):
        lines.append(f"  refused: {planned.detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
