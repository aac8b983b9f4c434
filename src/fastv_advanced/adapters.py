"""Model adapters: where a vision-language model keeps what pruning touches, one class per model family.

An adapter finds the decoder layers, the module whose forward sees `input_ids`, the image token id, each layer's
query/key projections (after any q/k normalisation) and head layout, the layer's input norm and the rotary
embedding. The pruner and the methods name no model class; a new family is a new adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .methods.base import VisionFeatures
from .selection import apply_rope


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads of one decoder layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


class LlavaAdapter:
    """transformers' LLaVA (`LlavaForConditionalGeneration` / `LlavaModel`) with a Llama-style decoder: each layer
    has `input_layernorm` and `self_attn.q_proj/k_proj` (outputs [batch, S, heads * head_dim], before RoPE); the
    language model has `layers`, `norm` and `rotary_emb`."""

    family = "LLaVA (Llama-style decoder)"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.vlm = self.find_vlm(model)
        if self.vlm is None:
            raise TypeError(f"{type(model).__name__} is not a LLaVA model")
        self.text_model = self.vlm.language_model
        self.layers = self.text_model.layers
        self.image_token_id = model.config.image_token_id

    @staticmethod
    def find_vlm(model: torch.nn.Module) -> torch.nn.Module | None:
        """The module holding `language_model` and `vision_tower` (the `LlavaModel`), or None."""
        for candidate in (model, getattr(model, "model", None)):
            if candidate is not None and hasattr(candidate, "language_model") and hasattr(candidate, "vision_tower"):
                return candidate
        return None

    @property
    def prompt_module(self) -> torch.nn.Module:
        """The module whose forward receives `input_ids` (and the cache) for the whole prompt."""
        return self.vlm

    @staticmethod
    def input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
        return kwargs.get("input_ids", args[0] if args else None)

    def attention(self, layer: int) -> torch.nn.Module:
        return self.layers[layer].self_attn

    def query_key_modules(self, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Modules whose outputs are the queries and keys before RoPE: [batch, S, heads * head_dim]."""
        attention = self.attention(layer)
        return attention.q_proj, attention.k_proj

    def head_layout(self, layer: int) -> HeadLayout:
        attention = self.attention(layer)
        config = self.text_model.config
        return HeadLayout(config.num_attention_heads, config.num_key_value_heads, attention.head_dim,
                          attention.scaling)

    def query_key_from_input(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s last-position query [batch, 1, heads * head_dim] and keys [batch, S, kv_heads * head_dim]
        (before RoPE) from its input hidden states [batch, S, hidden], as the layer itself would compute them."""
        normed = self.layers[layer].input_layernorm(hidden_states)
        q_module, k_module = self.query_key_modules(layer)
        return q_module(normed[:, -1:]), k_module(normed)

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The language model's final norm (gain included) on [batch, S, hidden]."""
        return self.text_model.norm(hidden_states)

    def vision_select_layer(self) -> torch.nn.Module:
        """The vision encoder layer whose output the projector reads (`vision_feature_layer`, one layer only);
        it has `layer_norm1` and `self_attn.q_proj/k_proj` (CLIP-style, with a [CLS] token first)."""
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int) or feature_layer == 0:
            raise ValueError(f"vision_feature_layer={feature_layer!r}: methods that read the vision tower need one "
                             "encoder layer")
        tower = self.vlm.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return layers[feature_layer if feature_layer < 0 else feature_layer - 1]

    def vision_features(self, inputs: torch.Tensor, outputs: torch.Tensor) -> VisionFeatures:
        """The select layer's [CLS] attention row and head-mean keys, from its input [batch, T, width] (CLIP: a
        pre-norm `layer_norm1`, `self_attn.q_proj/k_proj`, [CLS] first), with its output [batch, T, width]."""
        layer = self.vision_select_layer()
        attention = layer.self_attn
        batch, tokens, width = inputs.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        normed = layer.layer_norm1(inputs)
        query = attention.q_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # [batch, heads, 1, d]
        keys = attention.k_proj(normed).view(batch, tokens, heads, head_dim).transpose(1, 2)  # [batch, heads, T, d]
        logits = (query.float() @ keys.float().transpose(-1, -2))[:, :, 0] * attention.scale  # [batch, heads, T]
        return VisionFeatures(cls_attention=logits.softmax(dim=-1), keys=keys.mean(dim=1), hidden_states=outputs)

    def project_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """The projector: vision features [batch, T, width] -> language-model inputs [batch, T, hidden]."""
        return self.vlm.multi_modal_projector(features)

    def position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        """RoPE (cos, sin) [batch, S, head_dim] for `position_ids` [batch, S]."""
        return self.text_model.rotary_emb(hidden_states, position_ids=position_ids)

    @staticmethod
    def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)


ADAPTERS = (LlavaAdapter,)


def adapter_for(model: torch.nn.Module):
    """The adapter of `model`'s family; TypeError listing the supported families otherwise."""
    for adapter in ADAPTERS:
        if adapter.find_vlm(model) is not None:
            return adapter(model)
    supported = "; ".join(a.family for a in ADAPTERS)
    raise TypeError(
        f"pruning supports {supported} (e.g. transformers' LlavaForConditionalGeneration); got {type(model).__name__}"
    )
