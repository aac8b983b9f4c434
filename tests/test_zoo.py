"""Published methods and baselines against independent computations written here (plain loops over eager
tensors of the unmodified model): kept tokens, logits and cached greedy generation, single and left-padded batch."""

from __future__ import annotations

import math

import pytest
import torch

import fastv_reference as ref
from fastv_advanced import apply_pruning, build_method
from test_pruning import PROMPTS, logits, make_inputs, tiny  # noqa: F401  (fixture)

NUM_IMAGE, SIDE = 64, 8


def image_positions(inputs, model) -> list[list[int]]:
    return ref.image_positions(inputs["input_ids"], model.config.image_token_id)


def run(model, method, inputs, new_tokens=4):
    """(selections of a plain forward, its logits, selections of `generate`'s prefill, the generated tokens)."""
    with apply_pruning(model, method) as pruner:
        out_logits = logits(model, inputs)
        selections = pruner.selections
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return selections, out_logits, pruner.selections, out[:, inputs["input_ids"].shape[1]:]


def check_against_masks(model, eager, inputs, kept_rows, layer, compact, outcome, generate_kept_rows=None):
    """Kept rows (original image indices) equal; logits and generation equal the masked reference that drops the
    other image tokens from `layer` on (renumbering positions when `compact`). `generate` numbers positions from
    the padding mask, so a method whose choice depends on positions has its own `generate_kept_rows`."""
    selections, out_logits, generate_selections, generated = outcome
    generate_kept_rows = kept_rows if generate_kept_rows is None else generate_kept_rows
    assert selections[-1].kept_image_indices.tolist() == kept_rows
    assert generate_selections[-1].kept_image_indices.tolist() == generate_kept_rows
    dropped, compacted = dropped_by(model, eager, inputs, kept_rows, layer, compact)
    embeds = ref.embeddings(model, inputs)
    rows, seq_len = inputs["input_ids"].shape
    expected, _ = ref.segmented_forward(eager, embeds, inputs["attention_mask"], torch.arange(seq_len).expand(rows, -1),
                                        dropped, compacted)
    final = selections[-1].kept_positions
    for b in range(rows):
        real = inputs["attention_mask"][b].bool()[final[b]]
        torch.testing.assert_close(out_logits[b][real], expected[b, final[b]][real], rtol=1e-4, atol=1e-4)
    dropped, compacted = dropped_by(model, eager, inputs, generate_kept_rows, layer, compact)
    tokens = ref.schedule_greedy_generate(eager, embeds, inputs["attention_mask"], dropped, compacted,
                                          generated.shape[1])
    assert generated.tolist() == tokens.tolist()


def dropped_by(model, eager, inputs, kept_rows, layer, compact):
    """Per layer, the image tokens not in `kept_rows` from `layer` on (and the same as renumbered, or none)."""
    rows, seq_len = inputs["input_ids"].shape
    num_layers = len(eager.model.language_model.layers)
    dropped_now = torch.zeros(rows, seq_len, dtype=torch.bool)
    for b, positions in enumerate(image_positions(inputs, model)):
        for i, j in enumerate(positions):
            dropped_now[b, j] = i not in kept_rows[b]
    none = torch.zeros_like(dropped_now)
    dropped = [dropped_now if l >= layer else none for l in range(num_layers)]
    compacted = [dropped_now if (l >= layer and compact) else none for l in range(num_layers)]
    return dropped, compacted


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def dart_reference(eager, inputs, positions, rope_positions, max_num_truncation=16, pivots=(4, 4)):
    """DART written out: layer-1 keys after RoPE, L1 norms, pivots, final-norm'ed layer-1 outputs, cosine loops.
    rope_positions: LongTensor[batch, S] the model runs at. Returns per row the kept image indices."""
    text_model = eager.model.language_model
    with torch.no_grad():
        hidden = eager(**inputs, position_ids=rope_positions, output_hidden_states=True).hidden_states
        layer = text_model.layers[1]
        seq_len = inputs["input_ids"].shape[1]
        cos, sin = text_model.rotary_emb(hidden[1], position_ids=rope_positions)
        keys = layer.self_attn.k_proj(layer.input_layernorm(hidden[1]))  # [batch, S, kv * d]
        head_dim = layer.self_attn.head_dim
        keys = keys.view(*keys.shape[:2], -1, head_dim)
        keys = rope(keys, cos[:, :, None], sin[:, :, None]).flatten(2)
        z = text_model.norm(hidden[2])
    kept_rows = []
    per_pivot = max_num_truncation // sum(pivots)
    for b, image in enumerate(positions):
        norm = [float(keys[b, j].abs().sum()) for j in range(seq_len)]
        image_pivots = sorted(range(len(image)), key=lambda i: -norm[image[i]])[: pivots[0]]
        after = [j for j in range(image[-1] + 1, seq_len)]
        text_pivots = sorted(after, key=lambda j: -norm[j])[: pivots[1]]
        candidates = [i for i in range(len(image)) if i not in image_pivots]
        kept = list(image_pivots)
        for p in sorted([image[i] for i in image_pivots] + text_pivots):
            def cosine(i):
                return float(torch.nn.functional.cosine_similarity(z[b, p], z[b, image[i]], dim=0))
            least = sorted(candidates, key=cosine)[:per_pivot]
            kept += least
            candidates = [i for i in candidates if i not in least]
        kept_rows.append(sorted(kept))
    return kept_rows


