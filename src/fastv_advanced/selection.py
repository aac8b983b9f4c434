"""The selection path shared by every pruning method and by the benchmark: the attention rows a stage reads, the
top-k of a method's choice, the drop's gathers.

Pure tensor functions, no hooks and no host syncs; the pruner (`fastv_advanced.pruning`) calls them at each stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the methods use this module; it needs their types for annotations only
    from .methods.base import Choice, PruningMethod


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama RoPE. x: [batch, heads, S, head_dim]; cos, sin: [batch or 1, S, head_dim]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def last_query_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor | None,
    head_dim: int,
    scaling: float,
) -> torch.Tensor:
    """Attention probabilities of the last position over all keys: FloatTensor[batch, heads, S].

    query: [batch, 1, heads * head_dim] (q_proj output of the last position, before RoPE);
    keys: [batch, S, kv_heads * head_dim] (k_proj output, before RoPE); cos, sin: [batch or 1, S, head_dim];
    attention_mask: None (causal, no padding), a 4D mask [batch or 1, 1 or heads, S, S] (bool: True = attend;
    float: additive) or a 2D padding mask [batch, S] (1 = token). Only the last row of the mask is read.
    """
    return query_rows_attention(query, keys, cos, sin, attention_mask, head_dim, scaling)[:, :, 0]


def _mask_rows(attention_mask: torch.Tensor, rows: int, seq_len: int) -> torch.Tensor:
    """The last `rows` query rows of a 4D mask [batch or 1, 1 or heads, S, S] or a 2D padding mask [batch, S]
    (1 = token), as [batch or 1, 1 or heads, rows or 1, S]."""
    if attention_mask.dim() == 4:
        return attention_mask[:, :, -rows:, -seq_len:]
    if attention_mask.dim() == 2:
        return attention_mask[:, None, None, -seq_len:].bool()
    raise TypeError(f"unsupported attention mask of shape {tuple(attention_mask.shape)}")


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = attend) fills -inf, a float mask is added."""
    return logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()


def query_rows_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor | None,
    head_dim: int,
    scaling: float,
) -> torch.Tensor:
    """Attention probabilities of the last Q positions over all keys: FloatTensor[batch, heads, Q, S].

    queries: [batch, Q, heads * head_dim] (before RoPE); otherwise as `last_query_attention`, whose mask rows -Q..-1
    are read (a 2D padding mask or None adds the causal mask).
    """
    batch, seq_len, _ = keys.shape
    rows = queries.shape[1]
    num_heads, num_kv_heads = queries.shape[-1] // head_dim, keys.shape[-1] // head_dim
    group = num_heads // num_kv_heads
    q = apply_rope(queries.view(batch, rows, num_heads, head_dim).transpose(1, 2), cos[:, -rows:], sin[:, -rows:])
    k = apply_rope(keys.view(batch, seq_len, num_kv_heads, head_dim).transpose(1, 2), cos, sin)
    q = q.reshape(batch, num_kv_heads, group, rows, head_dim).float()
    logits = torch.einsum("bkgqd,bksd->bkgqs", q, k.float()).reshape(batch, num_heads, rows, seq_len) * scaling
    query_position = torch.arange(seq_len - rows, seq_len, device=keys.device)
    causal = torch.arange(seq_len, device=keys.device)[None] <= query_position[:, None]  # [Q, S]
    logits = logits.masked_fill(~causal, float("-inf"))
    if attention_mask is not None:
        logits = _apply_mask(logits, _mask_rows(attention_mask, rows, seq_len))
    return logits.softmax(dim=-1)


def gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Per batch row, pick positions `index` [batch, n] along `dim` of x [batch or 1, ...]."""
    x = x.expand(index.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    expanded = list(x.shape)
    expanded[dim] = index.shape[1]
    return x.gather(dim, index.view(shape).expand(expanded))


def gather_mask(mask: torch.Tensor | None, query_index: torch.Tensor | None, key_index: torch.Tensor):
    """Gather a 4D mask [batch, h, q, k] (query and key axes) or a 2D padding mask [batch, k] (key axis)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"FastV cannot prune with an attention mask of type {type(mask).__name__}; use sdpa or eager")
    if mask.dim() == 2:
        return gather_rows(mask, key_index, 1)
    if query_index is not None:
        mask = gather_rows(mask, query_index, 2)
    return gather_rows(mask, key_index, 3)


