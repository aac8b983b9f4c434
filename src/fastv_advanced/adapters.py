"""Model adapters: where a vision-language model keeps what pruning touches, one class per layout of model families.

An adapter finds the decoder layers, the module whose forward sees `input_ids`, the image token id, each layer's
query/key tensors before RoPE (after any q/k normalisation) and head layout, the layer's input norm, the final norm,
the rotary embedding and, for methods that read it, the vision tower. The pruner and the methods name no model
class; a new family is a new adapter (or a new entry of an adapter's `families`).

Families (transformers 5.x `model_type` -> adapter):
- `llava`, `llava_next`, `llava_onevision`: `LlavaAdapter` (Llama / Mistral / Qwen2 decoders, `vision_tower`);
- `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`: `QwenVLAdapter` (M-RoPE, `visual`; Qwen3-VL's q/k norms and DeepStack);
- `gemma3`: `Gemma3Adapter` (q/k norms, sliding and full layers with their own RoPE and masks).
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
    """transformers' LLaVA-style models: the VLM module (`LlavaModel`, `LlavaNextModel`, `LlavaOnevisionModel`) holds
    `language_model` (layers with `input_layernorm` and `self_attn.q_proj/k_proj`, whose outputs are
    [batch, S, heads * head_dim] before RoPE; `norm`; `rotary_emb`), the vision tower and `multi_modal_projector`."""

    families = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}
    vision_attribute = "vision_tower"
    renumbers_positions = True  # a stage may close the gaps the dropped tokens leave (1-D positions)
    norm_before_rope = None  # None: q_proj/k_proj outputs; "sequence_first" [B, S, H, D] / "heads_first" [B, H, S, D]

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.vlm = self.find_vlm(model)
        if self.vlm is None:
            raise TypeError(f"{type(model).__name__} is not one of {', '.join(self.families.values())}")
        self.model_type = model.config.model_type
        self.family = self.families[self.model_type]
        self.text_model = self.vlm.language_model
        self.layers = self.text_model.layers
        self.text_config = self.text_model.config
        self.image_token_id = model.config.image_token_id

    @classmethod
    def handles(cls, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in cls.families and cls.find_vlm(model) is not None

    @classmethod
    def find_vlm(cls, model: torch.nn.Module) -> torch.nn.Module | None:
        """The module holding `language_model` and the vision tower, or None."""
        for candidate in (model, getattr(model, "model", None)):
            if candidate is not None and hasattr(candidate, "language_model") \
                    and hasattr(candidate, cls.vision_attribute):
                return candidate
        return None

    @property
    def prompt_module(self) -> torch.nn.Module:
        """The module whose forward receives `input_ids` (and the cache) for the whole prompt."""
        return self.vlm

    @staticmethod
    def input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
        return kwargs.get("input_ids", args[0] if args else None)

    # -- checks -------------------------------------------------------------------------------------------------

    def first_prunable_layer(self) -> int:
        """The lowest decoder layer before which tokens may be dropped."""
        return 0

    @property
    def patch_grid(self) -> str | None:
        """None when an image's tokens form one patch grid (LLaVA-1.5: 24 x 24), else why not."""
        if self.model_type == "llava":
            return None
        return f"{self.family}'s anyres image tokens (base image, tiles, a newline token per tile row) form no one grid"

    def image_grid_extents(self, model_inputs: dict, is_image: torch.Tensor,
                           runs: torch.Tensor) -> torch.Tensor | None:
        """LongTensor[batch, 2]: per row, the (rows, cols) its image tokens span on the image's token grid, where
        the model's inputs say it (Qwen-VL), else None. `is_image` BoolTensor[batch, S]; `runs` LongTensor[batch],
        the images in each row. Row-major order is assumed; the caller trusts it only for a row with one image
        whose count is rows x cols."""
        return None

    def check_prompt(self, seq_len: int) -> None:
        """ValueError when a prompt of `seq_len` tokens cannot be pruned on this model: a decoder with sliding-window
        layers (Gemma 3, a Mistral decoder with `sliding_window` set) takes prompts shorter than the window only."""
        window = getattr(self.text_config, "sliding_window", None)
        layer_types = getattr(self.text_config, "layer_types", None)
        sliding = layer_types is None or "sliding_attention" in layer_types
        if window and sliding and seq_len >= window:
            raise ValueError(
                f"{self.family}: the prompt has {seq_len} tokens, not fewer than sliding_window={window}; the "
                "sliding layers' caches then drop entries by count and pruning cannot line up with them"
            )

    # -- attention --------------------------------------------------------------------------------------------

    def attention(self, layer: int) -> torch.nn.Module:
        return self.layers[layer].self_attn

    def query_key_modules(self, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Modules whose outputs are the queries and keys before RoPE (see `flat_heads` for their shapes)."""
        attention = self.attention(layer)
        if self.norm_before_rope:
            return attention.q_norm, attention.k_norm
        return attention.q_proj, attention.k_proj

    def flat_heads(self, output: torch.Tensor) -> torch.Tensor:
        """A query/key module's output as [batch, S, heads * head_dim]."""
        if self.norm_before_rope == "sequence_first":  # [batch, S, heads, head_dim]
            return output.flatten(2)
        if self.norm_before_rope == "heads_first":  # [batch, heads, S, head_dim]
            return output.transpose(1, 2).flatten(2)
        return output

    def head_layout(self, layer: int) -> HeadLayout:
        attention = self.attention(layer)
        config = self.text_config
        return HeadLayout(config.num_attention_heads, config.num_key_value_heads, attention.head_dim,
                          attention.scaling)

    def query_key_from_input(self, layer: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s last-position query [batch, 1, heads * head_dim] and keys [batch, S, kv_heads * head_dim]
        (before RoPE) from its input hidden states [batch, S, hidden], as the layer itself would compute them."""
        normed = self.layers[layer].input_layernorm(hidden_states)
        attention = self.attention(layer)
        query, keys = attention.q_proj(normed[:, -1:]), attention.k_proj(normed)
        if self.norm_before_rope:
            head_dim = attention.head_dim
            query = attention.q_norm(query.unflatten(-1, (-1, head_dim))).flatten(2)
            keys = attention.k_norm(keys.unflatten(-1, (-1, head_dim))).flatten(2)
        return query, keys

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The language model's final norm (gain included) on [batch, S, hidden]."""
        return self.text_model.norm(hidden_states)

    def position_embeddings(self, layer: int, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        """Layer `layer`'s RoPE (cos, sin) [batch, S, head_dim] for 1-D `position_ids` [batch, S]."""
        return self.text_model.rotary_emb(hidden_states, position_ids=position_ids)

    @staticmethod
    def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)

    # -- vision tower (VisionZip) ---------------------------------------------------------------------------------

    def vision_select_layer(self) -> torch.nn.Module:
        """The vision encoder layer whose output the projector reads (`vision_feature_layer`, one layer only);
        it has `layer_norm1` and `self_attn.q_proj/k_proj` (CLIP-style, with a [CLS] token first)."""
        if self.model_type != "llava":
            raise ValueError(
                f"{self.family}: reading the vision tower's [CLS] attention needs a CLIP tower whose patches are the "
                "image tokens one to one (LLaVA-1.5); this model's image tokens are "
                + ("anyres tiles with newline tokens" if self.model_type == "llava_next" else
                   "SigLIP patches without a [CLS] token")
            )
        index = self._vision_feature_index()
        return self._vision_layers()[max(index - 1, 0)]

    def _vision_layers(self):
        tower = self.vlm.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def _vision_feature_index(self) -> int:
        """The index into the tower's `hidden_states` (0: embeddings, i: output of layer i - 1) the projector reads."""
        feature_layer = self.model.config.vision_feature_layer
        num_layers = len(self._vision_layers())
        if not isinstance(feature_layer, int):
            raise ValueError(f"vision_feature_layer={feature_layer!r}: methods that read the vision tower need one "
                             "feature layer")
        index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
        if not 0 <= index <= num_layers:
            raise ValueError(f"vision_feature_layer={feature_layer} is outside the tower's {num_layers} layers")
        return index

    def vision_features(self, inputs: torch.Tensor, outputs: torch.Tensor) -> VisionFeatures:
        """The select layer's [CLS] attention row and head-mean keys, from its input [batch, T, width] (CLIP: a
        pre-norm `layer_norm1`, `self_attn.q_proj/k_proj`, [CLS] first), with the features the projector reads
        [batch, T, width]: the layer's output, or its input where the features are the patch embeddings
        (`hidden_states[0]`, e.g. feature layer -2 of a one-layer tower: no attention layer produced them, so the
        [CLS] attention is that of the first encoder layer, the one that reads them)."""
        layer = self.vision_select_layer()
        attention = layer.self_attn
        batch, tokens, width = inputs.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        normed = layer.layer_norm1(inputs)
        query = attention.q_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # [batch, heads, 1, d]
        keys = attention.k_proj(normed).view(batch, tokens, heads, head_dim).transpose(1, 2)  # [batch, heads, T, d]
        logits = (query.float() @ keys.float().transpose(-1, -2))[:, :, 0] * attention.scale  # [batch, heads, T]
        features = inputs if self._vision_feature_index() == 0 else outputs
        return VisionFeatures(cls_attention=logits.softmax(dim=-1), keys=keys.mean(dim=1), hidden_states=features)

    def project_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """The projector: vision features [batch, T, width] -> language-model inputs [batch, T, hidden]."""
        return self.vlm.multi_modal_projector(features)


class QwenVLAdapter(LlavaAdapter):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the VLM module holds `language_model` and `visual`. M-RoPE reaches the
    layers as ordinary cos/sin [batch, S, head_dim] (the 3-D positions are merged inside `rotary_emb`), so kept
    tokens keep their original 3-D rotation; positions are never renumbered (a stage's `compact_positions` is not
    applied: the 3-D positions of an image grid have no 1-D gaps to close). Qwen3-VL scores after `q_norm`/`k_norm`
    and adds DeepStack vision features after its first decoder layers, so it prunes only after them."""

    families = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
    vision_attribute = "visual"
    renumbers_positions = False

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.norm_before_rope = "sequence_first" if self.model_type == "qwen3_vl" else None

    patch_grid = None  # each image's merged patches, h x w (image_grid_thw)

    def image_grid_extents(self, model_inputs: dict, is_image: torch.Tensor,
                           runs: torch.Tensor) -> torch.Tensor | None:
        """From the 3-D M-RoPE positions (`position_ids` [3 or 4, batch, S], what `generate` passes: the last two
        are the row and column of an image token) or, in a plain forward call, from `image_grid_thw` [images, 3]
        (each row's first image; patches merged `spatial_merge_size` x `spatial_merge_size`)."""
        positions = model_inputs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.dim() == 3 and positions.shape[0] >= 3:
            def extent(coordinate: torch.Tensor) -> torch.Tensor:  # [batch, S] -> [batch]
                highest = coordinate.masked_fill(~is_image, torch.iinfo(coordinate.dtype).min).amax(dim=1)
                return highest - coordinate.masked_fill(~is_image, torch.iinfo(coordinate.dtype).max).amin(dim=1) + 1

            return torch.stack([extent(positions[-2].long()), extent(positions[-1].long())], dim=1)
        grid = model_inputs.get("image_grid_thw")
        if not isinstance(grid, torch.Tensor) or grid.numel() == 0:
            return None
        first = (runs.cumsum(dim=0) - runs).clamp(max=grid.shape[0] - 1)  # [batch] each row's first image
        merge = self.model.config.vision_config.spatial_merge_size
        return grid.to(is_image.device)[first, 1:] // merge

    def first_prunable_layer(self) -> int:
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def position_embeddings(self, layer: int, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        raise ValueError(f"{self.family} positions are 3-D (M-RoPE): they are not renumbered")

    def vision_select_layer(self) -> torch.nn.Module:
        raise ValueError(f"{self.family}: the vision tower has no [CLS] token and merges patches before the "
                         "language model; methods that read its [CLS] attention do not apply")


class Gemma3Adapter(LlavaAdapter):
    """Gemma 3: `q_norm`/`k_norm` before RoPE (outputs [batch, heads, S, head_dim]); sliding-window and full layers
    each get their own cos/sin and mask, which the pruner gathers per layer. A prompt must be shorter than the
    sliding window: beyond it the sliding caches keep the last window entries by count and a physical drop no
    longer lines up with the masks."""

    families = {"gemma3": "Gemma 3"}
    norm_before_rope = "heads_first"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        if getattr(self.text_config, "attn_logit_softcapping", None):
            raise ValueError("Gemma 3 with attn_logit_softcapping is not supported: the scored attention would differ")
        self.layer_types = getattr(self.text_config, "layer_types", None) or ["full_attention"] * len(self.layers)

    patch_grid = None  # mm_tokens_per_image pooled tokens, a square

    def position_embeddings(self, layer: int, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        return self.text_model.rotary_emb(hidden_states, position_ids, self.layer_types[layer])

    def vision_select_layer(self) -> torch.nn.Module:
        raise ValueError("Gemma 3: the SigLIP tower has no [CLS] token and its patches are pooled before the "
                         "language model; methods that read its [CLS] attention do not apply")


ADAPTERS = (LlavaAdapter, QwenVLAdapter, Gemma3Adapter)


def supported_model_types() -> list[str]:
    """The `config.json` model types an adapter handles, in the order of `ADAPTERS`."""
    return [model_type for adapter in ADAPTERS for model_type in adapter.families]


def supported_families() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.families.values()]


def adapter_for(model: torch.nn.Module):
    """The adapter of `model`'s family; TypeError listing the supported families otherwise."""
    for adapter in ADAPTERS:
        if adapter.handles(model):
            return adapter(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise TypeError(
        f"pruning supports {', '.join(supported_families())} (transformers' *ForConditionalGeneration models of "
        f"those families); got {type(model).__name__} (model_type {model_type!r})"
    )
