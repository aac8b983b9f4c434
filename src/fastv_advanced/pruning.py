"""The pruning mechanism: forward hooks that drop image tokens from a transformers LLaVA after decoder layer K.

Nothing in the model is replaced. Hooks are added to:

- the `LlavaModel` forward, to read `input_ids` and find the image tokens (`input_ids == config.image_token_id`);
- layer K-1's attention and its `q_proj`/`k_proj`, to compute the attention probabilities of the last prompt
  position only (one query row: O(heads x sequence) extra memory), whatever attention implementation runs;
- layer K, where the selection runs once per prefill and the hidden states, RoPE cos/sin, position ids and any
  materialised mask are gathered to the kept tokens (a physical drop: layers K..L-1 run on S' < S tokens);
- layers K+1..L-1, which receive the same gathered cos/sin, position ids and mask.

In decode steps (KV cache), layers >= K have cached only the kept prompt tokens, so a materialised mask (built by
transformers for the full prompt length) has its key columns gathered to the kept prompt positions plus the
generated ones. `remove()` takes every hook away; the model's modules, attention implementation and forward
methods are never modified.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version

from .config import FastVConfig
from .selection import gather_mask as _gather_mask, gather_rows as _gather_rows, last_query_attention
from .strategies import get_strategy, run_strategy

SUPPORTED_TRANSFORMERS = (Version("5.20"), Version("6"))

# model -> its active pruner, so that applying twice replaces instead of stacking hooks.
_ACTIVE_PRUNERS: "weakref.WeakKeyDictionary[torch.nn.Module, FastVPruner]" = weakref.WeakKeyDictionary()


@dataclass
class Selection:
    """The image tokens chosen at the last prefill.

    kept_image_indices: LongTensor[batch, R], ascending, 0-based within each row's image tokens.
    image_start: LongTensor[batch], sequence position (padding included) of each row's first image token.
    scores: FloatTensor[batch, n_image], the strategy's scores.
    head_index: LongTensor[batch] for head-based strategies, else None.
    kept_positions: LongTensor[batch, S'], sequence positions kept for layers K..L-1 (all non-image tokens and the
        kept image tokens, ascending).
    """

    kept_image_indices: torch.Tensor
    image_start: torch.Tensor
    scores: torch.Tensor
    head_index: torch.Tensor | None
    kept_positions: torch.Tensor

    @property
    def num_image_tokens(self) -> int:
        return self.scores.shape[-1]

    @property
    def num_kept(self) -> int:
        return self.kept_image_indices.shape[-1]


@dataclass
class _Prefill:
    """What the layer-K hook needs about the prompt being prefilled."""

    image_positions: torch.Tensor  # LongTensor[batch, n_image], ascending sequence positions of the image tokens
    is_image: torch.Tensor  # BoolTensor[batch, S]
    num_kept: int


def _find_llava_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `LlavaModel` inside a `LlavaForConditionalGeneration` (or the model itself)."""
    inner = getattr(model, "model", None)
    for candidate in (model, inner):
        if candidate is not None and hasattr(candidate, "language_model") and hasattr(candidate, "vision_tower"):
            return candidate
    raise TypeError(
        f"apply_fastv expects a transformers LlavaForConditionalGeneration or LlavaModel, got {type(model).__name__}"
    )


def _check_transformers_version() -> None:
    version = Version(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= version < high):
        raise RuntimeError(
            f"fastv_advanced hooks into transformers internals tested for transformers>={low},<{high}; "
            f"found {transformers.__version__}. Install a supported version."
        )