@pytest.mark.parametrize("rows", [1, 2])
def test_dart_matches_reference(tiny, rows):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS[:rows], seeds=[21, 22][:rows])
    method = build_method("dart", {"max_num_truncation": "16"})
    outcome = run(model, method, inputs)
    positions = image_positions(inputs, model)
    seq_len = inputs["input_ids"].shape[1]
    expected = dart_reference(eager, inputs, positions, torch.arange(seq_len).expand(rows, -1))
    in_generate = dart_reference(eager, inputs, positions, ref.generate_positions(inputs["attention_mask"]))
    assert all(len(k) == 4 + 8 * 2 for k in expected)
    check_against_masks(model, eager, inputs, expected, 2, False, outcome, in_generate)


def divprune_reference(embeds, positions, count) -> list[list[int]]:
    kept_rows = []
    for b, image in enumerate(positions):
        vectors = [embeds[b, j].float() for j in image]
        n = len(vectors)
        distance = [[1 - float(torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=0))
                     for j in range(n)] for i in range(n)]
        second = [sorted(distance[i][j] for i in range(n))[1] for j in range(n)]
        picked = [max(range(n), key=lambda j: second[j])]
        while len(picked) < count:
            rest = [j for j in range(n) if j not in picked]
            picked.append(max(rest, key=lambda j: min(distance[s][j] for s in picked)))
        kept_rows.append(sorted(picked))
    return kept_rows


@pytest.mark.parametrize("rows", [1, 2])
def test_divprune_matches_reference(tiny, rows):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS[:rows], seeds=[23, 24][:rows])
    outcome = run(model, build_method("divprune", {"ratio": "0.25"}), inputs)
    expected = divprune_reference(ref.embeddings(model, inputs), image_positions(inputs, model), 16)
    check_against_masks(model, eager, inputs, expected, 0, True, outcome)


@pytest.mark.parametrize("rows", [1, 2])
def test_uniform_grid_matches_reference(tiny, rows):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS[:rows], seeds=[25, 26][:rows])
    outcome = run(model, build_method("uniform", {"stride": "3"}), inputs)
    expected = sorted(r * SIDE + c for r in range(1, SIDE, 3) for c in range(1, SIDE, 3))
    assert len(expected) == 9
    check_against_masks(model, eager, inputs, [expected] * rows, 0, True, outcome)