def ordered_positions(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the ascending positions where `flags` [batch, S] is True, the first `count` of them:
    LongTensor[batch, count]. A sort instead of `nonzero`, so no host sync; rows must have >= count True."""
    seq_len = flags.shape[1]
    order = torch.arange(seq_len, device=flags.device).expand(flags.shape[0], -1)
    return torch.where(flags, order, order + seq_len).sort(dim=-1).values[:, :count]


def image_attention(probs: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """The columns of `probs` [batch, heads, S] (or [batch, heads, Q, S]) at `image_positions` [batch, n]:
    [batch, heads, n] (or [batch, heads, Q, n])."""
    if probs.dim() == 4:
        index = image_positions[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
        return probs.gather(3, index)
    return probs.gather(2, image_positions[:, None, :].expand(-1, probs.shape[1], -1))


def top_scores(scores: torch.Tensor, num_kept: int) -> torch.Tensor:
    """Indices of the `num_kept` highest scores [batch, n] per row, ascending: LongTensor[batch, num_kept]."""
    return scores.topk(num_kept, dim=-1).indices.sort(dim=-1).values


def kept_sequence(image_positions: torch.Tensor, kept: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every non-image token and the image tokens `kept` [batch, R] (indices into `image_positions`
    [batch, n], sequence positions of the image tokens). Returns (kept_positions LongTensor[batch, S'] ascending,
    keep BoolTensor[batch, S]) with S' = seq_len - n + R."""
    batch, num_image = image_positions.shape
    keep = torch.ones(batch, seq_len, dtype=torch.bool, device=image_positions.device)
    keep.scatter_(1, image_positions, False)
    keep.scatter_(1, image_positions.gather(1, kept), True)
    return ordered_positions(keep, seq_len - num_image + kept.shape[1]), keep


def rotated_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Keys [batch, S, kv_heads * head_dim] before RoPE -> after RoPE, same shape (cos, sin [batch or 1, S, d])."""
    batch, seq_len, width = keys.shape
    heads = keys.view(batch, seq_len, width // head_dim, head_dim).transpose(1, 2)
    return apply_rope(heads, cos, sin).transpose(1, 2).reshape(batch, seq_len, width)


def kept_image_tokens(method: PruningMethod, choice: Choice, batch: int, num_image: int) -> torch.Tensor:
    """The kept image tokens of a `Choice`, ascending: LongTensor[batch, R]; ValueError on a malformed one."""
    name = method.name
    if choice.kept is not None:
        if choice.kept.dim() != 2 or choice.kept.shape[0] != batch or choice.kept.shape[1] > num_image:
            raise ValueError(f"{name} kept indices of shape {tuple(choice.kept.shape)}; expected [batch, R] = "
                             f"[{batch}, R <= {num_image}]")
        top = choice.kept.sort(dim=-1).values
    else:
        if choice.scores is None or tuple(choice.scores.shape) != (batch, num_image) or choice.num_kept is None \
                or not 0 <= choice.num_kept <= num_image:
            shape = None if choice.scores is None else tuple(choice.scores.shape)
            raise ValueError(f"{name} returned scores of shape {shape} and num_kept {choice.num_kept}; expected "
                             f"[batch, n] = {[batch, num_image]} and 0 <= num_kept <= {num_image}")
        top = top_scores(choice.scores, choice.num_kept)
    if choice.replacement is not None and tuple(choice.replacement.shape[:2]) != tuple(top.shape):
        raise ValueError(f"{name} replacement of shape {tuple(choice.replacement.shape)}; expected "
                         f"[batch, R, hidden] with [batch, R] = {list(top.shape)}")
    return top


def drop_tokens(hidden: torch.Tensor, image_positions: torch.Tensor,
                top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The physical drop before a layer: keep every non-image token and the image tokens `top` [batch, R] (indices
    into `image_positions` [batch, n]). Returns (hidden [batch, S', hidden] gathered per row, kept_positions
    LongTensor[batch, S'], keep BoolTensor[batch, S])."""
    kept, keep = kept_sequence(image_positions, top, hidden.shape[1])
    return gather_rows(hidden, kept, 1), kept, keep


def gather_layer_inputs(name: str, value, positions: torch.Tensor, offsets: torch.Tensor | None,
                        position_ids: torch.Tensor | None, recompute_rope):
    """One of a decoder layer's inputs, built by the model for the whole prompt, gathered to the tokens at original
    `positions` [batch, S'] (a 4D mask on both axes, a 2D mask on keys). With `offsets` [batch, S'] (how far each
    token's position moved down where a stage renumbered positions) position ids are moved down and cos/sin are
    recomputed by `recompute_rope(position_ids)` from the layer's full-prompt `position_ids` [batch, S]."""
    if name == "attention_mask":
        return gather_mask(value, positions, positions)
    if name == "position_ids":
        gathered = gather_rows(value, positions, 1)
        return gathered if offsets is None else gathered - offsets
    if offsets is None:
        cos, sin = value
        return gather_rows(cos, positions, 1), gather_rows(sin, positions, 1)
    if position_ids is None:
        raise ValueError("renumbered positions need the layer's position_ids; the model passed none")
    return recompute_rope(gather_rows(position_ids, positions, 1) - offsets)


def image_starts(is_image: torch.Tensor) -> torch.Tensor:
    """BoolTensor[batch, S]: the first token of each image, one image being a run of consecutive image tokens of
    `is_image` [batch, S]."""
    return is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0))


