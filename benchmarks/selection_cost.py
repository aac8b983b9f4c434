"""What the selection step costs: its time on the tensors layer K-1 hands it, and its memory as the sequence grows.

The selection step is what `apply_fastv` adds to a prefill besides the gathers: the last prompt position's
attention over the keys of layer K-1, the method's scores over the image tokens, the top-R and the kept
positions (and, timed separately, the drop's gathers). It runs only in `selection_step`, through the pruner's own
functions; everything else here captures its inputs, times it or measures its memory.
"""

from __future__ import annotations

import statistics

import torch

from fastv_advanced import FastVConfig, StageInputs
from fastv_advanced.selection import drop_tokens, gather_layer_inputs, kept_image_tokens
from fastv_advanced.selection import image_attention, kept_sequence, last_query_attention, ordered_positions
from measure import MemoryProbe, Stopwatch
from modes import Config, mode_context


def selection_inputs(model, inputs: dict, k: int) -> dict:
    """Capture, in an unpruned forward, what the selection reads at layer K-1: the last query row, the keys,
    RoPE cos/sin and mask (as `fastv_advanced.pruning` captures them), plus layer K's input for the gathers."""
    attn = model.model.language_model.layers[k - 1].self_attn
    captured = {}
    handles = [
        attn.register_forward_pre_hook(
            lambda m, a, kw: captured.update(mask=kw.get("attention_mask"), rope=kw.get("position_embeddings")),
            with_kwargs=True),
        attn.q_proj.register_forward_hook(lambda m, a, o: captured.update(query=o[:, -1:].clone())),
        attn.k_proj.register_forward_hook(lambda m, a, o: captured.update(keys=o.clone())),
        model.model.language_model.layers[k].register_forward_pre_hook(
            lambda m, a, kw: captured.update(hidden=(a[0] if a else kw["hidden_states"]).clone(),
                                             position_ids=kw.get("position_ids")), with_kwargs=True),
    ]
    try:
        with mode_context(model, Config("baseline")), torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    captured["head_dim"], captured["scaling"] = attn.head_dim, attn.scaling
    is_image = inputs["input_ids"] == model.config.image_token_id
    captured["image_positions"] = ordered_positions(is_image, int(is_image[0].sum()))
    return captured


# -- the selection path ---------------------------------------------------------------------------------------------
# Everything this benchmark times or measures of the selection runs through `selection_step`, which calls what the
# pruner calls at a stage (`fastv_advanced.pruning`): the one-row attention, the method's `choose`,
# `kept_image_tokens` (the top-R), `drop_tokens` (kept positions, hidden states) and `gather_layer_inputs` (mask,
# positions, cos/sin), with no host sync.


def selection_step(c: dict, fastv: FastVConfig, generator, with_gathers: bool = False) -> torch.Tensor:
    """The selection as `apply_fastv` runs it from the captured layer K-1 tensors `c` (and, with_gathers, the
    drop's gathers of hidden states, mask, cos/sin and position ids); returns the kept positions [batch, S']."""
    cos, sin = c["rope"]
    probs = last_query_attention(c["query"], c["keys"], cos, sin, c["mask"], c["head_dim"], c["scaling"])
    positions = c["image_positions"]  # [batch, n]
    batch, num_image = positions.shape
    inputs = StageInputs(
        num_image_tokens=num_image, num_original_image_tokens=num_image, image_positions=positions,
        image_indices=torch.arange(num_image, device=positions.device).expand(batch, -1),
        attention=image_attention(probs, positions), hidden_states=None, generator=generator,
    )
    top = kept_image_tokens(fastv, fastv.choose(0, inputs), batch, num_image)  # [batch, R]
    if not with_gathers:
        return kept_sequence(positions, top, c["hidden"].shape[1])[0]
    layer_inputs = {"attention_mask": c["mask"], "position_ids": c.get("position_ids"), "position_embeddings": c["rope"]}
    _, kept, _ = drop_tokens(c["hidden"], positions, top)
    for name, value in layer_inputs.items():
        if value is not None:
            gather_layer_inputs(name, value, kept, None, None, None)
    return kept


# -- measurements --------------------------------------------------------------------------------------------------


def time_selection(c: dict, k: int, rank: int, device: torch.device, reps: int = 5) -> dict:
    """The selection step alone on the captured layer K-1 tensors `c`, without and with the drop's gathers:
    {"selection_s": ..., "selection_and_gathers_s": ...}, each the median of `reps` back-to-back calls."""
    fastv = FastVConfig(agg_layer=k, attention_rank=rank)
    generator = torch.Generator().manual_seed(0)
    medians = {}
    with torch.inference_mode():
        for name, gathers in (("selection_s", False), ("selection_and_gathers_s", True)):
            times = []
            for _ in range(reps):
                with Stopwatch(device) as watch:
                    selection_step(c, fastv, generator, gathers)
                times.append(watch.seconds)
            medians[name] = statistics.median(times)
    return medians


def synthetic_selection_inputs(model, device, dtype, seq_len: int, n_before: int, n_after: int, g) -> dict:
    """Random layer K-1 tensors of one prompt of `seq_len` tokens at the model's head count and widths, in the
    layout `selection_inputs` captures (no mask: causal, no padding)."""
    text = model.config.text_config
    attn = model.model.language_model.layers[0].self_attn
    heads, kv_heads, head_dim = text.num_attention_heads, text.num_key_value_heads, attn.head_dim
    n_image = seq_len - n_before - n_after
    x = torch.zeros(1, seq_len, text.hidden_size, device=device, dtype=dtype)
    cos, sin = model.model.language_model.rotary_emb(x, torch.arange(seq_len, device=device)[None])
    del x
    return {
        "query": torch.randn(1, 1, heads * head_dim, generator=g).to(device, dtype),
        "keys": torch.randn(1, seq_len, kv_heads * head_dim, generator=g).to(device, dtype),
        "rope": (cos, sin), "mask": None, "head_dim": head_dim, "scaling": attn.scaling,
        "image_positions": torch.arange(n_before, n_before + n_image, device=device)[None],
        "hidden": torch.zeros(1, seq_len, 1, device=device, dtype=dtype),
    }


def selection_memory_scaling(model, device, dtype, seq_lens: list[int], n_before: int, n_after: int) -> list[dict]:
    """Peak extra memory of the selection step at growing sequence lengths (synthetic tensors at the model's
    head count and widths), next to the H x S x S attention weights that eager FastV materialises and holds."""
    heads = model.config.text_config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for seq_len in seq_lens:
        n_image = seq_len - n_before - n_after
        with torch.inference_mode():
            c = synthetic_selection_inputs(model, device, dtype, seq_len, n_before, n_after, g)
            fastv = FastVConfig(agg_layer=1, attention_rank=n_image // 2)
            selection_step(c, fastv, generator)  # warm-up
            probe = MemoryProbe(device)
            with probe:
                selection_step(c, fastv, generator)
        element = torch.finfo(dtype).bits // 8
        rows.append({
            "seq_len": seq_len,
            "selection_peak_extra_bytes": probe.peak_extra,
            "inputs_bytes": (c["keys"].numel() + c["query"].numel()) * element,
            "full_attention_weights_bytes": heads * seq_len * seq_len * element,
        })
        del c
    return rows
