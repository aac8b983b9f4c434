"""The two FastV implementations this project is compared against, written for the benchmark only.

Both are context managers around an unmodified transformers `LlavaForConditionalGeneration`, like `apply_fastv`,
and expose `last_selection.kept_positions` (LongTensor[batch, S']) so that a run can check that every mode kept the
same tokens. They share with `fastv_advanced.pruning` only its scoring function `last_query_attention` (mask mode),
its per-row gather `selection.gather_rows` and the strategy registry; their hooks, selection bookkeeping and mask handling
are written separately on purpose, so that they also act as an independent cross-check of the drop.

- `MaskModeFastV` -- the research repo's approach. The same layer K-1 last-query scores choose the same R image
  tokens, but nothing is removed: layers K..L-1 get a 4D mask in which the dropped tokens are masked as keys. Every
  layer still runs on all S tokens, so the FLOPs are the unpruned model's (plus the cost of a materialised mask,
  which also keeps SDPA off its mask-free causal kernels). Last-position logits equal a physical drop's.
- `EagerFastV` -- the original FastV implementation's approach (pkunlp-icler/FastV, "inplace" mode): the text model
  runs eager attention, layer K-1's full attention probabilities [batch, heads, S, S] are materialised and kept
  until layer K (the original keeps `last_layer_attention` from `output_attentions`), the scores are read from their
  last row, and the tokens are then physically dropped (hidden states, RoPE cos/sin, position ids and the additive
  4D mask gathered), with the KV cache of layers >= K holding only the kept tokens. Differences from the original,
  none of which changes its cost noticeably: the configured strategy scores each batch row (the original averages
  the heads of the whole S x S matrix, then reads batch row 0's last row), and the mask is gathered rather than
  rebuilt for the new length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastv_advanced import FastVConfig
from fastv_advanced.selection import gather_rows as _gather, last_query_attention
from fastv_advanced.strategies import get_strategy, run_strategy


@dataclass
class BaselineSelection:
    kept_image_indices: torch.Tensor  # [batch, R], ascending, within the image tokens
    kept_positions: torch.Tensor  # [batch, S'], ascending sequence positions kept for layers >= K
    keep: torch.Tensor  # BoolTensor[batch, S]


def _llava(model):
    inner = getattr(model, "model", model)
    if not (hasattr(inner, "language_model") and hasattr(inner, "vision_tower")):
        raise TypeError(f"expected a transformers LlavaForConditionalGeneration, got {type(model).__name__}")
    return inner


def _select(attention: torch.Tensor, image_positions: torch.Tensor, is_image: torch.Tensor, config: FastVConfig,
            generator: torch.Generator) -> BaselineSelection:
    """attention [batch, heads, n_image] -> the top-R image tokens and the kept sequence positions."""
    scores, _ = run_strategy(get_strategy(config.token_selection_method), attention.float(), config, generator)
    rank = config.num_kept(image_positions.shape[1])
    top = scores.topk(rank, dim=-1).indices.sort(dim=-1).values  # [batch, R]
    keep = ~is_image
    keep.scatter_(1, image_positions.gather(1, top), True)  # [batch, S]
    kept_positions = keep.nonzero()[:, 1].view(keep.shape[0], -1)  # [batch, S']
    return BaselineSelection(top, kept_positions, keep)


class _HookedFastV:
    """Common plumbing: find the image tokens, run the selection at layer K, override the later layers' kwargs."""

    attn_implementation: str | None = None  # text-model attention this mode runs with (None: leave as is)

    def __init__(self, model, config: FastVConfig):
        self.model = model
        self.config = config
        self.llava = _llava(model)
        self.layers = self.llava.language_model.layers
        if not 1 <= config.agg_layer < len(self.layers):
            raise ValueError(f"agg_layer={config.agg_layer} outside [1, {len(self.layers) - 1}]")
        self.image_token_id = model.config.image_token_id
        self.generator = torch.Generator().manual_seed(config.seed)
        self.last_selection: BaselineSelection | None = None
        self._previous_impl = model.config.text_config._attn_implementation
        if self.attn_implementation and self.attn_implementation != self._previous_impl:
            model.set_attn_implementation({"text_config": self.attn_implementation})
        self._image: tuple[torch.Tensor, torch.Tensor] | None = None  # (image_positions [B, N], is_image [B, S])
        self._overrides: dict = {}
        self._cache = None
        self._prompt_length = 0
        k = config.agg_layer
        self._handles = [
            self.llava.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
            self.layers[k].register_forward_pre_hook(self._on_layer_k, with_kwargs=True),
        ]
        self._handles += [
            layer.register_forward_pre_hook(self._on_later_layer, with_kwargs=True) for layer in self.layers[k + 1 :]
        ]
        self._register_scoring(self.layers[k - 1].self_attn)

    def _register_scoring(self, attention_module) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.model.config.text_config._attn_implementation != self._previous_impl:
            self.model.set_attn_implementation({"text_config": self._previous_impl})

    def _on_forward_start(self, module, args, kwargs):
        self._overrides = {}
        self._image = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return None
        is_image = input_ids == self.image_token_id
        num_image = int(is_image.sum(dim=1).max())
        if num_image == 0:
            return None
        self._image = (is_image.nonzero()[:, 1].view(input_ids.shape[0], num_image), is_image)
        return None

    def _on_later_layer(self, module, args, kwargs):
        kwargs.update(self._overrides)
        return args, kwargs

    def _continues_cache(self, cache) -> bool:
        return cache is not None and self._cache is not None and cache is self._cache


