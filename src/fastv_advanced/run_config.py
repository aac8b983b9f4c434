"""What one evaluation run does, and the names and identity derived from it.

- `RunConfig`: the pruning method (any `PruningMethod`, or None for the unpruned baseline) plus the prompt and
  generation settings. `FieldError` names the field of a bad value so that a command line can name its flag.
- `result_stem` / `result_file_name` / `samples_file_name`: `scienceqa_results_<method's file stem>` (the guide's
  names for FastV).
- `fingerprint_config`: everything that changes a sample's result; its hash (`run_files.fingerprint_of`) decides
  whether existing files are resumed or refused.
- `model_config_section`: the result file's `model_config`.
- `check_run`: a configuration against a model's layer and image-token counts.

Everything here reads a method only through `PruningMethod`'s interface (its parameters, label, file stem,
fingerprint section, schedule), so a method written outside the package gets its names and checks for free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch

from .methods import PruningMethod, build_method, get_method_class, method_from_run, method_record
from .model_loading import ModelInfo
from .prompting import get_template
from .run_files import FORMAT_VERSION as RESULT_FORMAT
from .scienceqa import QuestionSet

RESULT_PREFIX = "scienceqa_results"


class FieldError(ValueError):
    """A bad value of one configuration field.

    `field` is the field's name (`agg_layer`), `value` the value as the message shows it (`0`, `'maxhead'`) and
    `problem` the rest of the message (` is invalid: ...`). `str()` is the message (by default
    `agg_layer=0 is invalid: ...`); `for_flag("--fast-v-agg-layer")` says the same of the flag that gave the value:
    `--fast-v-agg-layer 0 is invalid: ...`.
    """

    def __init__(self, field: str, value: str, problem: str, message: str | None = None):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(message if message is not None else f"{field}={value}{problem}")

    def for_flag(self, flag: str) -> str:
        return f"{flag} {self.value}{self.problem}"


@dataclass
class RunConfig:
    """What one evaluation run does with a loaded model: a pruning method (None = baseline), prompt and generation
    settings.

    temperature 0 means greedy decoding. `seed` seeds randomised methods and sampling, per sample (mixed with the
    question id) so that a resumed or sharded run makes the same choices. A bad value raises `FieldError`.
    """

    method: PruningMethod | None = None
    conv_mode: str = "vicuna_v1"
    single_pred_prompt: bool = False
    image_aspect_ratio: str = "pad"
    temperature: float = 0.0
    max_new_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        get_template(self.conv_mode)
        if self.image_aspect_ratio not in ("pad", "crop"):
            raise FieldError("image_aspect_ratio", repr(self.image_aspect_ratio), ": choose 'pad' or 'crop'")
        if not (self.temperature >= 0) or math.isinf(self.temperature):
            raise FieldError("temperature", repr(self.temperature), " must be >= 0 (0 = greedy)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise FieldError("max_new_tokens", repr(self.max_new_tokens), " must be an integer >= 1")

    def settings(self) -> dict:
        """The prompt and generation settings (every field but the method)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method"}

    def to_dict(self) -> dict:
        """The run as JSONL headers record it: the method's run section (`PruningMethod.run_section`; for the
        baseline `{"fastv": None}`, the format of files written before methods were named) and the settings."""
        section = self.method.run_section() if self.method is not None else {"fastv": None}
        return {**section, **self.settings()}

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The inverse of `to_dict` (e.g. the `run` of a JSONL header's configuration)."""
        settings = {f.name: data[f.name] for f in fields(cls) if f.name != "method" and f.name in data}
        return cls(method=method_from_run(data), **settings)

    @property
    def label(self) -> str:
        """A short human-readable name: `baseline` or the method's run label (`FastV max_head (R=288, K=2)`)."""
        return "baseline" if self.method is None else self.method.run_label()

    def apply(self, model: torch.nn.Module):
        """Install the pruning hooks on `model`: the pruner (`.remove()`, `.reseed(seed)`, `.selections`), or
        None for the baseline."""
        if self.method is None:
            return None
        from .pruning import apply_pruning

        return apply_pruning(model, self.method)


def result_stem(run_config: RunConfig) -> str:
    """The result name without `.json`: `scienceqa_results_baseline` or `scienceqa_results_<file stem>` (FastV:
    the guide's `scienceqa_results_fastv_{rule}`, `..._weighted_combination_alpha0.7`, `_rank{R}_k{K}` off R=288,
    K=2; another method: its name and each parameter that differs from its default)."""
    if run_config.method is None:
        return f"{RESULT_PREFIX}_baseline"
    return f"{RESULT_PREFIX}_{run_config.method.file_stem()}"


def result_file_name(run_config: RunConfig) -> str:
    """The result file name, e.g. `scienceqa_results_fastv_max_head.json`."""
    return result_stem(run_config) + ".json"


def samples_file_name(run_config: RunConfig, num_chunks: int = 1, chunk_idx: int = 0) -> str:
    """The per-sample JSONL beside the result: `<stem>.jsonl`, or `<stem>.chunk{i}of{n}.jsonl` for a chunk."""
    stem = result_stem(run_config)
    return f"{stem}.jsonl" if num_chunks == 1 else f"{stem}.chunk{chunk_idx}of{num_chunks}.jsonl"


def fingerprint_config(run_config: RunConfig, model_info: ModelInfo, questions: QuestionSet) -> dict:
    """Everything that changes the per-sample results (not the sample count, chunking or output options)."""
    method = run_config.method
    section = method.fingerprint_section() if method is not None else {"fastv": None}
    return {
        "protocol": RESULT_FORMAT,
        "run": {**section, **run_config.settings()},
        "model": {
            "path": model_info.model_path,
            "base": model_info.model_base,
            "format": model_info.format,
            "dtype": model_info.dtype,
            "device_type": torch.device(model_info.device).type,
        },
        "questions": {"format": questions.format, "split": questions.split, "sha256": questions.sha256},
    }


def model_config_section(run_config: RunConfig, model_info: ModelInfo) -> dict:
    """The result file's `model_config`: the method (name, parameters, label; FastV adds the guide's flag names),
    the model, and the prompt and generation settings."""
    method = run_config.method
    return {
        "model_path": model_info.model_path,
        "model_base": model_info.model_base,
        "model_format": model_info.format,
        "conv_mode": run_config.conv_mode,
        "single_pred_prompt": run_config.single_pred_prompt,
        "pruning_method": method_record(method) if method is not None else None,
        "pruning_label": method.label() if method is not None else "Baseline",
        **(method.result_fields() if method is not None else {"use_fast_v": False}),
        "temperature": run_config.temperature,
        "max_new_tokens": run_config.max_new_tokens,
        "image_aspect_ratio": run_config.image_aspect_ratio,
        "seed": run_config.seed,
        "dtype": model_info.dtype,
        "device": model_info.device,
        "num_layers": model_info.num_layers,
        "num_image_tokens": model_info.num_image_tokens,
        "image_processor": model_info.image_processor,
        "model_card": {
            "model_type": model_info.model_type,
            "architecture": model_info.architecture,
            "decoder": model_info.decoder,
            "vision_tower": model_info.vision_tower,
            # LLaVA-1.5 follows the guide (conv_mode, chunk-wise tokens, image_aspect_ratio); the other families
            # render the processor's chat template and let the processor resize the image (conv_mode and
            # image_aspect_ratio above do not apply to them)
            "prompt_format": "conv_mode" if model_info.model_type == "llava" else "chat_template",
        },
    }


def check_run(num_layers: int | None, num_image_tokens: int | None, run_config: RunConfig) -> list[ValueError]:
    """Inconsistencies between the pruning of `run_config` and a model's shape (empty when fine; None = unknown):
    the method's own schedule and token counts for that shape, as `FieldError`s where a message names a field."""
    method = run_config.method
    if method is None or num_layers is None:
        return []
    try:
        method.stages(num_layers)
        if num_image_tokens is not None:
            method.kept_per_stage(num_layers, num_image_tokens)
    except NotImplementedError:
        return []
    except ValueError as exc:
        return [field_error(str(exc), type(method))]
    return []


def build_checked(name: str, params: dict) -> PruningMethod:
    """`build_method(name, params)`; a bad value raises `FieldError` naming the field (a plain `ValueError` for a
    problem of no single field)."""
    try:
        cls = get_method_class(name)
        return build_method(name, params)
    except ValueError as exc:
        if "cls" not in locals():
            raise
        raise field_error(str(exc), cls) from exc


_FIELD_MESSAGE = re.compile(r"^(?P<field>\w+)[= :](?P<value>'[^']*'|[^\s:;,]+)(?P<problem>.*)$", re.DOTALL)


def field_error(message: str, cls: type) -> ValueError:
    """A method's message (`agg_layer=0 is invalid: ...`, `token_selection_method 'x' is not ...`) as a
    `FieldError` of the parameter it starts with; a plain `ValueError` when it starts with no parameter."""
    match = _FIELD_MESSAGE.match(message)
    if match is None or match["field"] not in {f.name for f in fields(cls)}:
        return ValueError(message)
    return FieldError(match["field"], match["value"], match["problem"], message)


def describe_pruning(run_config: RunConfig, num_layers: int | None, num_image_tokens: int | None) -> str | None:
    """One dry-run line about what the pruning does (None for the baseline): the stages and what each keeps."""
    method = run_config.method
    if method is None:
        return None
    try:
        stages = method.kept_per_stage(num_layers or 0, num_image_tokens or 0) if num_layers else []
    except (NotImplementedError, ValueError):
        stages = []
    plan = ", ".join(f"from layer {layer} keep {kept} of {num_image_tokens}" for layer, kept in stages)
    return f"{method.label()}: " + (plan or "schedule known once the model is loaded")
