"""The pruning mechanism: forward hooks that physically drop image tokens inside a VLM's language model.

A method (`fastv_advanced.methods`) gives a schedule of stages; the model's family adapter
(`fastv_advanced.adapters`) says where things are. Nothing in the model is replaced. Hooks sit on:

- the module that receives `input_ids` (the prompt): finds the image tokens, once per prefill, with one host sync;
- for a stage that reads an earlier layer's attention, that layer's attention module and its query/key modules:
  the attention probabilities of the last prompt position are computed from them (one query row,
  O(heads x sequence) memory), whatever attention implementation runs;
- every decoder layer from the first stage on. At a stage's layer, in prefill, the method chooses among the image
  tokens still present and the hidden states are gathered to the kept tokens (a physical drop). Every layer from
  there on gets its own RoPE cos/sin, position ids and any materialised mask, as the model built them for the whole
  prompt, gathered to the tokens still present (layers that share a tensor share the gather; Gemma 3's sliding and
  full layers each have theirs). Compacted positions are recomputed.

The KV cache of the layers between two stages holds exactly the tokens those layers saw. In decode steps each such
segment has a materialised mask's key columns gathered to its kept prompt positions plus the generated ones (the
model lays the columns out as one layer's cache, found by the mask's width), and, where positions were compacted,
its position ids shifted down by the tokens dropped before it. No host sync happens in decode steps. `remove()`
takes every hook away.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version

from .adapters import adapter_for
from .methods import PruningMethod, Stage, StageInputs
from .methods.base import VisionFeatures
from .row_groups import choose_per_group, row_grids
from .selection import block_key_columns, drop_tokens, gather_layer_inputs, gather_mask, gather_rows, image_attention
from .selection import image_numbers, image_starts, kept_image_tokens, last_query_attention, ordered_positions
from .selection import query_rows_attention, ragged_kept_sequence, rotated_keys

SUPPORTED_TRANSFORMERS = (Version("5.20"), Version("6"))

# model -> its active pruner, so that applying twice replaces instead of stacking hooks.
_ACTIVE_PRUNERS: "weakref.WeakKeyDictionary[torch.nn.Module, Pruner]" = weakref.WeakKeyDictionary()


@dataclass
class Selection:
    """The image tokens one stage kept at the last prefill.

    In a batch whose rows hold different numbers of image tokens, each row has its own count: R and n are the
    largest, a row's own entries come first and the rest are -1 (NaN for scores); `num_kept_per_row` and
    `num_candidates_per_row` give the counts, `kept_in_row(row)` and `scores_in_row(row)` a row's own entries.

    kept_image_indices: LongTensor[batch, R], ascending, 0-based among each row's original image tokens.
    image_start: LongTensor[batch], sequence position (padding included) of each row's first image token.
    scores: FloatTensor[batch, n], the method's scores of the n image tokens present at this stage
        (`candidate_image_indices`), or None for a method that picks without scores.
    head_index: LongTensor[batch] for head-based choices, else None.
    kept_positions: LongTensor[batch, S'], original sequence positions of the tokens layers from `layer` on see
        (all non-image tokens and the kept image tokens, ascending; plus `padding`).
    layer: the decoder layer before which this stage pruned.
    candidate_image_indices: LongTensor[batch, n], the original image indices the scores belong to.
    kept_image_numbers: LongTensor[batch, R], which image of the prompt (0-based, in prompt order; one image = one
        run of consecutive image tokens) each kept image token came from.
    num_kept_per_row, num_candidates_per_row: per row, its kept and candidate image tokens.
    padding: BoolTensor[batch, S'] when rows kept different numbers of tokens: the tokens of `kept_positions` that
        only pad a row to the batch's length (dropped tokens kept physically but closed to attention), else None.
    """

    kept_image_indices: torch.Tensor
    image_start: torch.Tensor
    scores: torch.Tensor | None
    head_index: torch.Tensor | None
    kept_positions: torch.Tensor
    layer: int
    candidate_image_indices: torch.Tensor
    kept_image_numbers: torch.Tensor
    num_kept_per_row: list[int]
    num_candidates_per_row: list[int]
    padding: torch.Tensor | None = None

    @property
    def num_image_tokens(self) -> int:
        """The most candidate image tokens of a row."""
        return self.candidate_image_indices.shape[-1]

    @property
    def num_kept(self) -> int:
        """The most kept image tokens of a row (every row's count when they are equal)."""
        return self.kept_image_indices.shape[-1]

    def kept_in_row(self, row: int) -> torch.Tensor:
        """Row `row`'s kept image tokens, ascending: LongTensor[R_row]."""
        return self.kept_image_indices[row, : self.num_kept_per_row[row]]

    def scores_in_row(self, row: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Row `row`'s (scores FloatTensor[n_row], candidate image indices LongTensor[n_row]), None without
        scores of every candidate."""
        count = self.num_candidates_per_row[row]
        if self.scores is None or self.scores.shape[-1] != self.candidate_image_indices.shape[-1]:
            return None
        return self.scores[row, :count], self.candidate_image_indices[row, :count]

    def __repr__(self) -> str:
        batch = self.kept_image_indices.shape[0]
        heads = "" if self.head_index is None else f", head_index={self.head_index.tolist()}"
        if len(set(self.num_kept_per_row)) > 1 or len(set(self.num_candidates_per_row)) > 1:
            counts = f"kept {self.num_kept_per_row} of {self.num_candidates_per_row} image tokens per row"
        else:
            counts = f"kept {self.num_kept} of {self.num_image_tokens} image tokens"
        return (f"Selection(layer={self.layer}, batch={batch}, {counts}, sequence {self.kept_positions.shape[-1]} "
                f"tokens{heads})")


@dataclass
class _Prompt:
    """The prefill in progress: where the image tokens are now, and what each current token was originally.

    is_image: BoolTensor[batch, S] of the original prompt; image_start: LongTensor[batch];
    image_positions: LongTensor[batch, n] in the current sequence; image_indices: LongTensor[batch, n] among the
    original image tokens; positions: LongTensor[batch, S_cur], original positions of the current tokens;
    original_image_positions: LongTensor[batch, N], where the image tokens were in the original prompt;
    image_numbers: LongTensor[batch, N], which image each original image token belongs to;
    text_rows: the most tokens after the image block in a row; embeddings: the input embeddings, when a stage
    asked for them; position_offsets: LongTensor[batch, S_cur], how far each current token's position moved down
    where stages renumbered positions (None: no stage did); gathered: the layer inputs already gathered to the
    current tokens, by the identity of the model's full-length tensor (layers share them).

    Rows with different numbers of image tokens, or image-token grids of different shapes (`ragged`): n and N are
    the largest counts, `counts` and `original_counts` each row's own; a row's slots past its count point at the
    last position. `grids`: per row, the (rows, cols) layout of its image tokens where the model input gives it.
    `padding` BoolTensor[batch, S_cur] marks dropped tokens kept only to give every row one length
    (`padding_counts` per row); `position_shift` is then a LongTensor[batch, 1].
    """

    is_image: torch.Tensor
    num_image: int
    text_rows: int
    counts: list[int]
    original_counts: list[int]
    grids: list[tuple[int, int] | None]
    image_start: torch.Tensor
    image_positions: torch.Tensor
    image_indices: torch.Tensor
    positions: torch.Tensor
    original_image_positions: torch.Tensor
    image_numbers: torch.Tensor
    pruned: bool = False  # a stage has dropped tokens in this prefill
    position_shift: int | torch.Tensor = 0  # tokens dropped so far by stages that renumber positions
    padding: torch.Tensor | None = None
    padding_counts: list[int] | None = None
    position_offsets: torch.Tensor | None = None
    attention: dict = field(default_factory=dict)  # layer -> FloatTensor[batch, heads, n]
    keys: dict = field(default_factory=dict)  # layer -> FloatTensor[batch, S_cur, kv_heads * head_dim], RoPE'd
    embeddings: torch.Tensor | None = None
    gathered: dict = field(default_factory=dict)

    @property
    def ragged(self) -> bool:
        return len(set(self.original_counts)) > 1 or len(set(self.grids)) > 1

    def grid_of(self, rows: list[int]) -> tuple[int, int] | None:
        """The grid every row of `rows` shares while no stage has dropped tokens, else None."""
        grids = {self.grids[row] for row in rows}
        return grids.pop() if len(grids) == 1 and not self.pruned else None

    def valid_slots(self, counts: list[int], width: int) -> torch.Tensor:
        """BoolTensor[batch, width]: which of `width` slots hold a row's own entries (the first `counts[row]`)."""
        device = self.is_image.device
        return torch.arange(width, device=device)[None] < torch.tensor(counts, device=device)[:, None]


@dataclass
class _Segment:
    """Layers from one stage to the next, for decode steps: `positions` LongTensor[batch, S_i], the original prompt
    positions their cache holds, `position_shift` (int or LongTensor[batch, 1]), the tokens dropped with
    renumbering before the generated ones, and `padding` BoolTensor[batch, S_i] (or None), the cached tokens
    closed to attention."""

    positions: torch.Tensor
    position_shift: int | torch.Tensor
    padding: torch.Tensor | None = None


def _check_transformers_version() -> None:
    version = Version(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= version < high):
        raise RuntimeError(
            f"fastv_advanced hooks into transformers internals tested for transformers>={low},<{high}; "
            f"found {transformers.__version__}. Install a supported version."
        )


class Pruner:
    """A pruning method applied to one model. Use as a context manager or call `remove()` when done.

    selections: one `Selection` per stage of the last prefill that had image tokens (empty before);
    last_selection: the last stage's (None before).
    """

    def __init__(self, model: torch.nn.Module, method: PruningMethod):
        _check_transformers_version()
        self.model = model
        self.method = method
        self.adapter = adapter_for(model)
        self.stages: list[Stage] = method.stages(len(self.adapter.layers))
        self._check_schedule()
        self._stage_at = {stage.layer: i for i, stage in enumerate(self.stages)}
        self.generator = torch.Generator().manual_seed(getattr(method, "seed", 0))
        self.selections: list[Selection] = []
        self._warned_span = False
        self._prompt: _Prompt | None = None
        self._captured: dict = {}
        self._segments: dict[int, _Segment] = {}
        self._segment_of = {layer: max(s.layer for s in self.stages if s.layer <= layer)
                            for layer in range(self.stages[0].layer, len(self.adapter.layers))}
        self._layouts: dict[int, torch.Tensor | None] = {}  # cached prompt length -> its original positions
        self._layer0_length = 0  # prompt tokens in layer 0's cache
        self._generated = 0  # tokens after the prompt in the cache, the current step's included
        self._decode_cache = None
        self._decoding = False
        self._decode_gathered: dict = {}
        self._cache_ref = None
        self._vision: VisionFeatures | None = None

        previous = _ACTIVE_PRUNERS.get(model)
        if previous is not None:
            previous.remove()
        self._handles = [
            self.adapter.prompt_module.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
            self.adapter.prompt_module.register_forward_hook(self._on_forward_end),
        ]
        attention_rows = {s.attention_layer: s.attention_rows for s in self.stages
                          if s.attention_layer not in (None, s.layer)}
        keys_layers = {s.keys_layer for s in self.stages if s.keys_layer not in (None, s.layer)}
        for layer in sorted(set(attention_rows) | keys_layers):
            self._hook_attention(layer, attention_rows.get(layer), layer in keys_layers)
        if any(stage.embeddings for stage in self.stages):
            self._handles.append(self.adapter.layers[0].register_forward_pre_hook(self._capture_embeddings,
                                                                                  with_kwargs=True))
        if any(stage.vision for stage in self.stages):
            self._hook_vision()
        for index in range(self.stages[0].layer, len(self.adapter.layers)):
            hook = self._on_layer
            self._handles.append(
                self.adapter.layers[index].register_forward_pre_hook(
                    lambda module, args, kwargs, index=index: hook(index, args, kwargs), with_kwargs=True
                )
            )
        _ACTIVE_PRUNERS[model] = self

    def _check_schedule(self) -> None:
        if not self.stages:
            raise ValueError(f"{self.method.name or type(self.method).__name__}: stages() returned no stage")
        if self.method.needs_patch_grid and self.adapter.patch_grid is not None:
            raise ValueError(f"{self.method.name} reads the image tokens as a patch grid: {self.adapter.patch_grid}")
        lowest = self.adapter.first_prunable_layer()
        if self.stages[0].layer < lowest:
            raise ValueError(
                f"{self.method.name}: {self.adapter.family} adds vision features (DeepStack) to the hidden states "
                f"after decoder layers 0..{lowest - 1}, so tokens can be dropped before layer {lowest} at the "
                f"earliest; this schedule prunes before layer {self.stages[0].layer} (for FastV: K >= {lowest})"
            )
        previous = -1
        for stage in self.stages:
            if stage.layer <= previous:
                raise ValueError(f"{self.method.name}: stage layers must ascend, got {[s.layer for s in self.stages]}")
            for what, layer in (("attention", stage.attention_layer), ("keys", stage.keys_layer)):
                if layer is not None and not previous <= layer <= stage.layer:
                    raise ValueError(
                        f"{self.method.name}: the stage before layer {stage.layer} reads layer {layer}'s {what}; it "
                        f"must lie in [{max(previous, 0)}, {stage.layer}]"
                    )
            if stage.attention_rows == "text" and stage.attention_layer == stage.layer:
                raise ValueError(f"{self.method.name}: text-row attention is read from a layer before the stage")
            if stage.vision and stage.layer != 0:
                raise ValueError(f"{self.method.name}: a stage that reads the vision tower must prune at layer 0")
            previous = stage.layer

    def _capture_embeddings(self, module, args, kwargs):
        if self._prompt is not None:
            self._prompt.embeddings = args[0] if args else kwargs["hidden_states"]

    def _hook_attention(self, layer: int, rows: str | None, keys_wanted: bool) -> None:
        """Hooks on layer `layer`'s attention: its last row ("last") or its text rows ("text") over the image
        tokens, and/or its keys after RoPE, stored on the prompt for the stage that reads them."""
        attention = self.adapter.attention(layer)
        q_module, k_module = self.adapter.query_key_modules(layer)
        layout = self.adapter.head_layout(layer)
        captured = self._captured

        def inputs(module, args, kwargs):
            if self._prompt is not None:
                captured.update(mask=kwargs.get("attention_mask"), rope=kwargs.get("position_embeddings"))

        def query(module, args, output):
            if self._prompt is not None and rows is not None:
                count = 1 if rows == "last" else self._prompt.text_rows
                captured["query"] = self.adapter.flat_heads(output)[:, -count:]  # [batch, Q, heads * head_dim]

        def keys(module, args, output):
            if self._prompt is not None:
                captured["keys"] = self.adapter.flat_heads(output)  # [batch, S, kv_heads * head_dim]

        def score(module, args, output):
            if self._prompt is not None:
                cos, sin = captured["rope"]
                if rows is not None:
                    scoring = last_query_attention if rows == "last" else query_rows_attention
                    probs = scoring(captured["query"], captured["keys"], cos, sin, captured["mask"],
                                    layout.head_dim, layout.scaling)  # [batch, heads, (Q,) S]
                    self._prompt.attention[layer] = image_attention(probs, self._prompt.image_positions)
                if keys_wanted:
                    self._prompt.keys[layer] = rotated_keys(captured["keys"], cos, sin, layout.head_dim)
                captured.clear()

        self._handles += [
            attention.register_forward_pre_hook(inputs, with_kwargs=True),
            q_module.register_forward_hook(query),
            k_module.register_forward_hook(keys),
            attention.register_forward_hook(score),
        ]

    def _hook_vision(self) -> None:
        """Capture the vision tower's select layer whenever it runs: `generate` may encode the image before the
        prompt module's forward starts. The next stage that reads it takes it."""
        layer = self.adapter.vision_select_layer()
        captured = {}

        def inputs(module, args, kwargs):
            captured["input"] = args[0] if args else kwargs["hidden_states"]

        def outputs(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self._vision = self.adapter.vision_features(captured.pop("input"), hidden)

        self._handles += [layer.register_forward_pre_hook(inputs, with_kwargs=True), layer.register_forward_hook(outputs)]

    # -- lifecycle -----------------------------------------------------------------------------------------------

    @property
    def last_selection(self) -> Selection | None:
        return self.selections[-1] if self.selections else None

    @last_selection.setter
    def last_selection(self, value: Selection | None) -> None:
        self.selections = [] if value is None else [value]

    def remove(self) -> None:
        """Take every hook away; the model is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset_forward_state()
        self._segments = {}
        self._decode_cache = None
        if _ACTIVE_PRUNERS.get(self.model) is self:
            del _ACTIVE_PRUNERS[self.model]

    def reseed(self, seed: int) -> None:
        """Reset the generator handed to randomised methods (e.g. once per evaluated sample)."""
        self.generator.manual_seed(seed)

    def __enter__(self) -> "Pruner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _reset_forward_state(self) -> None:
        self._prompt = None
        self._captured.clear()
        self._decode_gathered = {}
        self._decoding = False

    # -- hooks -----------------------------------------------------------------------------------------------------

    def _on_forward_start(self, module, args, kwargs):
        self._reset_forward_state()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        input_ids = self.adapter.input_ids(args, kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            self._decoding = self._continues_pruned_cache(cache)
            if self._decoding:  # the selection was made at this cache's prefill
                new = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
                self._generated = cache.get_seq_length() - self._layer0_length + new.shape[1]
            return None
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                warnings.warn("pruning needs input_ids to find the image tokens; this call with inputs_embeds runs "
                              "unpruned")
            return None
        self._prompt = self._find_image_tokens(input_ids, kwargs)
        self._cache_ref = weakref.ref(cache) if cache is not None else None
        if self._prompt is None:  # a new text-only prompt: runs unpruned
            self.selections = []
            self._segments = {}
        return None

    def _find_image_tokens(self, input_ids: torch.Tensor, model_inputs: dict) -> _Prompt | None:
        """The image tokens of a prompt [batch, S]; the only host sync of a prefill reads their counts, starts,
        images per row, grid extents and whether the last position is padding or an image token."""
        attention_mask = model_inputs.get("attention_mask")
        is_image = input_ids == self.adapter.image_token_id  # [batch, S]
        counts = is_image.sum(dim=1)
        image_start = is_image.int().argmax(dim=1)
        padded = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        pads = (attention_mask == 0).sum(dim=1) if padded else torch.zeros_like(counts)
        right_padded = (attention_mask[:, -1] == 0).any().long()[None] if padded else counts.new_zeros(1)
        runs = image_starts(is_image).sum(dim=1)  # [batch] images per row
        extents = self.adapter.image_grid_extents(model_inputs, is_image, runs)  # [batch, 2] or None
        extents = counts.new_zeros(0) if extents is None else extents.flatten().to(counts)
        values = torch.cat([counts, image_start - pads, image_start, is_image[:, -1].long(), runs, right_padded,
                            extents]).tolist()
        batch = input_ids.shape[0]
        counts_list, starts, padded_starts = values[:batch], values[batch : 2 * batch], values[2 * batch : 3 * batch]
        grids = row_grids(values[5 * batch + 1 :], values[4 * batch : 5 * batch], counts_list)
        if max(counts_list) == 0:
            return None
        if values[5 * batch]:
            raise ValueError("pruning scores from the last prompt position and needs left padding "
                             "(padding_side='left')")
        ends_with_image = [row for row in range(batch) if values[3 * batch + row]]
        if (min(counts_list) != max(counts_list) or len(set(grids)) > 1) and ends_with_image:
            raise ValueError(
                f"rows {ends_with_image} end with an image token; a batch whose rows hold different numbers of image "
                f"tokens ({counts_list}) needs text after the image in every row (or run the rows one at a time)"
            )
        self.adapter.check_prompt(input_ids.shape[1])
        with_image = [row for row in range(batch) if counts_list[row]]
        self._check_image_span([starts[row] for row in with_image], counts_list[with_image[0]])
        num_image, seq_len = max(counts_list), input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, -1)
        # a row's slots past its own count point at its last position, text in every row
        image_positions = ordered_positions(is_image, num_image).clamp(max=seq_len - 1)
        return _Prompt(
            is_image=is_image,
            num_image=num_image,
            text_rows=max(seq_len - padded_starts[row] - counts_list[row] for row in with_image),
            counts=counts_list,
            original_counts=list(counts_list),
            grids=grids,
            image_start=image_start,
            image_positions=image_positions,
            image_indices=torch.arange(num_image, device=input_ids.device).expand(batch, -1),
            positions=positions,
            original_image_positions=image_positions,
            image_numbers=image_numbers(is_image, image_positions),
        )

    def _on_forward_end(self, module, args, output):
        self._reset_forward_state()

    def _on_layer(self, index: int, args, kwargs):
        if self._decoding:
            kwargs.update(self._decode_inputs(index, kwargs))
            return args, kwargs
        if self._prompt is None:
            return args, kwargs
        model_inputs = dict(kwargs)  # this layer's inputs as the model built them, for the whole prompt
        if self._prompt.pruned:
            kwargs.update(self._prefill_inputs(index, model_inputs))
        stage_index = self._stage_at.get(index)
        if stage_index is not None:
            args, kwargs = self._run_stage(stage_index, args, kwargs, model_inputs)
        return args, kwargs

    def _prefill_inputs(self, layer: int, model_inputs: dict) -> dict:
        """Layer `layer`'s own mask, position ids and cos/sin, built by the model for the whole prompt, gathered to
        the current tokens (positions moved down where stages renumbered them). Each layer's own: Gemma 3's sliding
        and full layers differ; layers that share a tensor share its gather."""
        prompt, gathered = self._prompt, {}
        for name in ("attention_mask", "position_ids", "position_embeddings"):
            value = model_inputs.get(name)
            blocks = name == "attention_mask" and prompt.padding is not None
            if value is None and not blocks:
                continue
            key = (name, id(value[0] if name == "position_embeddings" else value))
            if key not in prompt.gathered:
                result = None if value is None else gather_layer_inputs(
                    name, value, prompt.positions, prompt.position_offsets, model_inputs.get("position_ids"),
                    lambda ids: self.adapter.position_embeddings(layer, value[0], ids))
                if blocks:
                    result = block_key_columns(result, prompt.padding, prompt.positions.shape[1], self._flash(layer))
                prompt.gathered[key] = (value, result)
            gathered[name] = prompt.gathered[key][1]
        return gathered

    def _flash(self, layer: int) -> bool:
        """Whether layer `layer` runs FlashAttention (whose masks are 2D)."""
        config = getattr(self.adapter.attention(layer), "config", None)
        return "flash" in str(getattr(config, "_attn_implementation", ""))

    # -- a stage in prefill -----------------------------------------------------------------------------------

    def _stage_inputs(self, stage: Stage, hidden: torch.Tensor, kwargs) -> StageInputs:
        prompt = self._prompt
        attention = keys = None
        if stage.attention_layer == stage.layer or stage.keys_layer == stage.layer:
            attention, keys = self._own_attention(stage, hidden, kwargs)
        if stage.attention_layer not in (None, stage.layer):
            attention = prompt.attention.pop(stage.attention_layer)
        if stage.keys_layer not in (None, stage.layer):
            keys = prompt.keys.pop(stage.keys_layer)
        return StageInputs(
            num_image_tokens=prompt.image_positions.shape[1],
            num_original_image_tokens=prompt.num_image,
            image_positions=prompt.image_positions,
            image_indices=prompt.image_indices,
            attention=attention,
            hidden_states=hidden if stage.hidden_states else None,
            generator=self.generator,
            keys=keys,
            adapter=self.adapter,
            vision=self._take_vision() if stage.vision else None,
            query_is_text=self._query_is_text(hidden.shape[1]) if stage.attention_rows == "text" else None,
            embeddings=prompt.embeddings if stage.embeddings else None,
            original_image_positions=prompt.original_image_positions if stage.embeddings else None,
            image_grid=prompt.grid_of(range(hidden.shape[0])),
        )

    def _query_is_text(self, seq_len: int) -> torch.Tensor:
        """BoolTensor[batch, Q]: which of the last Q positions come after each row's image block."""
        prompt = self._prompt
        window = torch.arange(seq_len - prompt.text_rows, seq_len, device=prompt.image_positions.device)
        last = torch.tensor([max(count - 1, 0) for count in prompt.counts], device=window.device)[:, None]
        return window[None] > prompt.image_positions.gather(1, last)  # each row's own last image token

    def _take_vision(self) -> VisionFeatures:
        vision, self._vision = self._vision, None
        if vision is None:
            raise RuntimeError(f"{self.method.name} reads the vision tower, which did not run for this prompt")
        return vision

    def _own_attention(self, stage: Stage, hidden: torch.Tensor, kwargs):
        """The stage layer's own last-position attention over the current image tokens [batch, heads, n] and/or its
        keys after RoPE [batch, S, kv_heads * head_dim] (None where the stage did not ask), from its input."""
        layout = self.adapter.head_layout(stage.layer)
        query, keys = self.adapter.query_key_from_input(stage.layer, hidden)
        cos, sin = kwargs["position_embeddings"]
        attention = rotated = None
        if stage.attention_layer == stage.layer:
            probs = last_query_attention(query, keys, cos, sin, kwargs.get("attention_mask"), layout.head_dim,
                                         layout.scaling)
            attention = image_attention(probs, self._prompt.image_positions)
        if stage.keys_layer == stage.layer:
            rotated = rotated_keys(keys, cos, sin, layout.head_dim)
        return attention, rotated

    def _run_stage(self, stage_index: int, args, kwargs, model_inputs: dict):
        stage, prompt = self.stages[stage_index], self._prompt
        hidden = args[0] if args else kwargs["hidden_states"]  # [batch, S_cur, hidden]
        if hidden.shape[1] != prompt.positions.shape[1]:
            raise RuntimeError("pruning happens in a prefill that starts from an empty cache; this call continues a "
                               "cache with image tokens in the new input")
        inputs = self._stage_inputs(stage, hidden, kwargs)
        if prompt.ragged:
            choice, num_kept = choose_per_group(self.method, stage_index, inputs, hidden, prompt)
            top = choice.kept  # [batch, R], each row's own first
            hidden, kept, keep, dropped = self._ragged_drop(hidden, top, num_kept)
        else:
            choice = self.method.choose(stage_index, inputs)
            top = kept_image_tokens(self.method, choice, hidden.shape[0], inputs.num_image_tokens)  # [batch, R]
            hidden, kept, keep = drop_tokens(hidden, prompt.image_positions, top)
            dropped, num_kept = ~keep, [top.shape[1]] * top.shape[0]
        self._record(stage, choice, top, kept, keep, dropped, num_kept)
        if choice.replacement is not None:
            replacement = choice.replacement.to(hidden.dtype)  # [batch, R, hidden]
            if prompt.ragged:  # unused slots point at the last position: write back its own hidden state
                valid = prompt.valid_slots(num_kept, top.shape[1])[..., None]
                replacement = torch.where(valid, replacement, hidden[:, -1:])
            index = prompt.image_positions[..., None].expand(-1, -1, hidden.shape[-1])
            hidden = hidden.scatter(1, index, replacement)
        args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        kwargs.update(self._prefill_inputs(stage.layer, model_inputs))
        return args, kwargs

    def _ragged_drop(self, hidden: torch.Tensor, top: torch.Tensor, num_kept: list[int]):
        """`drop_tokens` for rows keeping different numbers of image tokens (`num_kept`; `top` [batch, R] padded):
        rows shorter than the longest keep some dropped tokens as padding closed to attention. Returns (hidden
        [batch, S', hidden], kept [batch, S'], keep [batch, S_cur], dropped [batch, S_cur])."""
        prompt = self._prompt
        seq_len = hidden.shape[1]
        valid = prompt.valid_slots(prompt.counts, prompt.image_positions.shape[1])
        is_image = torch.zeros_like(prompt.is_image[:, :seq_len]).scatter_(1, prompt.image_positions, valid)
        padding_counts = prompt.padding_counts or [0] * len(num_kept)
        real_lengths = [seq_len - pad - count + kept
                        for pad, count, kept in zip(padding_counts, prompt.counts, num_kept)]
        kept, keep, dropped, padding = ragged_kept_sequence(
            prompt.image_positions, is_image, prompt.padding, top, prompt.valid_slots(num_kept, top.shape[1]),
            real_lengths)
        prompt.padding = padding if padding.any() else None
        prompt.padding_counts = [kept.shape[1] - length for length in real_lengths]
        return gather_rows(hidden, kept, 1), kept, keep, dropped

    def _record(self, stage: Stage, choice, top, kept, keep, dropped, num_kept: list[int]) -> None:
        """The drop of `top` [batch, R] among the current image tokens: `kept` [batch, S'] current positions kept,
        `keep` BoolTensor[batch, S_cur] (padding included), `dropped` BoolTensor[batch, S_cur] the image tokens
        dropped, `num_kept` each row's kept count."""
        prompt = self._prompt
        new_index = keep.long().cumsum(dim=1) - 1  # [batch, S_cur]: a kept token's place in the new sequence
        kept_image_positions = prompt.image_positions.gather(1, top)
        candidates, counts = prompt.image_indices, prompt.counts
        if prompt.ragged:  # unused slots point at the last position, text in every row
            valid = prompt.valid_slots(num_kept, top.shape[1])
            kept_image_positions = kept_image_positions.masked_fill(~valid, keep.shape[1] - 1)
        prompt.image_indices = candidates.gather(1, top)
        prompt.image_positions = new_index.gather(1, kept_image_positions)
        prompt.positions = prompt.positions.gather(1, kept)
        prompt.counts = num_kept
        if stage.compact_positions and self.adapter.renumbers_positions:
            if prompt.ragged:
                removed = [count - kept_count for count, kept_count in zip(counts, num_kept)]
                prompt.position_shift = prompt.position_shift + torch.tensor(removed, device=kept.device)[:, None]
            else:
                prompt.position_shift += candidates.shape[1] - top.shape[1]
            dropped_before = dropped.long().cumsum(dim=1).gather(1, kept)  # [batch, S']
            offsets = prompt.position_offsets
            prompt.position_offsets = dropped_before + (0 if offsets is None else offsets.gather(1, kept))
        elif prompt.position_offsets is not None:
            prompt.position_offsets = prompt.position_offsets.gather(1, kept)
        prompt.pruned = True
        prompt.gathered = {}
        if stage is self.stages[0]:  # layer 0 caches the whole prompt unless the first stage is at layer 0
            full_length = prompt.is_image.shape[1]
            self._layouts = {} if stage.layer == 0 else {full_length: None}
            self._layer0_length = prompt.positions.shape[1] if stage.layer == 0 else full_length
        self._segments[stage.layer] = _Segment(prompt.positions, prompt.position_shift, prompt.padding)
        self._layouts[prompt.positions.shape[1]] = prompt.positions
        self._decode_cache = self._cache_ref
        kept_indices, kept_numbers = prompt.image_indices, prompt.image_numbers.gather(1, prompt.image_indices)
        if prompt.ragged:
            unused = ~prompt.valid_slots(num_kept, top.shape[1])
            kept_indices, kept_numbers = kept_indices.masked_fill(unused, -1), kept_numbers.masked_fill(unused, -1)
            candidates = candidates.masked_fill(~prompt.valid_slots(counts, candidates.shape[1]), -1)
        selection = Selection(
            kept_image_indices=kept_indices, image_start=prompt.image_start, scores=choice.scores,
            head_index=choice.head_index, kept_positions=prompt.positions, layer=stage.layer,
            candidate_image_indices=candidates, kept_image_numbers=kept_numbers, num_kept_per_row=list(num_kept),
            num_candidates_per_row=list(counts), padding=prompt.padding,
        )
        self.selections = ([] if stage is self.stages[0] else self.selections) + [selection]

    # -- decode steps on the pruned cache ---------------------------------------------------------------------------

    def _continues_pruned_cache(self, cache) -> bool:
        return bool(self._segments) and self._decode_cache is not None and self._decode_cache() is cache

    def _decode_inputs(self, layer: int, kwargs) -> dict:
        """Inputs of a layer whose cache holds a pruned prompt, in a decode step: a materialised mask's key columns
        gathered to the prompt positions that cache holds plus the generated ones (the model lays a mask's columns
        out as the cache of one layer, found by the mask's width: layer 0's for most masks, the first full layer's
        for Gemma 3's full masks); positions shifted down where they were renumbered."""
        segment = self._segments[self._segment_of[layer]]
        overrides = {}
        mask = kwargs.get("attention_mask")
        if mask is not None or segment.padding is not None:
            key = ("attention_mask", id(mask), id(segment))
            if key not in self._decode_gathered:
                self._decode_gathered[key] = (mask, self._decode_mask(mask, segment, layer))
            overrides["attention_mask"] = self._decode_gathered[key][1]
        position_ids = kwargs.get("position_ids")
        shifted = isinstance(segment.position_shift, torch.Tensor) or segment.position_shift != 0
        if shifted and position_ids is not None:
            key = ("position_embeddings", id(kwargs["position_embeddings"][0]), id(segment))
            if key not in self._decode_gathered:
                shifted = position_ids - segment.position_shift
                rope = self.adapter.position_embeddings(layer, kwargs["position_embeddings"][0], shifted)
                self._decode_gathered[key] = (kwargs["position_embeddings"], (shifted, rope))
            overrides["position_ids"], overrides["position_embeddings"] = self._decode_gathered[key][1]
        return overrides

    def _decode_mask(self, mask: torch.Tensor | None, segment: _Segment, layer: int) -> torch.Tensor:
        """The decode mask of a segment's layers: its key columns gathered to the segment's cache (see
        `_decode_inputs`), with the cache's padding tokens closed."""
        if mask is not None:
            width = mask.shape[-1]
            reference = width - self._generated  # prompt tokens of the cache the mask's columns are laid out as
            if reference not in self._layouts:
                raise RuntimeError(f"a decode mask with {width} key columns matches no pruned cache layout "
                                   f"({sorted(self._layouts)} prompt tokens + {self._generated} generated)")
            layout = self._layouts[reference]
            if layout is not segment.positions:
                kept = segment.positions if layout is None else torch.searchsorted(layout.contiguous(),
                                                                                  segment.positions)
                generated = torch.arange(reference, width, device=kept.device)
                mask = gather_mask(mask, None, torch.cat([kept, generated.expand(kept.shape[0], -1)], dim=1))
        if segment.padding is None:
            return mask
        blocked = torch.nn.functional.pad(segment.padding, (0, self._generated))  # [batch, S_i + generated]
        queries = 1 if mask is None else mask.shape[-2]
        return block_key_columns(mask, blocked, queries, self._flash(layer))

    # -- the method's expectations of the prompt -------------------------------------------------------------------

    def _check_image_span(self, starts: list[int], num_image: int) -> None:
        if self._warned_span:
            return
        notice = self.method.check_image_span(starts, num_image)
        if notice:
            self._warned_span = True
            warnings.warn(notice, stacklevel=3)


FastVPruner = Pruner


def apply_pruning(model: torch.nn.Module, method: PruningMethod) -> Pruner:
    """Make `model` prune image tokens as `method` says. Returns the pruner (a context manager)."""
    return Pruner(model, method)


def apply_fastv(model: torch.nn.Module, config: PruningMethod) -> Pruner:
    """Make `model` drop image tokens after layer `config.agg_layer` (any pruning method is accepted)."""
    return Pruner(model, config)
