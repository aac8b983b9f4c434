"""The method API: a pruning method is a dataclass whose fields are its parameters.

A method declares its schedule (`stages`: before which decoder layers it prunes and what each stage needs to see)
and chooses, at each stage, which of the image tokens still present to keep (`choose`). The pruner
(`fastv_advanced.pruning`) owns the hooks, computes what a stage declared, does the top-k, the gathers and the KV
cache bookkeeping, so a method is a few dozen lines. Everything around the core (result file names, fingerprints,
labels, row order, plot colours, sweep grids, FLOPs) reads a method only through this class.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Stage:
    """One pruning step of a schedule.

    layer: the step runs before decoder layer `layer` (0 = on the language model's input embeddings); layers
        `layer..` see only the kept tokens.
    attention_layer: the stage needs the attention probabilities of the last prompt position at this decoder layer
        (over the image tokens still present). `layer - 1` reads what that layer computed; `layer` computes the
        stage layer's own attention from its input (its input norm, q/k projections and RoPE). None: not needed.
    keys_layer: the stage needs that layer's keys after RoPE for every current token (`StageInputs.keys`); same
        rules as `attention_layer`.
    hidden_states: the stage needs the input hidden states of `layer` (`StageInputs.hidden_states`).
    vision: the stage needs the vision tower's select layer (`StageInputs.vision`); only at layer 0.
    attention_rows: "last" (the last prompt position's row) or "text" (the rows of the Q positions at the end of
        the prompt, the text after the image block: `StageInputs.attention` is then [batch, heads, Q, n] and
        `StageInputs.query_is_text` says which of those rows are text after the image in each row).
    embeddings: the stage needs the language model's input embeddings of the whole prompt (`StageInputs.embeddings`).
    compact_positions: kept tokens are renumbered 0..S'-1 (positions close the gaps) instead of keeping their
        original positions.
    """

    layer: int
    attention_layer: int | None = None
    keys_layer: int | None = None
    hidden_states: bool = False
    compact_positions: bool = False
    vision: bool = False
    attention_rows: str = "last"
    embeddings: bool = False

    def __post_init__(self) -> None:
        if self.attention_rows not in ("last", "text"):
            raise ValueError(f"attention_rows={self.attention_rows!r}: choose 'last' or 'text'")


@dataclass
class VisionFeatures:
    """The vision tower's feature-select layer (the one whose output the projector reads), per image.

    cls_attention: FloatTensor[batch, heads, T], the [CLS] query's attention probabilities over its T tokens
        ([CLS] first, then the patches); keys: FloatTensor[batch, T, head_dim], that layer's keys (before scaling)
        averaged over heads; hidden_states: FloatTensor[batch, T, width], its output.
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor
    hidden_states: torch.Tensor


@dataclass
class StageInputs:
    """What a stage sees (only what it declared is filled in).

    num_image_tokens: n, the image tokens still present (every row has n).
    num_original_image_tokens: the prompt's image tokens before any stage.
    image_positions: LongTensor[batch, n], their positions in the current (already pruned) sequence, ascending.
    image_indices: LongTensor[batch, n], their indices among the prompt's original image tokens.
    attention: FloatTensor[batch, heads, n], the last prompt position's attention probabilities at the stage's
        `attention_layer`, restricted to those image tokens (softmax over the whole causal row), or None.
    hidden_states: FloatTensor[batch, S, hidden], the input of the stage's layer, or None.
    keys: FloatTensor[batch, S, kv_heads * head_dim], the stage's `keys_layer` keys after RoPE, or None.
    generator: a seeded `torch.Generator` (on the CPU) for methods with randomness.
    adapter: the model family's adapter (`final_norm`, `project_image_features`, ...), for methods that need one.
    vision: the vision tower's select-layer features (`VisionFeatures`), or None.
    query_is_text: BoolTensor[batch, Q] for `attention_rows="text"`: which of the last Q positions are text after
        the image block.
    embeddings: FloatTensor[batch, S0, hidden], the language model's input (original prompt), or None;
        original_image_positions: LongTensor[batch, N], where its image tokens are.
    image_grid: (rows, cols) of the image tokens in row-major order where the model gives every row the same
        one-image grid and no stage has dropped tokens yet (Qwen-VL), else None.
    """

    num_image_tokens: int
    num_original_image_tokens: int
    image_positions: torch.Tensor
    image_indices: torch.Tensor
    attention: torch.Tensor | None
    hidden_states: torch.Tensor | None
    generator: torch.Generator
    keys: torch.Tensor | None = None
    adapter: object = None
    vision: VisionFeatures | None = None
    query_is_text: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    original_image_positions: torch.Tensor | None = None
    image_grid: tuple[int, int] | None = None


@dataclass
class Choice:
    """A stage's answer, per batch row: either the `num_kept` highest `scores` [batch, n] (higher is kept), or the
    indices `kept` LongTensor[batch, R] into the n image tokens (any order; `scores` then optional, for display).
    `head_index` LongTensor[batch] when the choice used one head. `replacement` FloatTensor[batch, R, hidden]
    replaces the hidden states of the kept image tokens (in ascending order), for methods that merge tokens."""

    scores: torch.Tensor | None = None
    num_kept: int | None = None
    head_index: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    replacement: torch.Tensor | None = None


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(name: str, value, low=None, high=None, integer: bool = False) -> None:
    """ValueError naming the parameter and its allowed range when `value` is outside [low, high] (or not a number,
    or not an integer when `integer`)."""
    bounds = f"[{'-inf' if low is None else format(low, 'g')}, {'inf' if high is None else format(high, 'g')}]"
    if (not is_int(value)) if integer else (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{name}={value!r} is invalid: it must be {'an integer' if integer else 'a number'} in {bounds}")
    if math.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is outside the allowed range {bounds}")


def scale_stage_layers(stage_layers, num_layers: int, reference_layers: int = 32) -> tuple[int, ...]:
    """Stage layers of a `reference_layers`-layer schedule at the same relative depth of `num_layers` layers:
    s -> max(1, round_half_up(s * num_layers / reference_layers)); a layer not above the previous one moves to the
    previous + 1; then the list is pulled down from its end so that the last is at most num_layers - 1. ValueError
    when the stages do not fit."""
    mapped: list[int] = []
    for layer in stage_layers:
        x = max(1, math.floor(layer * num_layers / reference_layers + 0.5))
        mapped.append(max(x, mapped[-1] + 1) if mapped else x)
    for i in range(len(mapped) - 1, -1, -1):
        mapped[i] = min(mapped[i], num_layers - 1 - (len(mapped) - 1 - i))
    if not mapped or mapped[0] < 1:
        raise ValueError(f"{len(mapped)} stages {list(stage_layers)} do not fit a model of {num_layers} layers")
    return tuple(mapped)


def _format_value(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def _stem_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(_stem_value(v) for v in value)
    return _format_value(value)


@dataclass
class PruningMethod:
    """Base class of the pruning methods. Subclasses are dataclasses; their fields are the parameters.

    name: the registry name (`--pruning-method NAME`), also the start of result file names.
    display_name: how tables and plots call the method.
    budget_parameter: the field that sets how many tokens are kept (what a sweep solves for at a FLOPs target).
    not_in_results: fields that never change what the method answers (left out of fingerprints and labels).
    presets: named settings, e.g. the paper's "192", "128" and "64" token budgets for LLaVA-1.5 (576 image tokens).
    budget_choices: the values the budget parameter can take, when it is not a number on a scale.
    table_order: where the method's rows go in comparisons (lower first; then by name).
    comparison_reference: other methods' rows are also tested against this method's row nearest in FLOPs.
    layer_parameters: fields that are decoder-layer indices (an int or a tuple) -> what to add to a value to get
        the stage layer it sets (0, or 1 for a layer after which the stage prunes): `scaled_to` moves them to
        another depth.
    reference_layers: the depth the presets were written for (LLaVA-1.5's 32 layers).
    needs_patch_grid: the method reads the image tokens as one patch grid (a model whose image tokens form none,
        like anyres tiles with newline tokens, refuses it when the pruner is built).
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    budget_parameter: ClassVar[str | None] = None
    not_in_results: ClassVar[tuple[str, ...]] = ()
    presets: ClassVar[dict[str, dict]] = {}
    table_order: ClassVar[int] = 100
    comparison_reference: ClassVar[bool] = False
    layer_parameters: ClassVar[dict[str, int]] = {}
    reference_layers: ClassVar[int] = 32
    budget_choices: ClassVar[tuple | None] = None
    needs_patch_grid: ClassVar[bool] = False

    # -- what a subclass implements --------------------------------------------------------------------------------

    def stages(self, num_layers: int) -> list[Stage]:
        """The schedule for a decoder of `num_layers` layers, stage layers ascending; ValueError naming the
        parameter when it does not fit the model."""
        raise NotImplementedError

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        """Which image tokens stage `stage_index` keeps."""
        raise NotImplementedError

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        """(stage layer, image tokens left after it) for a prompt of `num_image_tokens` image tokens, without running
        the model (theoretical FLOPs, budget solving)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how many tokens it keeps")

    def scaled_to(self, num_layers: int) -> "PruningMethod":
        """This method with its layer parameters moved to the same relative depth in a decoder of `num_layers`
        layers (`scale_stage_layers` on the stage layers they set). Unchanged at the reference depth; ValueError
        when the stages do not fit."""
        if num_layers == self.reference_layers or not self.layer_parameters:
            return self
        changes = {}
        for name, offset in self.layer_parameters.items():
            value = getattr(self, name)
            layers = value if isinstance(value, tuple) else (value,)
            stages = scale_stage_layers([x + offset for x in layers], num_layers, self.reference_layers)
            mapped = tuple(s - offset for s in stages)
            changes[name] = mapped if isinstance(value, tuple) else mapped[0]
        return dataclasses.replace(self, **changes)

    # -- parameters, generic -----------------------------------------------------------------------------------

    @classmethod
    def parameter_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    def parameters(self) -> dict:
        """Every parameter, as given."""
        return {f.name: getattr(self, f.name) for f in self.parameter_fields()}

    def result_parameters(self) -> dict:
        """The parameters that change what the method answers (fingerprints, labels, file names)."""
        return {k: v for k, v in self.parameters().items() if k not in self.not_in_results}

    def changed_parameters(self) -> dict:
        """Result parameters that differ from their defaults."""
        defaults = type(self)()
        return {k: v for k, v in self.result_parameters().items() if getattr(defaults, k) != v}

    # -- presentation, generic (a method may override these) ---------------------------------------------------

    def label(self) -> str:
        """Human-readable, e.g. `PyramidDrop (ratio=0.3)`."""
        changed = self.changed_parameters()
        inner = ", ".join(f"{k}={_format_value(v)}" for k, v in changed.items())
        return f"{self.display_name or self.name}" + (f" ({inner})" if inner else "")

    def short_label(self) -> str:
        """For plot annotations."""
        return self.label()

    def file_stem(self) -> str:
        """The method's part of result file names: the name, then each non-default parameter."""
        parts = [self.name] + [f"{k}{_stem_value(v)}" for k, v in self.changed_parameters().items()]
        return re.sub(r"[^A-Za-z0-9_.-]", "-", "_".join(parts))

    def sort_key(self) -> tuple:
        """Row order among the runs of this method (the method's own name orders methods)."""
        return tuple(_sortable(v) for v in self.result_parameters().values())

    def group(self) -> str:
        """Runs of one group share a plot colour (e.g. one selection rule)."""
        return self.name

    def run_label(self) -> str:
        """The name of a run in progress bars and logs."""
        return self.label()

    def result_fields(self) -> dict:
        """Extra fields a result file's `model_config` carries for this method (e.g. a guide's flag names)."""
        return {}

    def check_image_span(self, image_starts: list[int], num_image_tokens: int) -> str | None:
        """A notice when the detected image span (first image position of each row, padding excluded, and the
        image token count) differs from what the method was told to expect; None when fine."""
        return None

    def run_section(self) -> dict:
        """How a JSONL header's `run` records this method (read back by `methods.method_from_run`)."""
        from . import method_record

        return {"fastv": None, "pruning_method": method_record(self)}

    def fingerprint_section(self) -> dict:
        """What of this method goes into a run's fingerprint: its name and the parameters that change results."""
        from . import method_reference

        return {"fastv": None, "pruning_method": {"name": method_reference(self),
                                                  "parameters": jsonable(self.result_parameters())}}

    @classmethod
    def from_run_section(cls, run: dict) -> "PruningMethod | None":
        """The method of a header's `run` written before methods were recorded by name (None: not this method)."""
        return None

    @classmethod
    def from_legacy_result(cls, section: dict) -> "PruningMethod | None":
        """The method of a result file written before methods were recorded by name (None: not this method)."""
        return None


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


def _sortable(value):
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))
