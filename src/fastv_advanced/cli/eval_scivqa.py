"""`fastv-eval-scivqa` (also `python ./src/HiMAP/inference/eval_scivqa.py`): ScienceQA with or without FastV.

Thin command line over `fastv_advanced.evaluation`: parse and check the flags, the question file, the model path
and the output folder before loading anything heavy (every problem reported at once), then load the model once
and run `evaluate`. Under `accelerate launch` (or torchrun) each process evaluates its shard of the questions and
the main process merges the shards.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from datetime import timedelta

import torch

from .. import model_loading
from ..chunks import merge_chunks
from ..embedded import ENV_VAR
from ..evaluation import RunOptions, evaluate
from ..metrics import format_summary
from ..methods import get_method_class
from ..methods.fastv import DEFAULT_ALPHA, uses_alpha
from ..run_config import RunConfig, build_checked, describe_pruning, result_file_name, samples_file_name
from ..run_files import ConfigurationMismatch
from ..run_loop import EvaluationError
from ..strategies import available_strategies
from .common import (
    FLAG_OF_FIELD,
    RawEpilogHelpFormatter,
    Inputs,
    UsageError,
    add_data_arguments,
    add_fastv_span_arguments,
    add_prompt_arguments,
    add_method_arguments,
    add_run_arguments,
    check_inputs,
    command_line,
    describe_inputs,
    fastv_notices,
    flag_error,
    launched_processes,
    methods_epilog,
    note_input_warnings,
    parse_pruning_params,
    print_problems,
    resolve_paths,
    run_config_with,
)

FASTV_VALUE_FLAGS = (
    "fast_v_sys_length",
    "fast_v_image_token_length",
    "fast_v_attention_rank",
    "fast_v_agg_layer",
    "fast_v_token_selection_method",
    "fast_v_weighted_alpha",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval_scivqa.py",
        description=textwrap.fill(
            "Evaluate a LLaVA-1.5 model on ScienceQA (LLaVA's protocol), optionally with FastV (the guide's flags) or "
            "another visual-token pruning method (--pruning-method), and write scienceqa_results_<config>.json + a "
            f"per-sample .jsonl to --output-dir. Re-running the same command resumes. Set {ENV_VAR}=1 to use the "
            "embedded tiny model and sample data.", width=100),
        formatter_class=RawEpilogHelpFormatter,
        epilog=methods_epilog(),
    )
    add_data_arguments(parser)
    add_prompt_arguments(parser)

    fastv = parser.add_argument_group("FastV")
    fastv.add_argument("--use-fast-v", action="store_true", help="enable FastV (needs --fast-v-attention-rank and "
                       "--fast-v-agg-layer)")
    add_fastv_span_arguments(fastv)
    fastv.add_argument("--fast-v-attention-rank", type=int, default=None, help="R: image tokens kept after layer K "
                       "(288 = 50%% of 576)")
    fastv.add_argument("--fast-v-agg-layer", type=int, default=None, help="K: layer from which tokens are dropped; "
                       "layer K-1's attention chooses them (1 <= K < number of layers)")
    fastv.add_argument("--fast-v-token-selection-method", default="avg_all_heads", help="token-selection strategy: "
                       f"{', '.join(available_strategies())}, or package.module:function")
    fastv.add_argument("--fast-v-weighted-alpha", type=float, default=DEFAULT_ALPHA, help="alpha of "
                       "weighted_combination, in [0, 1]: alpha*A[max head] + (1-alpha)*mean(other heads)")

    add_method_arguments(parser, grid=False)
    add_run_arguments(parser, single_run=True)
    return parser


def run_config_from_args(args: argparse.Namespace, parser_defaults: dict) -> tuple[RunConfig, list[str]]:
    """The `RunConfig` the flags describe, and notes; `UsageError` naming the flag for inconsistent flags."""
    if args.pruning_method is not None:
        if args.use_fast_v:
            raise UsageError("give --use-fast-v (the guide's FastV flags) or --pruning-method, not both")
        return run_config_with(args, method_from_args(args)), []
    if args.pruning_param or args.pruning_preset:
        raise UsageError("--pruning-param and --pruning-preset need --pruning-method")
    notes = []
    method = None
    if args.use_fast_v:
        missing = [flag for flag in ("fast_v_attention_rank", "fast_v_agg_layer") if getattr(args, flag) is None]
        if missing:
            raise UsageError(*(
                f"--use-fast-v needs --{flag.replace('_', '-')} (the guide uses "
                f"{'288' if 'rank' in flag else '2'}); it has no default, so that a missing flag cannot "
                "silently become 0"
                for flag in missing
            ))
        if not uses_alpha(args.fast_v_token_selection_method) and args.fast_v_weighted_alpha != DEFAULT_ALPHA:
            notes.append(
                f"--fast-v-weighted-alpha {args.fast_v_weighted_alpha} is ignored by "
                f"--fast-v-token-selection-method {args.fast_v_token_selection_method}"
            )
        try:
            method = build_checked("fastv", {
                "agg_layer": args.fast_v_agg_layer, "attention_rank": args.fast_v_attention_rank,
                "token_selection_method": args.fast_v_token_selection_method,
                "weighted_alpha": args.fast_v_weighted_alpha, "sys_length": args.fast_v_sys_length,
                "image_token_length": args.fast_v_image_token_length, "seed": args.seed,
            })
        except ValueError as exc:
            raise flag_error(exc) from exc
    else:
        given = [f"--{f.replace('_', '-')}" for f in FASTV_VALUE_FLAGS if getattr(args, f) != parser_defaults[f]]
        if given:
            notes.append(f"{', '.join(given)} given without --use-fast-v: they are ignored, this is a baseline run")
    return run_config_with(args, method), notes


def method_from_args(args: argparse.Namespace):
    """The method of `--pruning-method`, its `--pruning-preset` and `--pruning-param`s; `UsageError` naming the flag."""
    params = dict((key, values[0]) for key, values in parse_pruning_params(args.pruning_param, grid=False))
    try:
        cls = get_method_class(args.pruning_method)
    except ValueError as exc:
        raise UsageError(f"--pruning-method: {exc}") from exc
    if args.pruning_preset is not None:
        if args.pruning_preset not in cls.presets:
            raise UsageError(f"--pruning-preset {args.pruning_preset}: {args.pruning_method} has the presets "
                             f"{', '.join(cls.presets) or '(none)'}")
        params = {**_scaled_preset(args, cls, args.pruning_preset), **params}
    try:
        return build_checked(args.pruning_method, params)
    except ValueError as exc:
        raise flag_error(exc, {}) from exc


def _scaled_preset(args: argparse.Namespace, cls, preset: str) -> dict:
    """A preset's parameters, its layers moved to the model's depth when it is not the presets' 32 (with a note)."""
    method = build_checked(args.pruning_method, cls.presets[preset])
    try:
        layers = model_loading.inspect_model_path(args.model_path).num_layers
    except ValueError:
        return method.parameters()  # the model path's problem is reported on its own
    if layers is not None and layers != method.reference_layers:
        print(f"note: --pruning-preset {preset} is written for {method.reference_layers} decoder layers; its layers "
              f"are moved to the same relative depth of this model's {layers}", file=sys.stderr)
        method = method.scaled_to(layers)
    return method.parameters()