@pytest.mark.parametrize("rows", [1, 2])
def test_pool_equals_a_shorter_prompt_of_pooled_embeddings(tiny, rows):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS[:rows], seeds=[27, 28][:rows])
    selections, out_logits, _, generated = run(model, build_method("pool", {"size": "2"}), inputs)
    embeds = ref.embeddings(model, inputs)
    shortened = []
    for b, image in enumerate(image_positions(inputs, model)):
        grid = [[embeds[b, image[r * SIDE + c]] for c in range(SIDE)] for r in range(SIDE)]
        pooled = [sum(grid[2 * r + i][2 * c + j] for i in range(2) for j in range(2)) / 4
                  for r in range(SIDE // 2) for c in range(SIDE // 2)]
        shortened.append(torch.cat([embeds[b, : image[0]], torch.stack(pooled), embeds[b, image[-1] + 1:]]))
    shortened = torch.stack(shortened)
    seq_len = shortened.shape[1]
    mask = inputs["attention_mask"][:, :seq_len]  # left padding: pads first, then ones
    none = [torch.zeros(rows, seq_len, dtype=torch.bool)] * len(eager.model.language_model.layers)
    expected, _ = ref.segmented_forward(eager, shortened, mask, torch.arange(seq_len).expand(rows, -1), none, none)
    assert selections[0].kept_image_indices.tolist() == [list(range(16))] * rows
    assert out_logits.shape[1] == seq_len
    for b in range(rows):
        real = mask[b].bool()
        torch.testing.assert_close(out_logits[b][real], expected[b][real], rtol=1e-4, atol=1e-4)
    tokens = ref.schedule_greedy_generate(eager, shortened, mask, none, none, generated.shape[1])
    assert generated.tolist() == tokens.tolist()


def test_grid_methods_refuse_a_non_square_image():
    from fastv_advanced.methods.grid import grid_side

    assert grid_side(576) == 24 and math.isqrt(64) == grid_side(64)
    with pytest.raises(ValueError, match="the 50 image tokens do not form a square patch grid"):
        grid_side(50)


def visionzip_reference(model, inputs, dominant, contextual) -> torch.Tensor:
    """VisionZip written out on an eager copy of the vision tower: [batch, D + C, hidden] language-model inputs."""
    import copy

    reference = copy.deepcopy(model)
    reference.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    tower = reference.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
        heads = layer.self_attn.num_heads
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
        keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)  # [batch, T, d]
        attention, hidden = out.attentions[-2], out.hidden_states[-2]  # [batch, heads, T, T], [batch, T, width]
        rows = []
        for b in range(hidden.shape[0]):
            cls = [float(sum(attention[b, h, 0, j] for h in range(heads))) for j in range(hidden.shape[1])]
            best = sorted(range(1, hidden.shape[1]), key=lambda j: -cls[j])[: dominant - 1]
            kept = [0] + sorted(best)
            rest = [j for j in range(hidden.shape[1]) if j not in kept]
            step = max(1, len(rest) // contextual)
            targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
            unit = {j: keys[b, j] / keys[b, j].norm() for j in rest}
            groups = {t: [] for t in targets}
            for j in rest:
                if j not in targets:
                    groups[max(targets, key=lambda t: float(unit[j] @ unit[t]))].append(j)
            merged = [hidden[b, t] + (sum(hidden[b, j] for j in groups[t]) / len(groups[t]) if groups[t] else 0)
                      for t in targets]
            rows.append(torch.stack([hidden[b, j] for j in kept] + merged))
        return reference.model.multi_modal_projector(torch.stack(rows))


@pytest.mark.parametrize("rows", [1, 2])
def test_visionzip_equals_a_shorter_prompt_of_its_tokens(tiny, rows):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS[:rows], seeds=[29, 30][:rows])
    selections, out_logits, _, generated = run(model, build_method("visionzip", {"dominant": "8", "contextual": "4"}),
                                               inputs)
    embeds = ref.embeddings(model, inputs)
    tokens = visionzip_reference(model, inputs, 8, 4)
    shortened = torch.stack([
        torch.cat([embeds[b, : image[0]], tokens[b], embeds[b, image[-1] + 1:]])
        for b, image in enumerate(image_positions(inputs, model))
    ])
    seq_len = shortened.shape[1]
    mask = inputs["attention_mask"][:, :seq_len]
    none = [torch.zeros(rows, seq_len, dtype=torch.bool)] * len(eager.model.language_model.layers)
    expected, _ = ref.segmented_forward(eager, shortened, mask, torch.arange(seq_len).expand(rows, -1), none, none)
    assert selections[0].num_kept == 12 and out_logits.shape[1] == seq_len
    for b in range(rows):
        real = mask[b].bool()
        torch.testing.assert_close(out_logits[b][real], expected[b][real], rtol=1e-4, atol=1e-4)
    assert generated.tolist() == ref.schedule_greedy_generate(eager, shortened, mask, none, none, 4).tolist()