def image_numbers(is_image: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """Which image each image token belongs to, 0-based in prompt order: LongTensor[batch, N] for the image tokens
    at `image_positions` [batch, N] of `is_image` [batch, S]."""
    return (image_starts(is_image).long().cumsum(dim=1) - 1).gather(1, image_positions)


def ragged_kept_sequence(image_positions: torch.Tensor, is_image: torch.Tensor, padding: torch.Tensor | None,
                         top: torch.Tensor, kept_valid: torch.Tensor, real_lengths: list[int]):
    """The drop for rows that keep different numbers of image tokens, made rectangular with padding tokens.

    image_positions: LongTensor[batch, n], the current image tokens' positions (a row's slots past its own count
    point at the last position); is_image: BoolTensor[batch, S], the rows' current image tokens; padding:
    BoolTensor[batch, S], tokens kept as padding by an earlier step (None: none); top:
    LongTensor[batch, R], the kept ones as indices into `image_positions`; kept_valid: BoolTensor[batch, R], which
    entries of `top` are real (a row keeping fewer has trailing unused entries); real_lengths: per row, how many
    real tokens remain after the drop. The last position must be text in every row.

    Row b keeps its real tokens plus the first `max(real_lengths) - real_lengths[b]` of the other tokens of its
    sequence (dropped image tokens or earlier padding), as padding that no other token may attend to. Returns
    (kept_positions LongTensor[batch, S'], keep BoolTensor[batch, S] (padding included), dropped BoolTensor[batch,
    S]: the image tokens dropped by this step, padding BoolTensor[batch, S']: which kept tokens are padding).
    """
    batch, seq_len = is_image.shape
    real = ~is_image if padding is None else ~is_image & ~padding
    real.scatter_(1, image_positions.gather(1, top).masked_fill(~kept_valid, seq_len - 1), True)
    length = max(real_lengths)
    needed = torch.tensor([length - n for n in real_lengths], device=is_image.device)
    spare = ~real
    new_padding = spare & (spare.long().cumsum(dim=1) <= needed[:, None])
    keep = real | new_padding
    kept = ordered_positions(keep, length)
    return kept, keep, is_image & ~real, new_padding.gather(1, kept)


def block_key_columns(mask: torch.Tensor | None, blocked: torch.Tensor, queries: int, flash: bool = False):
    """A layer's attention mask with the `blocked` [batch, K] key columns (padding tokens) closed to every query
    but themselves (the Q query rows are the last Q tokens, so in a prefill a blocked token still attends to
    itself and no row is empty).

    mask: a 4D mask [batch or 1, 1 or heads, Q, K] (bool: True = attend; float: additive), a 2D padding mask
    [batch, K] (1 = token), or None (causal, no padding): then a causal bool mask [batch, 1, Q, K] is made, or
    with `flash` (FlashAttention reads 2D masks only) a 2D one."""
    batch, width = blocked.shape
    if mask is None and flash:
        mask = torch.ones(batch, width, dtype=torch.long, device=blocked.device)
    if mask is None:
        query_positions = torch.arange(width - queries, width, device=blocked.device)
        mask = (torch.arange(width, device=blocked.device)[None] <= query_positions[:, None])[None, None]
    if mask.dim() == 2:
        return mask.masked_fill(blocked, 0)
    queries = mask.shape[-2]
    columns = blocked[:, None, None, :].expand(-1, 1, queries, -1)
    query_positions = torch.arange(width - queries, width, device=blocked.device)
    columns = columns & (torch.arange(width, device=blocked.device)[None] != query_positions[:, None])
    if mask.dtype == torch.bool:
        return mask.masked_fill(columns, False)
    return mask.masked_fill(columns, torch.finfo(mask.dtype).min)
