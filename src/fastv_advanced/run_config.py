"""What one evaluation run does, and the names and identity derived from it.

- `RunConfig`: the pruning (a `FastVConfig`, or None for the unpruned baseline) plus the prompt and generation
  settings. `FieldError` names the field of a bad value so that a command line can name its flag.
- `result_stem` / `result_file_name` / `samples_file_name`: the guide's file names.
- `fingerprint_config`: everything that changes a sample's result; its hash (`run_files.fingerprint_of`) decides
  whether existing files are resumed or refused.
- `model_config_section`: the result file's `model_config` (the guide's flag names).
- `check_run`: a configuration against a model's layer and image-token counts.

This is the only module around the core that builds a `FastVConfig` or reads its fields: the label, the file
names, the fingerprint, `model_config`, the model-shape checks, the hooks a run installs (`RunConfig.apply`), the
FLOPs settings, the grid's alphas and the dry-run description are all derived here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass

import torch

from .config import FastVConfig
from .model_loading import ModelInfo
from .prompting import get_template
from .run_files import FORMAT_VERSION as RESULT_FORMAT
from .scienceqa import QuestionSet

RESULT_PREFIX = "scienceqa_results"
GUIDE_ATTENTION_RANK = 288
GUIDE_AGG_LAYER = 2
WEIGHTED = "weighted_combination"
DEFAULT_ALPHA = 0.5  # --fast-v-weighted-alpha's default: what a run of another method records


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
    """What one evaluation run does with a loaded model: FastV (None = baseline), prompt and generation settings.

    temperature 0 means greedy decoding. `seed` seeds the `random` strategy and sampling, per sample (mixed with the
    question id) so that a resumed or sharded run makes the same choices. A bad value raises `FieldError`.
    """

    fastv: FastVConfig | None = None
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

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fastv"] = self.fastv.to_dict() if self.fastv is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The inverse of `to_dict` (e.g. the `run` of a JSONL header's configuration)."""
        fastv = data["fastv"]
        return cls(
            fastv=FastVConfig(**fastv) if fastv is not None else None,
            **{key: value for key, value in data.items() if key != "fastv"},
        )

    @property
    def label(self) -> str:
        """A short human-readable name: `baseline` or `FastV max_head (R=288, K=2)`."""
        if self.fastv is None:
            return "baseline"
        fastv = self.fastv
        method = fastv.token_selection_method
        if method == WEIGHTED:
            method += f" alpha={fastv.weighted_alpha!r}"
        budget = f"R={fastv.attention_rank}" if fastv.attention_rank is not None else f"ratio={_keep_ratio(fastv)!r}"
        return f"FastV {method} ({budget}, K={fastv.agg_layer})"

    def apply(self, model: torch.nn.Module):
        """Install the pruning hooks on `model`: the pruner (`.remove()`, `.reseed(seed)`, `.last_selection`), or
        None for the baseline."""
        if self.fastv is None:
            return None
        from .pruning import apply_fastv

        return apply_fastv(model, self.fastv)

    @property
    def pruned_from_layer(self) -> int | None:
        """The first decoder layer that runs on the kept tokens only (K), None for the baseline."""
        return self.fastv.agg_layer if self.fastv is not None else None

    def flops_settings(self) -> dict:
        """The pruning settings the result's `flops_info` records: `agg_layer` and `attention_rank` (None when
        unpruned)."""
        fastv = self.fastv
        return {
            "agg_layer": fastv.agg_layer if fastv else None,
            "attention_rank": fastv.attention_rank if fastv else None,
        }


