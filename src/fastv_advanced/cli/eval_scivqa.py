"""`fastv-eval-scivqa` (also `python ./src/HiMAP/inference/eval_scivqa.py`): ScienceQA with or without FastV.

Thin command line over `fastv_advanced.evaluation`: parse and check the flags, the question file and the model
path before loading anything heavy, then load the model once and run `evaluate`. Under `accelerate launch` (or
torchrun) each process evaluates its shard of the questions and the main process merges the shards.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from .. import model_loading
from ..chunks import merge_chunks
from ..evaluation import RunOptions, evaluate
from ..metrics import format_summary
from ..model_loading import ModelSpec, inspect_model_path, resolve_device, resolve_dtype
from ..run_config import RunConfig, check_run, result_file_name, samples_file_name
from ..run_files import ConfigurationMismatch
from ..run_loop import ON_ERROR_CHOICES, EvaluationError
from ..config import FastVConfig
from ..embedded import ENV_VAR, resolve_embedded
from ..scienceqa import DataError, QuestionSet, load_questions, missing_images
from ..strategies import available_strategies

FASTV_VALUE_FLAGS = (
    "fast_v_sys_length",
    "fast_v_image_token_length",
    "fast_v_attention_rank",
    "fast_v_agg_layer",
    "fast_v_token_selection_method",
    "fast_v_weighted_alpha",
)


class UsageError(ValueError):
    """A flag, file or model problem found before evaluation (exit status 2)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it says something (not None/False, not already in the help)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """`--model-path --model-base --question-file --image-folder --split --num-samples` (shared with the sweep)."""
    data = parser.add_argument_group("model and data")
    data.add_argument("--model-path", help="transformers-format LLaVA folder or hub id (e.g. llava-hf/llava-1.5-7b-hf "
                      "in the local cache), or an original-format checkpoint folder (liuhaotian layout)")
    data.add_argument("--model-base", default=None, help="base LLM for original-format LoRA/projector-only "
                      "checkpoints (as in LLaVA's scripts)")
    data.add_argument("--question-file", help="LLaVA question file (JSON list of {id, image, conversations}), or the "
                      "official release's problems.json (or its folder) with pid_splits.json beside it")
    data.add_argument("--image-folder", default=None, help="folder the entries' 'image' paths are relative to; "
                      "default for the official release: <release>/images/<split>")
    data.add_argument("--split", default=None, help="split of the official release (train, val, test, minival, ...; "
                      "default test); not for LLaVA question files")
    data.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N questions "
                      "(default: all)")
    return data


def add_prompt_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Prompt and generation flags (shared with the sweep)."""
    prompt = parser.add_argument_group("prompt and generation (LLaVA-1.5 protocol)")
    prompt.add_argument("--single-pred-prompt", action="store_true", help="append \"Answer with the option's letter "
                        "from the given choices directly.\" (LLaVA-1.5's ScienceQA setting)")
    prompt.add_argument("--conv-mode", default="vicuna_v1", help="conversation template (vicuna_v1 = llava_v1, "
                        "plain)")
    prompt.add_argument("--image-aspect-ratio", choices=("pad", "crop"), default=None, help="pad images to a square "
                        "with the CLIP mean colour (LLaVA-1.5) or centre-crop; default: the checkpoint's setting, "
                        "else pad")
    prompt.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy decoding")
    prompt.add_argument("--max-new-tokens", type=int, default=16, help="maximum tokens generated per answer")
    prompt.add_argument("--seed", type=int, default=0, help="seed of the random-token control and of sampling "
                        "(mixed with each question id)")
    return prompt


def add_fastv_span_arguments(group: argparse._ArgumentGroup) -> None:
    """The guide's expected image span, `--fast-v-sys-length` and `--fast-v-image-token-length` (shared)."""
    group.add_argument("--fast-v-sys-length", type=int, default=None, help="expected position of the first image "
                       "token (35 for LLaVA-1.5); checked against the input, which decides")
    group.add_argument("--fast-v-image-token-length", type=int, default=None, help="expected number of image tokens "
                       "(576 for LLaVA-1.5); checked against the input, which decides")


