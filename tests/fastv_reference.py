"""Independent reference computations for FastV tests.

Nothing here uses fastv_advanced's pruning code: scores come from eager attention weights of the unmodified model,
and pruned forwards are run as a plain loop over the decoder layers of an eager copy of the model, with dropped
tokens masked as keys in layers >= K (equal to physically removing them).
"""

from __future__ import annotations

import copy

import torch


def eager_copy(model):
    """A deep copy of `model` whose text model runs eager attention."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    return reference.eval()


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> list[list[int]]:
    """Per row, the sequence positions of the image tokens."""
    return [[j for j, t in enumerate(row.tolist()) if t == image_token_id] for row in input_ids]


def last_row_image_attention(eager_model, inputs: dict, agg_layer: int) -> list[torch.Tensor]:
    """Per row, layer agg_layer-1 attention of the last position to the image tokens: [heads, n_image]."""
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True)
    attn = out.attentions[agg_layer - 1]  # [batch, heads, S, S]
    positions = image_positions(inputs["input_ids"], eager_model.config.image_token_id)
    return [attn[b, :, -1, positions[b]].float() for b in range(attn.shape[0])]


def reference_scores(attn: torch.Tensor, method: str, alpha: float = 0.5) -> torch.Tensor:
    """Scores of one row from its [heads, n_image] attention, written out head by head."""
    num_heads = attn.shape[0]
    if method == "avg_all_heads":
        return sum(attn[h] for h in range(num_heads)) / num_heads
    totals = [float(attn[h].sum()) for h in range(num_heads)]
    best = max(range(num_heads), key=lambda h: totals[h])
    if method == "max_head":
        return attn[best]
    if method == "weighted_combination":
        if num_heads == 1:
            return alpha * attn[best]
        others = [attn[h] for h in range(num_heads) if h != best]
        return alpha * attn[best] + (1 - alpha) * (sum(others) / len(others))
    raise ValueError(method)


def reference_kept(scores: torch.Tensor, rank: int) -> list[int]:
    """Indices of the `rank` highest scores, ascending."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return sorted(order[:rank])