def result_stem(run_config: RunConfig) -> str:
    """The guide's result name without `.json`.

    `scienceqa_results_baseline`, `scienceqa_results_fastv_{method}`, `..._weighted_combination_alpha0.7`;
    `_rank{R}_k{K}` is appended when R != 288 or K != 2 (`_ratio{r}_k{K}` for a keep ratio). A
    `package.module:function` method has its `:` replaced by `-`.
    """
    fastv = run_config.fastv
    if fastv is None:
        return f"{RESULT_PREFIX}_baseline"
    method = re.sub(r"[^A-Za-z0-9_.-]", "-", fastv.token_selection_method)
    stem = f"{RESULT_PREFIX}_fastv_{method}"
    if fastv.token_selection_method == WEIGHTED:
        stem += f"_alpha{float(fastv.weighted_alpha)!r}"
    if fastv.attention_rank is None:
        stem += f"_ratio{_keep_ratio(fastv)!r}_k{fastv.agg_layer}"
    elif fastv.attention_rank != GUIDE_ATTENTION_RANK or fastv.agg_layer != GUIDE_AGG_LAYER:
        stem += f"_rank{fastv.attention_rank}_k{fastv.agg_layer}"
    return stem


def result_file_name(run_config: RunConfig) -> str:
    """The guide's result file name, e.g. `scienceqa_results_fastv_max_head.json`."""
    return result_stem(run_config) + ".json"


def samples_file_name(run_config: RunConfig, num_chunks: int = 1, chunk_idx: int = 0) -> str:
    """The per-sample JSONL beside the result: `<stem>.jsonl`, or `<stem>.chunk{i}of{n}.jsonl` for a chunk."""
    stem = result_stem(run_config)
    return f"{stem}.jsonl" if num_chunks == 1 else f"{stem}.chunk{chunk_idx}of{num_chunks}.jsonl"