def add_run_arguments(parser: argparse.ArgumentParser, *, single_run: bool = True) -> argparse._ArgumentGroup:
    """Output, device and run-control flags; `single_run` adds the ones only a single run has (answers file,
    chunks)."""
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=".", help="where the result JSON and the per-sample JSONL are written")
    if single_run:
        run.add_argument("--answers-file", default=None, help="also write LLaVA's answers JSONL here (for LLaVA's "
                         "own eval_science_qa.py)")
    run.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    run.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                     help="model dtype; auto = float16 on GPU, float32 on CPU")
    if single_run:
        run.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many contiguous "
                         "chunks (merge them with fastv-merge-chunks)")
        run.add_argument("--chunk-idx", type=int, default=0, help="which chunk this process evaluates (0-based)")
    run.add_argument("--overwrite", action="store_true", help="start over: replace the existing JSONL and result "
                     "file of this configuration (by default a re-run resumes, and files of another configuration "
                     "are never overwritten)")
    run.add_argument("--save-selection", action="store_true", help="store the kept image-token indices of every "
                     "sample in the JSONL")
    run.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="skip", help="a bad sample (malformed "
                     "entry, missing/corrupt image): skip = record it as an error (counted wrong) and go on; "
                     "fail = stop")
    run.add_argument("--dry-run", action="store_true", help="check CUDA, the model path, the data files and images "
                     "and the flags, print what the run would do, and exit without evaluating")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval_scivqa.py",
        description="Evaluate a LLaVA-1.5 model on ScienceQA (LLaVA's protocol), optionally with FastV visual-token "
        "pruning, and write scienceqa_results_<config>.json + a per-sample .jsonl to --output-dir. Re-running "
        f"the same command resumes. Set {ENV_VAR}=1 to use the embedded tiny model and sample data.",
        formatter_class=HelpFormatter,
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
    fastv.add_argument("--fast-v-weighted-alpha", type=float, default=0.5, help="alpha of weighted_combination, in "
                       "[0, 1]: alpha*A[max head] + (1-alpha)*mean(other heads)")

    add_run_arguments(parser, single_run=True)
    return parser


# -- checks before the model loads ----------------------------------------------------------------------------------


def run_config_from_args(args: argparse.Namespace, parser_defaults: dict) -> tuple[RunConfig, list[str]]:
    """The `RunConfig` the flags describe, and warnings; `UsageError` naming the flag for inconsistent flags."""
    notes = []
    fastv = None
    if args.use_fast_v:
        for flag in ("fast_v_attention_rank", "fast_v_agg_layer"):
            if getattr(args, flag) is None:
                raise UsageError(
                    f"--use-fast-v needs --{flag.replace('_', '-')} (the guide uses "
                    f"{'288' if 'rank' in flag else '2'}); it has no default, so that a missing flag cannot "
                    "silently become 0"
                )
        if args.fast_v_token_selection_method != "weighted_combination" and args.fast_v_weighted_alpha != 0.5:
            notes.append(
                f"--fast-v-weighted-alpha {args.fast_v_weighted_alpha} is ignored by "
                f"--fast-v-token-selection-method {args.fast_v_token_selection_method}"
            )
        fastv = fastv_config_from_args(
            args, args.fast_v_agg_layer, args.fast_v_attention_rank, args.fast_v_token_selection_method,
            args.fast_v_weighted_alpha,
        )
    else:
        given = [f"--{f.replace('_', '-')}" for f in FASTV_VALUE_FLAGS if getattr(args, f) != parser_defaults[f]]
        if given:
            notes.append(f"{', '.join(given)} given without --use-fast-v: they are ignored, this is a baseline run")
    return run_config_with(args, fastv), notes


