"""What the selection step costs: its time on the tensors layer K-1 hands it, and its memory as the sequence grows.

The selection step is what `apply_fastv` adds to a prefill besides the gathers: the last prompt position's
attention over the keys of layer K-1, the strategy's scores over the image tokens, the top-R and the kept
positions (and, timed separately, the drop's gathers). It runs only in `selection_step` (`select` and
`drop_gathers`, the seam below); everything else here captures its inputs, times it or measures its memory.
"""

from __future__ import annotations

import statistics

import torch

from fastv_advanced import FastVConfig
from fastv_advanced.selection import gather_mask, gather_rows, last_query_attention
from fastv_advanced.strategies import get_strategy, run_strategy
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
    captured["is_image"] = is_image
    captured["image_positions"] = is_image.nonzero()[:, 1].view(is_image.shape[0], -1)
    return captured


# -- the seam ----------------------------------------------------------------------------------------------------
# Everything this benchmark times or measures of the selection runs through `select` and `drop_gathers`. Their
# bodies follow `fastv_advanced.pruning.FastVPruner._select` and `._drop_tokens` step for step, with the package's
# public tensor functions (`last_query_attention`, `gather_rows`, `gather_mask`) and, like the pruner, no host sync.
# When the package exposes its whole selection path, these two bodies become calls to it; nothing else changes.


def select(c: dict, rank: int, fastv: FastVConfig, strategy, generator) -> torch.Tensor:
    """Kept sequence positions LongTensor[batch, S'] from the captured layer K-1 tensors `c`: last-query scores ->
    strategy -> top-R -> kept positions."""
    cos, sin = c["rope"]
    probs = last_query_attention(c["query"], c["keys"], cos, sin, c["mask"], c["head_dim"], c["scaling"])
    positions = c["image_positions"]
    attention = probs.gather(2, positions[:, None, :].expand(-1, probs.shape[1], -1))  # [B, H, N]
    scores, _ = run_strategy(strategy, attention, fastv, generator)
    top = scores.topk(rank, dim=-1).indices.sort(dim=-1).values
    keep = ~c["is_image"]
    keep.scatter_(1, positions.gather(1, top), True)
    batch, seq_len = keep.shape
    num_kept = seq_len - positions.shape[1] + rank
    order = torch.arange(seq_len, device=keep.device).expand(batch, -1)
    # Kept positions first, in order, without a host sync: dropped ones are pushed past seq_len and cut off.
    return torch.where(keep, order, order + seq_len).sort(dim=-1).values[:, :num_kept]


def drop_gathers(c: dict, kept: torch.Tensor) -> None:
    """The drop's gathers at layer K to the kept positions: hidden states, mask, RoPE cos/sin, position ids."""
    gather_rows(c["hidden"], kept, 1)
    gather_mask(c["mask"], kept, kept)
    cos, sin = c["rope"]
    gather_rows(cos, kept, 1)
    gather_rows(sin, kept, 1)
    if c.get("position_ids") is not None:
        gather_rows(c["position_ids"], kept, 1)


def selection_step(c: dict, rank: int, fastv: FastVConfig, strategy, generator, with_gathers: bool = False):
    """The selection as `apply_fastv` runs it (and, with_gathers, the drop's gathers); returns the kept positions."""
    kept = select(c, rank, fastv, strategy, generator)
    if with_gathers:
        drop_gathers(c, kept)
    return kept


# -- measurements --------------------------------------------------------------------------------------------------


def time_selection(c: dict, k: int, rank: int, device: torch.device, reps: int = 5) -> dict:
    """The selection step alone on the captured layer K-1 tensors `c`, without and with the drop's gathers:
    {"selection_s": ..., "selection_and_gathers_s": ...}, each the median of `reps` back-to-back calls."""
    fastv = FastVConfig(agg_layer=k, attention_rank=rank)
    strategy, generator = get_strategy(fastv.token_selection_method), torch.Generator().manual_seed(0)
    medians = {}
    with torch.inference_mode():
        for name, gathers in (("selection_s", False), ("selection_and_gathers_s", True)):
            times = []
            for _ in range(reps):
                with Stopwatch(device) as watch:
                    selection_step(c, rank, fastv, strategy, generator, gathers)
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
    ids = torch.zeros(1, seq_len, dtype=torch.bool)
    ids[0, n_before:n_before + n_image] = True
    x = torch.zeros(1, seq_len, text.hidden_size, device=device, dtype=dtype)
    cos, sin = model.model.language_model.rotary_emb(x, torch.arange(seq_len, device=device)[None])
    del x
    return {
        "query": torch.randn(1, 1, heads * head_dim, generator=g).to(device, dtype),
        "keys": torch.randn(1, seq_len, kv_heads * head_dim, generator=g).to(device, dtype),
        "rope": (cos, sin), "mask": None, "head_dim": head_dim, "scaling": attn.scaling,
        "is_image": ids.to(device),
        "image_positions": ids.nonzero()[:, 1].view(1, -1).to(device),
    }


def selection_memory_scaling(model, device, dtype, seq_lens: list[int], n_before: int, n_after: int) -> list[dict]:
    """Peak extra memory of the selection step at growing sequence lengths (synthetic tensors at the model's
    head count and widths), next to the H x S x S attention weights that eager FastV materialises and holds."""
    heads = model.config.text_config.num_attention_heads
    strategy = get_strategy("avg_all_heads")
    generator = torch.Generator().manual_seed(0)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for seq_len in seq_lens:
        n_image = seq_len - n_before - n_after
        with torch.inference_mode():
            c = synthetic_selection_inputs(model, device, dtype, seq_len, n_before, n_after, g)
            fastv = FastVConfig(agg_layer=1, attention_rank=n_image // 2)
            selection_step(c, n_image // 2, fastv, strategy, generator)  # warm-up
            probe = MemoryProbe(device)
            with probe:
                selection_step(c, n_image // 2, fastv, strategy, generator)
        element = torch.finfo(dtype).bits // 8
        rows.append({
            "seq_len": seq_len,
            "selection_peak_extra_bytes": probe.peak_extra,
            "inputs_bytes": (c["keys"].numel() + c["query"].numel()) * element,
            "full_attention_weights_bytes": heads * seq_len * seq_len * element,
        })
        del c
    return rows