class MaskModeFastV(_HookedFastV):
    """Research-repo FastV: the same selection, dropped tokens masked as keys in layers >= K, nothing removed."""

    def _register_scoring(self, attn) -> None:
        self._captured: dict = {}
        self._attention: torch.Tensor | None = None
        self._head_dim, self._scaling = attn.head_dim, attn.scaling

        def pre(module, args, kwargs):
            if self._image is not None:
                self._captured["mask"] = kwargs.get("attention_mask")
                self._captured["rope"] = kwargs.get("position_embeddings")

        def query(module, args, output):
            if self._image is not None:
                self._captured["query"] = output[:, -1:]

        def keys(module, args, output):
            if self._image is not None:
                self._captured["keys"] = output

        def post(module, args, output):
            if self._image is None:
                return
            c, self._captured = self._captured, {}
            cos, sin = c["rope"]
            probs = last_query_attention(c["query"], c["keys"], cos, sin, c["mask"], self._head_dim, self._scaling)
            positions = self._image[0]
            self._attention = probs.gather(2, positions[:, None, :].expand(-1, probs.shape[1], -1))

        self._handles += [
            attn.register_forward_pre_hook(pre, with_kwargs=True),
            attn.q_proj.register_forward_hook(query),
            attn.k_proj.register_forward_hook(keys),
            attn.register_forward_hook(post),
        ]

    @staticmethod
    def _mask_keys(mask: torch.Tensor | None, keep_keys: torch.Tensor, q_len: int, causal_offset: int) -> torch.Tensor:
        """A 4D mask [batch, 1, q, k] that also masks the keys where keep_keys [batch, k] is False.

        Without an incoming mask, builds the causal pattern (query i at absolute position causal_offset + i).
        Keeps the incoming mask's kind: bool (True = attend) or additive float.
        """
        batch, k_len = keep_keys.shape
        if mask is None:
            q_pos = torch.arange(q_len, device=keep_keys.device)[:, None] + causal_offset
            causal = torch.arange(k_len, device=keep_keys.device)[None, :] <= q_pos  # [q, k]
            return causal[None, None] & keep_keys[:, None, None, :]
        mask = mask[..., -k_len:]
        if mask.dtype == torch.bool:
            return mask & keep_keys[:, None, None, :]
        return mask.masked_fill(~keep_keys[:, None, None, :], torch.finfo(mask.dtype).min)

    def _on_layer_k(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self._image is not None and self._attention is not None:
            image_positions, is_image = self._image
            selection = _select(self._attention, image_positions, is_image, self.config, self.generator)
            self._attention = None
            self.last_selection = selection
            self._prompt_length = is_image.shape[1]
            self._cache = cache
            mask = self._mask_keys(kwargs.get("attention_mask"), selection.keep, hidden.shape[1], 0)
            self._overrides = {"attention_mask": mask}
        elif self._continues_cache(cache) and self.last_selection is not None:
            # Decode: layers >= K cached every prompt token; keep masking the dropped ones.
            q_len = hidden.shape[1]
            k_len = cache.get_seq_length()  # layer 0 already holds this step's tokens
            keep = self.last_selection.keep
            generated = torch.ones(keep.shape[0], k_len - keep.shape[1], dtype=torch.bool, device=keep.device)
            keep_keys = torch.cat([keep, generated], dim=1)
            self._overrides = {
                "attention_mask": self._mask_keys(kwargs.get("attention_mask"), keep_keys, q_len, k_len - q_len)
            }
        kwargs.update(self._overrides)
        return args, kwargs


class EagerFastV(_HookedFastV):
    """Original FastV: eager attention, layer K-1's full [B, H, S, S] probabilities -> selection -> physical drop."""

    attn_implementation = "eager"

    def _register_scoring(self, attn) -> None:
        self._weights: torch.Tensor | None = None

        def post(module, args, output):
            if self._image is None:
                return
            weights = output[1]
            if weights is None:
                raise RuntimeError("EagerFastV needs the eager attention weights of layer K-1; got None")
            self._weights = weights  # [batch, heads, S, S], held until layer K as the original does

        self._handles.append(attn.register_forward_hook(post))

    def _on_layer_k(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self._image is not None and self._weights is not None:
            image_positions, is_image = self._image
            last_row = self._weights[:, :, -1, :]  # [batch, heads, S]
            attention = last_row.gather(2, image_positions[:, None, :].expand(-1, last_row.shape[1], -1))
            selection = _select(attention, image_positions, is_image, self.config, self.generator)
            self._weights = None
            kept = selection.kept_positions
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = _gather(hidden, kept, 1)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            overrides = {}
            mask = kwargs.get("attention_mask")
            if mask is not None:
                overrides["attention_mask"] = _gather(_gather(mask, kept, 2), kept, 3)
            cos, sin = kwargs["position_embeddings"]
            overrides["position_embeddings"] = (_gather(cos, kept, 1), _gather(sin, kept, 1))
            if kwargs.get("position_ids") is not None:
                overrides["position_ids"] = _gather(kwargs["position_ids"], kept, 1)
            self._overrides = overrides
            self.last_selection = selection
            self._prompt_length = is_image.shape[1]
            self._cache = cache
        elif self._continues_cache(cache) and self.last_selection is not None:
            mask = kwargs.get("attention_mask")
            self._overrides = {}
            if mask is not None:  # eager decode masks are materialised: gather the kept key columns
                kept = self.last_selection.kept_positions
                generated = torch.arange(self._prompt_length, mask.shape[-1], device=mask.device)
                keys = torch.cat([kept, generated.expand(kept.shape[0], -1)], dim=1)
                self._overrides = {"attention_mask": _gather(mask, keys, 3)}
        kwargs.update(self._overrides)
        return args, kwargs