def fastv_config_from_args(
    args: argparse.Namespace, agg_layer: int, attention_rank: int, method: str, alpha: float,
    flag_names: dict[str, str] | None = None,
) -> FastVConfig:
    """A `FastVConfig` with the span flags and seed of `args`; `UsageError` naming the flag when a value is bad
    (`flag_names` maps config fields to the flags that gave them, e.g. the sweep's `--ranks`)."""
    try:
        return FastVConfig(
            agg_layer=agg_layer,
            attention_rank=attention_rank,
            token_selection_method=method,
            weighted_alpha=alpha,
            sys_length=args.fast_v_sys_length,
            image_token_length=args.fast_v_image_token_length,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(_flag_names(str(exc), flag_names)) from exc


def run_config_with(args: argparse.Namespace, fastv: FastVConfig | None) -> RunConfig:
    """The `RunConfig` of the prompt/generation flags of `args` with `fastv` (None = baseline)."""
    try:
        return RunConfig(
            fastv=fastv,
            conv_mode=args.conv_mode,
            single_pred_prompt=args.single_pred_prompt,
            image_aspect_ratio=args.image_aspect_ratio or "pad",
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(_flag_names(str(exc))) from exc


_FLAG_OF_FIELD = {
    "agg_layer": "--fast-v-agg-layer",
    "attention_rank": "--fast-v-attention-rank",
    "weighted_alpha": "--fast-v-weighted-alpha",
    "token_selection_method": "--fast-v-token-selection-method",
    "sys_length": "--fast-v-sys-length",
    "image_token_length": "--fast-v-image-token-length",
    "image_aspect_ratio": "--image-aspect-ratio",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
}


def _flag_names(message: str, flag_names: dict[str, str] | None = None) -> str:
    """Config field names in a message -> the command-line flags users typed."""
    for field, flag in {**_FLAG_OF_FIELD, **(flag_names or {})}.items():
        message = message.replace(f"{field}=", f"{flag} ").replace(f"{field} ", f"{flag} ")
    return message


def check_general_flags(args: argparse.Namespace) -> None:
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num-samples {args.num_samples} must be >= 1 (leave it out for all questions)")
    num_chunks, chunk_idx = getattr(args, "num_chunks", 1), getattr(args, "chunk_idx", 0)
    if num_chunks < 1:
        raise UsageError(f"--num-chunks {num_chunks} must be >= 1")
    if not 0 <= chunk_idx < num_chunks:
        raise UsageError(f"--chunk-idx {chunk_idx} must be in [0, {num_chunks - 1}] for --num-chunks {num_chunks}")
    if args.model_path is None:
        raise UsageError(f"--model-path is required (or set {ENV_VAR}=1 for the embedded tiny model)")
    if args.question_file is None:
        raise UsageError(f"--question-file is required (or set {ENV_VAR}=1 for the embedded sample)")


def prepare_questions(args: argparse.Namespace) -> tuple[QuestionSet, str | None, list[str]]:
    """The selected questions, the image folder and the problems found in them (missing images, bad entries)."""
    try:
        questions = load_questions(args.question_file, args.split)
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    questions = questions.head(args.num_samples)
    if len(questions) == 0:
        raise UsageError(f"--question-file {args.question_file} holds no questions")
    image_folder = args.image_folder
    if image_folder is None and questions.format == "official":
        image_folder = os.path.join(os.path.dirname(questions.path), "images", questions.split)
    with_images = sum(1 for q in questions.questions if q.image is not None and q.error is None)
    if with_images and image_folder is None:
        raise UsageError(f"--image-folder is required: {with_images} questions of {args.question_file} have images")
    if image_folder is not None and with_images and not os.path.isdir(image_folder):
        raise UsageError(f"--image-folder {image_folder} does not exist ({with_images} questions need images)")
    problems = [q.error for q in questions.questions if q.error] + missing_images(questions.questions, image_folder)
    return questions, image_folder, problems


def describe_inputs(questions: QuestionSet, image_folder, spec: ModelSpec, device, dtype,
                    problems: list[str]) -> list[str]:
    """Dry-run lines about CUDA, the model, the questions, the images and the problems found (shared)."""
    return [
        f"  CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.device_count()} GPUs: {torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        f"  device {device}, dtype {str(dtype).replace('torch.', '')}",
        f"  model: {spec.path} ({spec.format} format, {spec.num_layers} decoder layers, "
        f"{spec.num_image_tokens} image tokens per image)",
        f"  questions: {questions.path} ({questions.format} format"
        + (f", split {questions.split}" if questions.split else "")
        + f", {questions.num_in_file} in file, {len(questions)} selected; sha256 {questions.sha256[:12]}...)",
        f"  images: {image_folder} ({sum(1 for q in questions.questions if q.image)} questions with an image)",
        f"  problems: {len(problems)}" + "".join(f"\n    - {p}" for p in problems[:10])
        + (f"\n    ... and {len(problems) - 10} more" if len(problems) > 10 else ""),
    ]


def describe(args, run_config: RunConfig, questions: QuestionSet, image_folder, spec: ModelSpec, device,
             dtype, shards: int, problems: list[str]) -> str:
    fastv = run_config.fastv
    lines = [
        "Dry run: nothing is evaluated.",
        *describe_inputs(questions, image_folder, spec, device, dtype, problems),
        f"  configuration: {run_config.label}; prompt {run_config.conv_mode}, single-pred-prompt "
        f"{run_config.single_pred_prompt}, images {run_config.image_aspect_ratio}; "
        + ("greedy" if run_config.temperature == 0 else f"temperature {run_config.temperature}")
        + f", max {run_config.max_new_tokens} new tokens",
    ]
    if fastv is not None:
        lines.append(
            f"  FastV: layers 0..{fastv.agg_layer - 1} see all image tokens, layers {fastv.agg_layer}.."
            f"{(spec.num_layers or 0) - 1} keep {fastv.attention_rank} of {spec.num_image_tokens}, chosen by "
            f"{fastv.token_selection_method}"
            + (f" (alpha {fastv.weighted_alpha})" if fastv.token_selection_method == "weighted_combination" else "")
        )
    out = os.path.abspath(args.output_dir)
    name = result_file_name(run_config)
    if shards > 1:
        lines.append(f"  chunks: {shards} ({'accelerate' if args.num_chunks == 1 else f'chunk {args.chunk_idx}'})")
    lines.append(f"  would write: {os.path.join(out, name)} and {os.path.join(out, samples_file_name(run_config))}"
                 + (" (starting over: --overwrite)" if args.overwrite else " (resuming if present)"))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------------------


def _distributed_state(device_flag: str):
    """accelerate's PartialState when launched with more than one process (accelerate launch / torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
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
        return _main(args, defaults, argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigurationMismatch, EvaluationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished samples are saved; re-run the same command to resume", file=sys.stderr)
        return 130


@dataclass
class Inputs:
    """What the flags point at, checked before the model loads."""

    questions: QuestionSet
    image_folder: str | None
    problems: list[str]  # questions that cannot be evaluated (malformed entries, missing images)
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype


def resolve_paths(args: argparse.Namespace) -> None:
    """Apply `FASTV_EMBEDDED=1` (printing what it replaces), then check the general flags."""
    args.model_path, args.question_file, args.image_folder, notice = resolve_embedded(
        args.model_path, args.question_file, args.image_folder
    )
    if notice:
        print(notice)
    check_general_flags(args)


def prepare_inputs(args: argparse.Namespace) -> Inputs:
    """Read and check the questions and images, the model path's config, the device and dtype (no weights loaded);
    `UsageError` for anything that would fail later."""
    questions, image_folder, problems = prepare_questions(args)
    if problems and args.on_error == "fail":
        raise UsageError(f"{len(problems)} bad questions (--on-error fail): " + "; ".join(problems[:5]))
    try:
        spec = inspect_model_path(args.model_path)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.model_base is not None and spec.format != "original":
        raise UsageError(f"--model-base applies to original-format checkpoints; {args.model_path} is a complete "
                         "transformers-format checkpoint")
    return Inputs(questions, image_folder, problems, spec, device, dtype)


def fit_to_model(args: argparse.Namespace, run_config: RunConfig, spec: ModelSpec,
                 flag_names: dict[str, str] | None = None) -> None:
    """Take the checkpoint's image preprocessing unless `--image-aspect-ratio` was given, and check the FastV
    settings against the model's layers and image tokens (`UsageError`)."""
    if args.image_aspect_ratio is None and spec.image_aspect_ratio in ("pad", "crop"):
        run_config.image_aspect_ratio = spec.image_aspect_ratio
    inconsistent = check_run(spec.num_layers, spec.num_image_tokens, run_config)
    if inconsistent:
        raise UsageError(_flag_names("; ".join(inconsistent), flag_names))


def note_input_warnings(run_config: RunConfig, spec: ModelSpec, problems: list[str]) -> None:
    """Print the notes about a span flag that disagrees with the model and about questions that cannot run."""
    expected = run_config.fastv and run_config.fastv.image_token_length
    if expected is not None and spec.num_image_tokens is not None and expected != spec.num_image_tokens:
        print(f"note: --fast-v-image-token-length {expected} but the model makes {spec.num_image_tokens} image "
              "tokens per image; the detected count is used", file=sys.stderr)
    if problems:
        print(f"warning: {len(problems)} questions cannot be evaluated and will be recorded as errors (counted "
              f"wrong): {problems[0]}" + (" ..." if len(problems) > 1 else ""), file=sys.stderr)


def _main(args: argparse.Namespace, defaults: dict, argv) -> int:
    resolve_paths(args)
    run_config, notes = run_config_from_args(args, defaults)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    inputs = prepare_inputs(args)
    questions, image_folder, problems = inputs.questions, inputs.image_folder, inputs.problems
    spec, device, dtype = inputs.spec, inputs.device, inputs.dtype
    fit_to_model(args, run_config, spec)
    note_input_warnings(run_config, spec, problems)

    accelerate_launch = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if accelerate_launch and args.num_chunks > 1:
        raise UsageError("--num-chunks/--chunk-idx and a multi-process launch (accelerate) both shard the questions; "
                         "use one of them")
    if args.dry_run:
        shards = int(os.environ.get("WORLD_SIZE", "1")) if accelerate_launch else args.num_chunks
        print(describe(args, run_config, questions, image_folder, spec, device, dtype, shards, problems))
        return 0

    state = _distributed_state(args.device)
    num_chunks, chunk_idx = args.num_chunks, args.chunk_idx
    if state is not None:
        num_chunks, chunk_idx = state.num_processes, state.process_index
        if state.device.type == "cuda":
            device = state.device
    if args.answers_file and num_chunks > 1 and state is not None:
        root, ext = os.path.splitext(args.answers_file)
        args.answers_file = f"{root}.chunk{chunk_idx}of{num_chunks}{ext or '.jsonl'}"

    command = shlex.join([sys.argv[0] or "eval_scivqa.py"] + list(argv if argv is not None else sys.argv[1:]))
    with warnings.catch_warnings():
        warnings.filterwarnings("once", message="FastV: ")
        failure = None
        try:
            loaded = model_loading.load_model(args.model_path, args.model_base, device=device, dtype=args.dtype)
            options = RunOptions(
                output_dir=args.output_dir, image_folder=image_folder, overwrite=args.overwrite,
                on_error=args.on_error, save_selection=args.save_selection, num_chunks=num_chunks,
                chunk_idx=chunk_idx, num_samples=args.num_samples, answers_file=args.answers_file, command=command,
                progress=not args.no_progress,
            )
            result = evaluate(loaded.model, loaded.processor, questions, run_config, options, model_info=loaded.info)
        except Exception as exc:  # noqa: BLE001 - re-raised after the other processes are released
            if state is None:
                raise
            failure = exc
    if state is not None:
        state.wait_for_everyone()
        if failure is not None:
            raise failure
        if not state.is_main_process:
            return 0
        files = [os.path.join(args.output_dir, samples_file_name(run_config, num_chunks, i))
                 for i in range(num_chunks)]
        result = merge_chunks(files, args.output_dir, overwrite=args.overwrite, command=command)
    if num_chunks > 1 and state is None:
        print(format_summary(result))
        print(f"  chunk {chunk_idx} of {num_chunks} written to {result['samples_path']}; when every chunk is done, "
              f"merge them: fastv-merge-chunks --output-dir {args.output_dir}")
        return 0
    print(format_summary(result, result.get("result_file")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