def describe(args: argparse.Namespace, run_config: RunConfig, inputs: Inputs, shards: int) -> str:
    """The dry run's description: the inputs, the configuration, the files it would write."""
    lines = [
        "Dry run: nothing is evaluated.",
        *describe_inputs(inputs),
        f"  configuration: {run_config.label}; prompt {run_config.conv_mode}, single-pred-prompt "
        f"{run_config.single_pred_prompt}, images {run_config.image_aspect_ratio}; "
        + ("greedy" if run_config.temperature == 0 else f"temperature {run_config.temperature}")
        + f", max {run_config.max_new_tokens} new tokens"
        + (f"; batches of {args.batch_size} questions" if args.batch_size > 1 else ""),
    ]
    pruning = describe_pruning(run_config, inputs.spec.num_layers, inputs.spec.num_image_tokens)
    if pruning is not None:
        lines.append(f"  {pruning}")
    out = os.path.abspath(args.output_dir)
    if shards > 1:
        lines.append(f"  chunks: {shards} ({'accelerate' if args.num_chunks == 1 else f'chunk {args.chunk_idx}'})")
    lines.append(f"  would write: {os.path.join(out, result_file_name(run_config))} and "
                 f"{os.path.join(out, samples_file_name(run_config))}"
                 + (" (starting over: --overwrite)" if args.overwrite else " (resuming if present)"))
    return "\n".join(lines)