class FastVPruner:
    """FastV applied to one model. Use as a context manager or call `remove()` when done.

    last_selection: the `Selection` of the last prefill that had image tokens (None before).
    """

    def __init__(self, model: torch.nn.Module, config: FastVConfig):
        _check_transformers_version()
        self.model = model
        self.config = config
        llava = _find_llava_model(model)
        layers = llava.language_model.layers
        num_layers = len(layers)
        if not 1 <= config.agg_layer < num_layers:
            raise ValueError(
                f"agg_layer={config.agg_layer} is outside the allowed range [1, {num_layers - 1}] for this model "
                f"with {num_layers} decoder layers"
            )
        self.image_token_id = model.config.image_token_id
        self.strategy = get_strategy(config.token_selection_method)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.last_selection: Selection | None = None
        self._warned_span = False
        self._prefill: _Prefill | None = None
        self._captured: dict = {}
        self._attention: torch.Tensor | None = None
        self._overrides: dict | None = None
        self._kept_positions: torch.Tensor | None = None
        self._prompt_length = 0
        self._decode_cache = None

        previous = _ACTIVE_PRUNERS.get(model)
        if previous is not None:
            previous.remove()
        scoring_attention = layers[config.agg_layer - 1].self_attn
        self._head_dim = scoring_attention.head_dim
        self._scaling = scoring_attention.scaling
        self._handles = [
            llava.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
            llava.register_forward_hook(self._on_forward_end),
            scoring_attention.register_forward_pre_hook(self._capture_attention_inputs, with_kwargs=True),
            scoring_attention.q_proj.register_forward_hook(self._capture_query),
            scoring_attention.k_proj.register_forward_hook(self._capture_keys),
            scoring_attention.register_forward_hook(self._score_last_query),
            layers[config.agg_layer].register_forward_pre_hook(self._on_first_pruned_layer, with_kwargs=True),
        ]
        self._handles += [
            layer.register_forward_pre_hook(self._on_later_pruned_layer, with_kwargs=True)
            for layer in layers[config.agg_layer + 1 :]
        ]
        _ACTIVE_PRUNERS[model] = self

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Take every hook away; the model is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset_forward_state()
        self._kept_positions = None
        self._decode_cache = None
        if _ACTIVE_PRUNERS.get(self.model) is self:
            del _ACTIVE_PRUNERS[self.model]

    def reseed(self, seed: int) -> None:
        """Reset the generator handed to randomised strategies (e.g. once per evaluated sample)."""
        self.generator.manual_seed(seed)

    def __enter__(self) -> "FastVPruner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _reset_forward_state(self) -> None:
        self._prefill = None
        self._captured = {}
        self._attention = None
        self._overrides = None

    # -- hooks -----------------------------------------------------------------------------------------------------

    def _on_forward_start(self, module, args, kwargs):
        self._reset_forward_state()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            return None  # a decode step (or a continuation): the selection was made at this cache's prefill
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                warnings.warn("FastV needs input_ids to find the image tokens; this call with inputs_embeds runs unpruned")
            return None
        is_image = input_ids == self.image_token_id  # [batch, S]
        counts = is_image.sum(dim=1)
        if int(counts.max()) == 0:  # a new text-only prompt: runs unpruned
            self.last_selection = None
            self._kept_positions = None
            return None
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"every row of a batch must hold the same number of image tokens to prune; got {counts.tolist()}"
            )
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("FastV scores from the last prompt position and needs left padding (padding_side='left')")
        num_image = int(counts[0])
        image_positions = is_image.nonzero()[:, 1].view(input_ids.shape[0], num_image)
        self._check_guide_span(image_positions, attention_mask, num_image)
        self._prefill = _Prefill(image_positions, is_image, self.config.num_kept(num_image))
        return None

    def _on_forward_end(self, module, args, output):
        self._reset_forward_state()

    def _capture_attention_inputs(self, module, args, kwargs):
        if self._prefill is not None:
            self._captured["mask"] = kwargs.get("attention_mask")
            self._captured["rope"] = kwargs.get("position_embeddings")
        return None

    def _capture_query(self, module, args, output):
        if self._prefill is not None:
            self._captured["query"] = output[:, -1:]  # [batch, 1, heads * head_dim]

    def _capture_keys(self, module, args, output):
        if self._prefill is not None:
            self._captured["keys"] = output  # [batch, S, kv_heads * head_dim]

    def _score_last_query(self, module, args, output):
        if self._prefill is None:
            return None
        captured, self._captured = self._captured, {}
        keys = captured["keys"]
        if keys.shape[1] != self._prefill.is_image.shape[1]:
            raise RuntimeError(
                "FastV prunes in a prefill that starts from an empty cache; this call continues a cache with image "
                "tokens in the new input"
            )
        cos, sin = captured["rope"]
        probs = last_query_attention(
            captured["query"], keys, cos, sin, captured["mask"], self._head_dim, self._scaling
        )  # [batch, heads, S]
        positions = self._prefill.image_positions
        index = positions[:, None, :].expand(-1, probs.shape[1], -1)
        self._attention = probs.gather(2, index)  # [batch, heads, n_image]
        return None

    def _on_first_pruned_layer(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self._prefill is not None and self._attention is not None:
            args, kwargs = self._drop_tokens(args, kwargs, cache)
        elif self._continues_pruned_cache(cache):
            mask = kwargs.get("attention_mask")
            if mask is not None:
                key_length = mask.shape[-1]
                generated = torch.arange(self._prompt_length, key_length, device=mask.device)
                keys = torch.cat([self._kept_positions, generated.expand(self._kept_positions.shape[0], -1)], dim=1)
                self._overrides = {"attention_mask": _gather_mask(mask, None, keys)}
        if self._overrides:
            kwargs.update(self._overrides)
        return args, kwargs

    def _on_later_pruned_layer(self, module, args, kwargs):
        if self._overrides:
            kwargs.update(self._overrides)
        return args, kwargs

    # -- selection and the drop -----------------------------------------------------------------------------------

    def _select(self) -> Selection:
        prefill = self._prefill
        attention = self._attention  # [batch, heads, n_image]
        scores, head_index = run_strategy(self.strategy, attention, self.config, self.generator)
        top = scores.topk(prefill.num_kept, dim=-1).indices.sort(dim=-1).values  # [batch, R]
        keep = ~prefill.is_image
        keep.scatter_(1, prefill.image_positions.gather(1, top), True)
        batch, seq_len = keep.shape
        num_kept = seq_len - prefill.image_positions.shape[1] + prefill.num_kept
        order = torch.arange(seq_len, device=keep.device).expand(batch, -1)
        # Kept positions first, in order, without a host sync: dropped ones are pushed past seq_len and cut off.
        kept_positions = torch.where(keep, order, order + seq_len).sort(dim=-1).values[:, :num_kept]  # [batch, S']
        return Selection(
            kept_image_indices=top,
            image_start=prefill.image_positions[:, 0],
            scores=scores,
            head_index=head_index,
            kept_positions=kept_positions,
        )

    def _drop_tokens(self, args, kwargs, cache):
        selection = self._select()
        kept = selection.kept_positions
        hidden = args[0] if args else kwargs["hidden_states"]  # [batch, S, hidden]
        hidden = _gather_rows(hidden, kept, 1)  # [batch, S', hidden]
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        overrides = {"attention_mask": _gather_mask(kwargs.get("attention_mask"), kept, kept)}
        if kwargs.get("position_embeddings") is not None:
            cos, sin = kwargs["position_embeddings"]
            overrides["position_embeddings"] = (_gather_rows(cos, kept, 1), _gather_rows(sin, kept, 1))
        if kwargs.get("position_ids") is not None:
            overrides["position_ids"] = _gather_rows(kwargs["position_ids"], kept, 1)
        self._overrides = overrides
        self.last_selection = selection
        self._kept_positions = kept
        self._prompt_length = self._prefill.is_image.shape[1]
        self._decode_cache = weakref.ref(cache) if cache is not None else None
        self._prefill = None
        self._attention = None
        return args, kwargs

    def _continues_pruned_cache(self, cache) -> bool:
        return (
            cache is not None
            and self._kept_positions is not None
            and self._decode_cache is not None
            and self._decode_cache() is cache
        )

    def _check_guide_span(self, image_positions: torch.Tensor, attention_mask, num_image: int) -> None:
        if self._warned_span or (self.config.sys_length is None and self.config.image_token_length is None):
            return
        start = image_positions[:, 0]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            start = start - (attention_mask == 0).sum(dim=1)  # left padding does not count
        detected_start = int(start[0])
        mismatches = []
        if self.config.sys_length is not None and bool((start != self.config.sys_length).any()):
            mismatches.append(f"sys_length={self.config.sys_length} but the image starts at {detected_start}")
        if self.config.image_token_length is not None and self.config.image_token_length != num_image:
            mismatches.append(f"image_token_length={self.config.image_token_length} but the input has {num_image}")
        if mismatches:
            self._warned_span = True
            warnings.warn("FastV: " + "; ".join(mismatches) + ". Using the detected image span.", stacklevel=2)


def apply_fastv(model: torch.nn.Module, config: FastVConfig) -> FastVPruner:
    """Make `model` drop image tokens after layer `config.agg_layer`. Returns the pruner (a context manager)."""
    return FastVPruner(model, config)
