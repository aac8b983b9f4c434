"""What `eval_scivqa.py` and `fastv-sweep` share: flags, the checks before the model loads, how problems and
FastV's notices are printed.

- Argument groups: `add_data_arguments`, `add_prompt_arguments`, `add_fastv_span_arguments`, `add_run_arguments`.
- Errors: `UsageError` carries every problem found before evaluation (exit status 2); `flag_error` turns a
  configuration's `FieldError` into the message of the flag that gave the value (`FLAG_OF_FIELD`, or a command's
  own mapping such as the sweep's `--ranks`).
- `check_inputs(args, build_run_configs, flags)`: the flags, the model path, the device, the question file and its
  images, and the output folder, all checked before any weights load, every problem reported at once.
- `fastv_notices()`: FastV's warnings (`FastV: ...`) shown once each as a `notice:` line above the progress bars.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..embedded import ENV_VAR, embedded_enabled, resolve_embedded
from ..model_loading import ModelSpec, inspect_model_path, resolve_device, resolve_dtype
from ..methods import describe_methods
from ..run_config import FieldError, RunConfig, check_run
from ..run_loop import ON_ERROR_CHOICES
from ..scienceqa import DataError, QuestionSet, load_questions, missing_images

# Configuration fields -> the flags of a single run that give them.
FLAG_OF_FIELD = {
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


class UsageError(ValueError):
    """Flag, file or model problems found before evaluation (exit status 2); `problems` lists each one."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def flag_error(exc: ValueError, flags: Mapping[str, str] = FLAG_OF_FIELD) -> UsageError:
    """`exc` as the user's mistake: a `FieldError` of a field in `flags` names that flag, one of another field (a
    pruning method's parameter) names `--pruning-param`, anything else is kept."""
    if isinstance(exc, FieldError):
        if exc.field in flags:
            return UsageError(exc.for_flag(flags[exc.field]))
        return UsageError(f"--pruning-param {exc.field}={exc.value.strip(chr(39))}{exc.problem}")
    return UsageError(str(exc))


# -- pruning methods ------------------------------------------------------------------------------------------------


def add_method_arguments(parser: argparse.ArgumentParser, *, grid: bool) -> argparse._ArgumentGroup:
    """`--pruning-method`, `--pruning-param`, `--pruning-preset` (and, for a grid, `--flops-target`)."""
    group = parser.add_argument_group("pruning method (instead of the guide's FastV flags; the registered methods "
                                      "are listed at the end)")
    group.add_argument("--pruning-method", nargs="+" if grid else None, metavar="NAME", default=None,
                       help="a registered method or package.module:Class" + (" (several: each over the grid)" if grid
                                                                              else ""))
    group.add_argument("--pruning-param", action="append", default=[], metavar="KEY=VALUE",
                       help="a method parameter; repeat for several"
                       + (". VALUE may list grid values: ratio=0.3,0.5; lists in brackets: layers=[2,8,16],[2,4,6]"
                          if grid else "; lists as layers=2,8,16"))
    group.add_argument("--pruning-preset", nargs="+" if grid else None, metavar="LABEL", default=None,
                       help="a method's named setting, e.g. 192, 128 or 64 (its paper's token budgets); "
                       "--pruning-param values override it")
    if grid:
        group.add_argument("--flops-target", nargs="+", type=float, default=[], metavar="RATIO",
                           help="solve each method's budget parameter for these theoretical prefill FLOPs ratios "
                           "(a prompt of the model's image tokens + 100 text tokens)")
    return group


def methods_epilog() -> str:
    """The registered methods with their parameters and defaults, for the end of `--help`."""
    return "registered pruning methods (--pruning-method NAME, --pruning-param KEY=VALUE):\n  " + \
        describe_methods().replace("\n", "\n  ").replace("%", "%%")