def fingerprint_config(run_config: RunConfig, model_info: ModelInfo, questions: QuestionSet) -> dict:
    """Everything that changes the per-sample results (not the sample count, chunking or output options)."""
    run = run_config.to_dict()
    if run["fastv"] is not None:
        run["fastv"] = _fastv_identity(run["fastv"])
    return {
        "protocol": RESULT_FORMAT,
        "run": run,
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
    """The guide's `model_config`: its flag names and values, plus the model and generation settings."""
    return {
        "model_path": model_info.model_path,
        "model_base": model_info.model_base,
        "model_format": model_info.format,
        "conv_mode": run_config.conv_mode,
        "single_pred_prompt": run_config.single_pred_prompt,
        **_guide_flags(run_config.fastv),
        "temperature": run_config.temperature,
        "max_new_tokens": run_config.max_new_tokens,
        "image_aspect_ratio": run_config.image_aspect_ratio,
        "seed": run_config.seed,
        "dtype": model_info.dtype,
        "device": model_info.device,
        "num_layers": model_info.num_layers,
        "num_image_tokens": model_info.num_image_tokens,
        "image_processor": model_info.image_processor,
    }


def check_run(num_layers: int | None, num_image_tokens: int | None, run_config: RunConfig) -> list[FieldError]:
    """Inconsistencies between the pruning of `run_config` and a model's shape (empty when fine; None = unknown)."""
    fastv = run_config.fastv
    if fastv is None:
        return []
    problems = []
    if num_layers is not None and not 1 <= fastv.agg_layer < num_layers:
        problems.append(FieldError(
            "agg_layer", str(fastv.agg_layer),
            f" is outside [1, {num_layers - 1}]: the model has {num_layers} decoder layers",
        ))
    if num_image_tokens is not None and fastv.attention_rank is not None and fastv.attention_rank > num_image_tokens:
        problems.append(FieldError(
            "attention_rank", str(fastv.attention_rank),
            f" is larger than the model's {num_image_tokens} image tokens (allowed: 0 to {num_image_tokens})",
        ))
    return problems


# -- FastV specifics ------------------------------------------------------------------------------------------------


def fastv_config(
    *,
    agg_layer: int,
    attention_rank: int | None,
    method: str,
    alpha: float = DEFAULT_ALPHA,
    sys_length: int | None = None,
    image_token_length: int | None = None,
    seed: int = 0,
) -> FastVConfig:
    """A `FastVConfig`; a bad value raises `FieldError` naming the field (a plain `ValueError` for a problem of
    no single field)."""
    try:
        return FastVConfig(
            agg_layer=agg_layer, attention_rank=attention_rank, token_selection_method=method,
            weighted_alpha=alpha, sys_length=sys_length, image_token_length=image_token_length, seed=seed,
        )
    except ValueError as exc:
        raise _field_error(str(exc)) from exc


_FASTV_FIELDS = frozenset(f.name for f in dataclasses.fields(FastVConfig))
_FIELD_MESSAGE = re.compile(r"^(?P<field>\w+)[= ](?P<value>'[^']*'|[^\s:;,]+)(?P<problem>.*)$", re.DOTALL)


def _field_error(message: str) -> ValueError:
    """`FastVConfig`'s message (`agg_layer=0 is invalid: ...`, `token_selection_method 'x' is not ...`) as a
    `FieldError` of the field it starts with; a plain `ValueError` when it starts with no field."""
    match = _FIELD_MESSAGE.match(message)
    if match is None or match["field"] not in _FASTV_FIELDS:
        return ValueError(message)
    return FieldError(match["field"], match["value"], match["problem"], message)


def alphas_of(method: str, alphas: tuple[float, ...]) -> tuple[float, ...]:
    """The alphas a grid gives `method`: all of them for weighted_combination, the default for the others."""
    return alphas if method == WEIGHTED else (DEFAULT_ALPHA,)


def uses_alpha(method: str) -> bool:
    """Whether `method` reads `weighted_alpha`."""
    return method == WEIGHTED


def describe_pruning(run_config: RunConfig, num_layers: int | None, num_image_tokens: int | None) -> str | None:
    """One dry-run line about what the pruning does (None for the baseline)."""
    fastv = run_config.fastv
    if fastv is None:
        return None
    return (
        f"FastV: layers 0..{fastv.agg_layer - 1} see all image tokens, layers {fastv.agg_layer}.."
        f"{(num_layers or 0) - 1} keep {fastv.attention_rank} of {num_image_tokens}, chosen by "
        f"{fastv.token_selection_method}"
        + (f" (alpha {fastv.weighted_alpha})" if fastv.token_selection_method == WEIGHTED else "")
    )


def expected_image_tokens(run_config: RunConfig) -> int | None:
    """The image-token count the guide's `--fast-v-image-token-length` expects (None when not given)."""
    return run_config.fastv.image_token_length if run_config.fastv is not None else None


def _keep_ratio(fastv: FastVConfig) -> float:
    return 0.5 if fastv.keep_ratio is None else float(fastv.keep_ratio)


def _fastv_identity(fastv: dict) -> dict:
    """The FastV fields that change a result. The guide's expected span only triggers a warning (the detected
    span is used), and the built-in strategies other than weighted_combination ignore alpha."""
    fastv = dict(fastv)
    del fastv["sys_length"], fastv["image_token_length"]
    if fastv["token_selection_method"] in ("max_head", "avg_all_heads", "random"):
        del fastv["weighted_alpha"]
    return fastv


def _guide_flags(fastv: FastVConfig | None) -> dict:
    """The guide's FastV flags as `model_config` records them (None when unpruned)."""
    return {
        "use_fast_v": fastv is not None,
        "fast_v_sys_length": fastv.sys_length if fastv else None,
        "fast_v_image_token_length": fastv.image_token_length if fastv else None,
        "fast_v_attention_rank": fastv.attention_rank if fastv else None,
        "fast_v_keep_ratio": fastv.keep_ratio if fastv else None,
        "fast_v_agg_layer": fastv.agg_layer if fastv else None,
        "fast_v_token_selection_method": fastv.token_selection_method if fastv else None,
        "fast_v_weighted_alpha": fastv.weighted_alpha if fastv else None,
    }