def embeddings(model, inputs: dict) -> torch.Tensor:
    """The decoder's input embeddings (image features spliced in), captured from an unmodified forward."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured["embeds"]


def masked_forward_logits(
    eager_model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    agg_layer: int,
    dropped: torch.Tensor,
) -> torch.Tensor:
    """Logits [batch, S, vocab] of a no-cache forward where layers >= agg_layer cannot attend to `dropped` keys.

    inputs_embeds [batch, S, hidden]; attention_mask [batch, S] (1 = token); position_ids [batch, S];
    dropped: BoolTensor [batch, S].
    """
    text_model = eager_model.model.language_model
    batch, seq_len, _ = inputs_embeds.shape
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # [batch, S(query), S(key)]
    allowed_late = allowed & ~dropped[:, None, :]
    minimum = torch.finfo(inputs_embeds.dtype).min

    def additive(mask):
        return torch.where(mask, 0.0, minimum)[:, None].to(inputs_embeds.dtype)

    early, late = additive(allowed), additive(allowed_late)
    hidden = inputs_embeds
    rope = text_model.rotary_emb(hidden, position_ids=position_ids)
    with torch.no_grad():
        for index, layer in enumerate(text_model.layers):
            hidden = layer(
                hidden,
                attention_mask=early if index < agg_layer else late,
                position_embeddings=rope,
                position_ids=position_ids,
            )
        return eager_model.lm_head(text_model.norm(hidden))


def generate_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` computes them: cumsum(mask) - 1, pads set to 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def masked_greedy_generate(
    eager_model, inputs_embeds, attention_mask, agg_layer, dropped, max_new_tokens: int
) -> torch.Tensor:
    """Greedy tokens [batch, max_new_tokens] by full recomputation each step, the dropped prompt tokens fixed."""
    embed = eager_model.get_input_embeddings()
    batch = inputs_embeds.shape[0]
    tokens = []
    for _ in range(max_new_tokens):
        logits = masked_forward_logits(
            eager_model, inputs_embeds, attention_mask, generate_positions(attention_mask), agg_layer, dropped
        )
        next_token = logits[:, -1].argmax(-1)  # [batch]
        tokens.append(next_token)
        with torch.no_grad():
            inputs_embeds = torch.cat([inputs_embeds, embed(next_token)[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones(batch, 1, dtype=attention_mask.dtype)], dim=1)
        dropped = torch.cat([dropped, torch.zeros(batch, 1, dtype=torch.bool)], dim=1)
    return torch.stack(tokens, dim=1)


# -- schedules of several stages ------------------------------------------------------------------------------------


def segmented_forward(eager_model, inputs_embeds, attention_mask, positions, dropped, compacted, capture=None):
    """A no-cache forward of the decoder as a plain loop, layer by layer: layer l cannot attend to the keys
    `dropped[l]` (BoolTensor[batch, S]) and runs at positions `positions - cumsum(compacted[l])` (renumbering
    closes the gaps left by the tokens `compacted[l]` dropped with renumbering).

    Returns (logits [batch, S, vocab], attention probabilities [batch, heads, S, S] of layer `capture` or None).
    """
    text_model = eager_model.model.language_model
    seq_len = inputs_embeds.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    minimum = torch.finfo(inputs_embeds.dtype).min
    captured = {}
    handle = None
    if capture is not None:
        handle = text_model.layers[capture].self_attn.register_forward_hook(
            lambda module, args, output: captured.update(probs=output[1])
        )
    hidden = inputs_embeds
    try:
        with torch.no_grad():
            for index, layer in enumerate(text_model.layers):
                mask = torch.where(allowed & ~dropped[index][:, None, :], 0.0, minimum)[:, None]
                layer_positions = positions - compacted[index].long().cumsum(dim=1)
                rope = text_model.rotary_emb(hidden, position_ids=layer_positions)
                hidden = layer(hidden, attention_mask=mask.to(hidden.dtype), position_embeddings=rope,
                               position_ids=layer_positions)
            logits = eager_model.lm_head(text_model.norm(hidden))
    finally:
        if handle is not None:
            handle.remove()
    return logits, captured.get("probs")


def run_schedule(eager_model, inputs_embeds, attention_mask, positions, image_token_mask, stages):
    """Apply a schedule by masking, stage after stage. `stages`: (layer, attention_layer, compact, keep_fn) with
    keep_fn(attention [heads, n] of one row over its image tokens still present) -> indices (into those n) kept.

    Returns (per stage the kept original image indices of each row, dropped per layer, compacted per layer).
    """
    num_layers = len(eager_model.model.language_model.layers)
    batch = inputs_embeds.shape[0]
    none = torch.zeros_like(image_token_mask)
    dropped = [none.clone() for _ in range(num_layers)]
    compacted = [none.clone() for _ in range(num_layers)]
    kept_per_stage = []
    for layer, attention_layer, compact, keep_fn in stages:
        _, probs = segmented_forward(eager_model, inputs_embeds, attention_mask, positions, dropped, compacted,
                                     capture=attention_layer)
        kept_rows = []
        for b in range(batch):
            image = [j for j in range(image_token_mask.shape[1]) if image_token_mask[b, j] and not dropped[layer][b, j]]
            attention = probs[b, :, -1, image].float()  # [heads, n]
            keep = set(keep_fn(attention))
            original = [j for j in range(image_token_mask.shape[1]) if image_token_mask[b, j]]
            kept_rows.append([original.index(image[i]) for i in sorted(keep)])
            for i, j in enumerate(image):
                if i not in keep:
                    for later in range(layer, num_layers):
                        dropped[later][b, j] = True
                        if compact:
                            compacted[later][b, j] = True
        kept_per_stage.append(kept_rows)
    return kept_per_stage, dropped, compacted


def schedule_greedy_generate(eager_model, inputs_embeds, attention_mask, dropped, compacted, max_new_tokens: int):
    """Greedy tokens [batch, max_new_tokens] by full recomputation each step with a fixed schedule (positions as
    `generate` computes them)."""
    embed = eager_model.get_input_embeddings()
    batch = inputs_embeds.shape[0]
    tokens = []
    for _ in range(max_new_tokens):
        logits, _ = segmented_forward(eager_model, inputs_embeds, attention_mask, generate_positions(attention_mask),
                                      dropped, compacted)
        next_token = logits[:, -1].argmax(-1)
        tokens.append(next_token)
        with torch.no_grad():
            inputs_embeds = torch.cat([inputs_embeds, embed(next_token)[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones(batch, 1, dtype=attention_mask.dtype)], dim=1)
        pad = torch.zeros(batch, 1, dtype=torch.bool)
        dropped = [torch.cat([d, pad], dim=1) for d in dropped]
        compacted = [torch.cat([c, pad], dim=1) for c in compacted]
    return torch.stack(tokens, dim=1)


# -- physically shortened sequences -----------------------------------------------------------------------------------


def physical_forward(eager_model, inputs_embeds, attention_mask, position_fn, stages, capture_before=True):
    """A no-cache forward as a plain loop over the decoder layers of an eager model, where before layer l in
    `stages` the sequence is rebuilt by `stages[l](hidden, probs, attention_mask) -> (hidden, attention_mask)`
    (probs: layer l-1's attention probabilities [batch, heads, S, S]); positions are `position_fn(attention_mask)`
    of the current sequence (renumbered). Returns logits [batch, S', vocab] and the final attention mask."""
    text_model = eager_model.model.language_model
    captured = {}
    handles = [layer.self_attn.register_forward_hook(lambda m, a, out, i=i: captured.update({i: out[1]}))
               for i, layer in enumerate(text_model.layers)]
    hidden, mask = inputs_embeds, attention_mask
    minimum = torch.finfo(inputs_embeds.dtype).min
    try:
        with torch.no_grad():
            for index, layer in enumerate(text_model.layers):
                if index in stages:
                    hidden, mask = stages[index](hidden, captured.get(index - 1), mask)
                seq_len = hidden.shape[1]
                allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
                positions = position_fn(mask)
                rope = text_model.rotary_emb(hidden, position_ids=positions)
                hidden = layer(hidden, attention_mask=torch.where(allowed, 0.0, minimum)[:, None].to(hidden.dtype),
                               position_embeddings=rope, position_ids=positions)
            return eager_model.lm_head(text_model.norm(hidden)), mask
    finally:
        for handle in handles:
            handle.remove()


def plain_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions of a plain forward: 0..S-1, padding counted."""
    return torch.arange(mask.shape[1]).expand(mask.shape[0], -1)