def split_grid_values(text: str) -> list[str]:
    """`0.3,0.5` -> ['0.3', '0.5']; commas inside brackets stay: `[2,8,16],[2,4]` -> ['[2,8,16]', '[2,4]']."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return values + [current]


def parse_pruning_params(items: list[str], *, grid: bool) -> list[tuple[str, tuple[str, ...]]]:
    """`--pruning-param` texts -> [(key, values)] in order (one value each unless `grid`); `UsageError` on a
    malformed or repeated one."""
    parsed: dict[str, tuple[str, ...]] = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            problems.append(f"--pruning-param {item!r} is not KEY=VALUE")
        elif key in parsed:
            problems.append(f"--pruning-param {key} is given twice")
        else:
            parsed[key] = tuple(v.strip() for v in split_grid_values(value)) if grid else (value.strip(),)
    if problems:
        raise UsageError(*problems)
    return list(parsed.items())


def print_problems(exc: UsageError) -> None:
    for problem in exc.problems:
        print(f"error: {problem}", file=sys.stderr)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it says something (not None/False, not already in the help)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class RawEpilogHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The commands' help format, with the description and the epilog printed as written."""


def launched_processes() -> int:
    """How many processes a multi-process launcher (accelerate launch, torchrun) started: `WORLD_SIZE`, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def command_line(program: str, argv: list[str] | None) -> str:
    """The command as typed (recorded in the result files)."""
    return shlex.join([sys.argv[0] or program] + list(argv if argv is not None else sys.argv[1:]))


# -- flags ----------------------------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """`--model-path --model-base --question-file --image-folder --hf-dataset --hf-config --hf-image-dir --split
    --num-samples`."""
    data = parser.add_argument_group("model and data")
    data.add_argument("--model-path", help="transformers-format LLaVA folder or hub id (e.g. llava-hf/llava-1.5-7b-hf "
                      "in the local cache), or an original-format checkpoint folder (liuhaotian layout)")
    data.add_argument("--model-base", default=None, help="base LLM for original-format LoRA/projector-only "
                      "checkpoints (as in LLaVA's scripts)")
    data.add_argument("--question-file", help="LLaVA question file (JSON list of {id, image, conversations}), or the "
                      "official release's problems.json (or its folder) with pid_splits.json beside it")
    data.add_argument("--image-folder", default=None, help="folder the entries' 'image' paths are relative to; "
                      "default for the official release: <release>/images/<split>")
    data.add_argument("--hf-dataset", default=None, metavar="ID_OR_PATH", help="ScienceQA from HF datasets instead "
                      "of --question-file/--image-folder: a hub id in the local datasets cache (lmms-lab/ScienceQA, "
                      "derek-thomas/ScienceQA), a local copy's folder or a parquet file in their schema; prompts as "
                      "for the official release, images from the image column; needs pip install -e '.[hf]'")
    data.add_argument("--hf-config", default=None, help="configuration of --hf-dataset (lmms-lab/ScienceQA: "
                      "ScienceQA-IMG = the problems with an image, 2017 in test; ScienceQA-FULL = all)")
    data.add_argument("--hf-image-dir", default=None, help="where the images of --hf-dataset are written for the "
                      "evaluation (<id>/image.png, bytes unchanged); default: "
                      "~/.cache/fastv_advanced/hf_images/<sha256 prefix>")
    data.add_argument("--split", default=None, help="split of the official release (train, val, test, minival, ...; "
                      "default test) or of --hf-dataset (train, validation, test; default test); not for LLaVA "
                      "question files")
    data.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N questions "
                      "(default: all)")
    return data


def add_prompt_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Prompt and generation flags."""
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
    """The guide's expected image span, `--fast-v-sys-length` and `--fast-v-image-token-length`."""
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

    def batch_size(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
        return value

    run.add_argument("--batch-size", type=batch_size, default=1, metavar="N",
                     help="questions per generate: 1 = one at a time (the per-question latency); N > 1 = left-padded "
                     "batches of similar prompt length, the same predictions, more throughput on a GPU (latencies are "
                     "then per batch)")
    run.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="skip", help="a bad sample (malformed "
                     "entry, missing/corrupt image): skip = record it as an error (counted wrong) and go on; "
                     "fail = stop")
    run.add_argument("--dry-run", action="store_true", help="check CUDA, the model path, the data files and images "
                     "and the flags, print what the run would do, and exit without evaluating")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (nor transformers' loading bars)")
    return run


def run_config_with(args: argparse.Namespace, method, flags: Mapping[str, str] = FLAG_OF_FIELD) -> RunConfig:
    """The `RunConfig` of the prompt/generation flags of `args` with `method` (None = baseline); `UsageError`
    naming the flag of a bad value."""
    try:
        return RunConfig(
            method=method,
            conv_mode=args.conv_mode,
            single_pred_prompt=args.single_pred_prompt,
            image_aspect_ratio=args.image_aspect_ratio or "pad",
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
    except ValueError as exc:
        raise flag_error(exc, flags) from exc


# -- checks before the model loads ----------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What the flags point at, checked before the model loads."""

    questions: QuestionSet
    image_folder: str | None
    problems: list[str]  # questions that cannot be evaluated (malformed entries, missing images)
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype


class _Problems:
    """The problems of a command's inputs, collected so that all of them are reported at once."""

    def __init__(self):
        self.messages: list[str] = []

    def attempt(self, check: Callable[[], object]):
        """`check()`'s value, or None after noting the problems of its `UsageError`."""
        try:
            return check()
        except UsageError as exc:
            self.messages += exc.problems
            return None

    def raise_any(self) -> None:
        if self.messages:
            raise UsageError(*self.messages)


def resolve_paths(args: argparse.Namespace) -> None:
    """Apply `FASTV_EMBEDDED=1`, printing what it replaces; `UsageError` when this installation lacks the embedded
    files (they ship with a source checkout, not with a wheel)."""
    args.model_path, args.question_file, args.image_folder, notice = resolve_embedded(
        args.model_path, args.question_file, args.image_folder
    )
    if not notice:
        return
    print(notice)
    missing = [path for path in (args.model_path, args.question_file, args.image_folder) if not os.path.exists(path)]
    if missing:
        raise UsageError(
            f"{ENV_VAR}=1, but the embedded model and data are not in this installation ({', '.join(missing)} "
            "missing): they ship with a source checkout of the repository, not with an installed package. Run from "
            f"a clone installed with `pip install -e .`, or unset {ENV_VAR} and pass --model-path, --question-file "
            "and --image-folder"
        )


def check_inputs(
    args: argparse.Namespace, build_run_configs: Callable[[], list[RunConfig]], flags: Mapping[str, str]
) -> tuple[list[RunConfig], Inputs]:
    """The run configurations and the checked inputs; `UsageError` listing every problem found: flags, the
    configurations (`build_run_configs()` raising `UsageError`), the model path, device and dtype, the question
    file and images, the output folder, and each configuration against the model's shape (`flags` names the flag
    of a configuration field). Nothing heavy loads and nothing is written."""
    problems = _Problems()
    problems.attempt(lambda: _check_general_flags(args))
    run_configs = problems.attempt(build_run_configs)
    spec = problems.attempt(lambda: _inspect_model(args))
    device_dtype = problems.attempt(lambda: _device_and_dtype(args))
    data = problems.attempt(lambda: _prepare_questions(args))
    problems.attempt(lambda: _check_output_paths(args))
    if spec is not None and run_configs is not None:
        for run_config in run_configs:
            problems.attempt(lambda: fit_to_model(args, run_config, spec, flags))
    bad_questions = data[2] if data is not None else []
    if bad_questions and args.on_error == "fail":
        problems.messages.append(
            f"{len(bad_questions)} bad questions (--on-error fail): " + "; ".join(bad_questions[:5])
        )
    problems.raise_any()
    questions, image_folder, _ = data
    return run_configs, Inputs(questions, image_folder, bad_questions, spec, *device_dtype)


def _check_general_flags(args: argparse.Namespace) -> None:
    problems = []
    if args.num_samples is not None and args.num_samples < 1:
        problems.append(f"--num-samples {args.num_samples} must be >= 1 (leave it out for all questions)")
    num_chunks, chunk_idx = getattr(args, "num_chunks", 1), getattr(args, "chunk_idx", 0)
    if num_chunks < 1:
        problems.append(f"--num-chunks {num_chunks} must be >= 1")
    elif not 0 <= chunk_idx < num_chunks:
        problems.append(f"--chunk-idx {chunk_idx} must be in [0, {num_chunks - 1}] for --num-chunks {num_chunks}")
    if num_chunks > 1 and launched_processes() > 1:
        problems.append("--num-chunks/--chunk-idx and a multi-process launch (accelerate) both shard the questions; "
                        "use one of them")
    if problems:
        raise UsageError(*problems)


def _inspect_model(args: argparse.Namespace) -> ModelSpec:
    if args.model_path is None:
        raise UsageError(f"--model-path is required (or set {ENV_VAR}=1 for the embedded tiny model)")
    try:
        spec = inspect_model_path(args.model_path)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.model_base is not None and spec.format != "original":
        raise UsageError(f"--model-base applies to original-format checkpoints; {args.model_path} is a complete "
                         "transformers-format checkpoint")
    return spec


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    try:
        device = resolve_device(args.device)
        return device, resolve_dtype(args.dtype, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _prepare_questions(args: argparse.Namespace) -> tuple[QuestionSet, str | None, list[str]]:
    """The selected questions, the image folder and the questions that cannot be evaluated (malformed entries,
    missing images)."""
    if getattr(args, "hf_dataset", None) is not None:
        return _prepare_hf_questions(args)
    given = [flag for flag, value in (("--hf-config", getattr(args, "hf_config", None)),
                                      ("--hf-image-dir", getattr(args, "hf_image_dir", None))) if value is not None]
    if given:
        raise UsageError(f"{' and '.join(given)} apply only to --hf-dataset")
    if args.question_file is None:
        raise UsageError(f"--question-file is required (or --hf-dataset, or set {ENV_VAR}=1 for the embedded sample)",
                         *_missing_folder(args.image_folder))
    try:
        questions = load_questions(args.question_file, args.split).head(args.num_samples)
    except DataError as exc:
        raise UsageError(str(exc), *_missing_folder(args.image_folder)) from exc
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
    bad = [q.error for q in questions.questions if q.error] + missing_images(questions.questions, image_folder)
    return questions, image_folder, bad


def _prepare_hf_questions(args: argparse.Namespace) -> tuple[QuestionSet, str, list[str]]:
    """`_prepare_questions` for `--hf-dataset`: the split's questions, and their images written from the dataset to
    `--hf-image-dir` (default: a cache folder named by the question set's hash); a dry run writes nothing."""
    from ..hf_datasets import default_image_dir, load_hf_questions, write_images

    both = [flag for flag, value in (("--question-file", args.question_file), ("--image-folder", args.image_folder))
            if value is not None]
    if both:
        raise UsageError(
            f"--hf-dataset replaces {' and '.join(both)}: give either --hf-dataset or --question-file/--image-folder"
            + (f" ({ENV_VAR}=1 sets --question-file and --image-folder to the embedded data: unset it)"
               if embedded_enabled() else "")
        )
    try:
        hf = load_hf_questions(args.hf_dataset, args.hf_config, args.split,
                               progress=not getattr(args, "no_progress", False))
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    questions = hf.questions.head(args.num_samples)
    if len(questions) == 0:
        raise UsageError(f"--hf-dataset {args.hf_dataset} (split {hf.questions.split}) holds no questions")
    image_folder = str(args.hf_image_dir or default_image_dir(hf.questions.sha256))
    bad = [q.error for q in questions.questions if q.error]
    if not getattr(args, "dry_run", False):
        try:
            write_images(hf, image_folder, questions.questions)
        except OSError as exc:
            raise UsageError(f"the images of --hf-dataset cannot be written to {image_folder}: {exc} "
                             "(choose another folder with --hf-image-dir)") from exc
        bad += missing_images(questions.questions, image_folder)
    return questions, image_folder, bad


def _missing_folder(image_folder: str | None) -> list[str]:
    """The problem of a given `--image-folder` that does not exist, judged without the questions."""
    if image_folder is not None and not os.path.isdir(image_folder):
        return [f"--image-folder {image_folder} does not exist"]
    return []


def _check_output_paths(args: argparse.Namespace) -> None:
    problems = [folder_problem(args.output_dir, "--output-dir")]
    answers_file = getattr(args, "answers_file", None)
    if answers_file is not None:
        if os.path.isdir(answers_file):
            problems.append(f"--answers-file {answers_file} is a folder, not a file")
        else:
            problems.append(folder_problem(os.path.dirname(os.path.abspath(answers_file)), "--answers-file's folder"))
    problems = [p for p in problems if p is not None]
    if problems:
        raise UsageError(*problems)


def folder_problem(folder: str | os.PathLike, flag: str) -> str | None:
    """Why files cannot be written into `folder` (given by `flag`), None when they can.

    A folder that does not exist yet is judged by its nearest existing parent (the run creates it). Nothing is
    created: writability is probed with a temporary file that is removed at once (permissions alone do not tell,
    e.g. for root on a read-only or virtual file system such as /sys).
    """
    path = Path(os.path.abspath(folder))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            return f"{flag} {folder} is a file, not a folder"
        return f"{flag} {folder} cannot be created: {existing} is a file"
    try:
        handle, probe = tempfile.mkstemp(prefix=".fastv-write-check-", dir=existing)
    except OSError as exc:
        where = "" if existing == path else f" (it would be created in {existing})"
        return f"{flag} {folder} cannot be written{where}: {exc.strerror or exc}"
    os.close(handle)
    os.unlink(probe)
    return None


def fit_to_model(args: argparse.Namespace, run_config: RunConfig, spec: ModelSpec,
                 flags: Mapping[str, str] = FLAG_OF_FIELD) -> None:
    """Take the checkpoint's image preprocessing unless `--image-aspect-ratio` was given, and check the pruning
    against the model's layers and image tokens (`UsageError` naming the flags)."""
    if args.image_aspect_ratio is None and spec.image_aspect_ratio in ("pad", "crop"):
        run_config.image_aspect_ratio = spec.image_aspect_ratio
    inconsistent = check_run(spec.num_layers, spec.num_image_tokens, run_config)
    if inconsistent:
        raise UsageError("; ".join(flag_error(problem, flags).problems[0] for problem in inconsistent))


def note_input_warnings(run_config: RunConfig, spec: ModelSpec, problems: list[str]) -> None:
    """Print the notes about a span flag that disagrees with the model and about questions that cannot run."""
    if run_config.method is not None and spec.num_image_tokens is not None:
        notice = run_config.method.check_image_span([], spec.num_image_tokens)
        if notice:
            print(f"note: the model makes {spec.num_image_tokens} image tokens per image: {notice}", file=sys.stderr)
    if problems:
        print(f"warning: {len(problems)} questions cannot be evaluated and will be recorded as errors (counted "
              f"wrong): {problems[0]}" + (" ..." if len(problems) > 1 else ""), file=sys.stderr)


def describe_inputs(inputs: Inputs) -> list[str]:
    """Dry-run lines about CUDA, the model, the questions, the images and the problems found."""
    questions, spec, problems = inputs.questions, inputs.spec, inputs.problems
    cuda = torch.cuda.is_available()
    return [
        f"  CUDA available: {cuda}"
        + (f" ({torch.cuda.device_count()} GPUs: {torch.cuda.get_device_name(0)})" if cuda else ""),
        f"  device {inputs.device}, dtype {str(inputs.dtype).replace('torch.', '')}",
        f"  model: {spec.path} ({spec.format} format, {spec.num_layers} decoder layers, "
        f"{spec.num_image_tokens} image tokens per image)",
        f"  questions: {questions.path} ({questions.format} format"
        + (f", config {questions.config}" if questions.config else "")
        + (f", split {questions.split}" if questions.split else "")
        + f", {questions.num_in_file} in file, {len(questions)} selected; sha256 {questions.sha256[:12]}...)",
        f"  images: {inputs.image_folder} ({sum(1 for q in questions.questions if q.image)} questions with an image)",
        f"  problems: {len(problems)}" + "".join(f"\n    - {p}" for p in problems[:10])
        + (f"\n    ... and {len(problems) - 10} more" if len(problems) > 10 else ""),
    ]


# -- while running --------------------------------------------------------------------------------------------------

FASTV_WARNING_PREFIX = "FastV:"


@contextmanager
def fastv_notices():
    """Show each distinct warning whose message starts with `FastV:` once, as a `notice: FastV: ...` line on
    stderr written above any progress bar; other warnings are shown as usual. Restores the warning settings on
    exit. (The "once" filter alone does not do it: every progress bar mutates the warning filters, which resets
    the registry it uses.)"""
    from tqdm import tqdm

    seen: set[str] = set()
    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_once(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if not text.startswith(FASTV_WARNING_PREFIX):
                show(message, category, filename, lineno, file, line)
            elif text not in seen:
                seen.add(text)
                tqdm.write(f"notice: {text}", file=sys.stderr)

        warnings.filterwarnings("always", message=FASTV_WARNING_PREFIX)
        warnings.showwarning = show_once
        yield