def _distributed_state(device_flag: str):
    """accelerate's PartialState when launched with more than one process (accelerate launch / torchrun)."""
    if launched_processes() <= 1:
        return None
    try:
        from accelerate import PartialState
    except ImportError as exc:
        raise UsageError(
            "this command runs under a multi-process launcher (WORLD_SIZE > 1), which needs accelerate: "
            "pip install 'fastv_advanced[accelerate]'"
        ) from exc
    cpu = device_flag == "cpu" or (device_flag == "auto" and not torch.cuda.is_available())
    return PartialState(cpu=cpu, timeout=timedelta(hours=24))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        with fastv_notices():
            return _main(args, defaults, argv)
    except UsageError as exc:
        print_problems(exc)
        return 2
    except (ConfigurationMismatch, EvaluationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished samples are saved; re-run the same command to resume", file=sys.stderr)
        return 130


def _single_run_config(args: argparse.Namespace, defaults: dict) -> list[RunConfig]:
    run_config, notes = run_config_from_args(args, defaults)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return [run_config]


def _main(args: argparse.Namespace, defaults: dict, argv) -> int:
    resolve_paths(args)
    (run_config,), inputs = check_inputs(args, lambda: _single_run_config(args, defaults), FLAG_OF_FIELD)
    note_input_warnings(run_config, inputs.spec, inputs.problems)
    if args.dry_run:
        shards = launched_processes() if launched_processes() > 1 else args.num_chunks
        print(describe(args, run_config, inputs, shards))
        return 0

    state = _distributed_state(args.device)
    options = _run_options(args, inputs, state, command_line("eval_scivqa.py", argv))
    device = state.device if state is not None and state.device.type == "cuda" else inputs.device
    result = _evaluate_shard(args, run_config, inputs, options, state, device)
    if result is None:  # a process of a multi-process launch other than the main one
        return 0
    if options.num_chunks > 1 and state is None:
        print(format_summary(result, failed=result["failures"]))
        print(f"  chunk {options.chunk_idx} of {options.num_chunks} written to {result['samples_path']}; when every "
              f"chunk is done, merge them: fastv-merge-chunks --output-dir {args.output_dir}")
        return 0
    print(format_summary(result, result.get("result_file"), result["failures"]))
    return 0


def _run_options(args: argparse.Namespace, inputs: Inputs, state, command: str) -> RunOptions:
    """The run's options; a multi-process launch evaluates one shard per process (each with its answers file)."""
    num_chunks, chunk_idx = args.num_chunks, args.chunk_idx
    answers_file = args.answers_file
    if state is not None:
        num_chunks, chunk_idx = state.num_processes, state.process_index
        if answers_file and num_chunks > 1:
            root, ext = os.path.splitext(answers_file)
            answers_file = f"{root}.chunk{chunk_idx}of{num_chunks}{ext or '.jsonl'}"
    return RunOptions(
        output_dir=args.output_dir, image_folder=inputs.image_folder, overwrite=args.overwrite,
        on_error=args.on_error, save_selection=args.save_selection, num_chunks=num_chunks, chunk_idx=chunk_idx,
        num_samples=args.num_samples, answers_file=answers_file, command=command, progress=not args.no_progress,
        batch_size=args.batch_size,
    )


def _evaluate_shard(args: argparse.Namespace, run_config: RunConfig, inputs: Inputs, options: RunOptions, state,
                    device: torch.device) -> dict | None:
    """Load the model and evaluate this process's questions. Under a multi-process launch every process waits for
    the others (also when one failed, whose error is then raised) and the main process merges the shards; the
    others return None."""
    failure = None
    try:
        loaded = model_loading.load_model(args.model_path, args.model_base, device=device, dtype=args.dtype,
                                          progress=options.progress)
        result = evaluate(loaded.model, loaded.processor, inputs.questions, run_config, options,
                          model_info=loaded.info)
    except Exception as exc:  # noqa: BLE001 - re-raised after the other processes are released
        if state is None:
            raise
        failure = exc
    if state is None:
        return result
    state.wait_for_everyone()
    if failure is not None:
        raise failure
    if not state.is_main_process:
        return None
    files = [os.path.join(args.output_dir, samples_file_name(run_config, options.num_chunks, i))
             for i in range(options.num_chunks)]
    return merge_chunks(files, args.output_dir, overwrite=args.overwrite, command=options.command)


if __name__ == "__main__":
    raise SystemExit(main())
