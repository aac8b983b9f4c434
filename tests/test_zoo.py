"""Published methods and baselines against independent computations written here (plain loops over eager
tensors of the unmodified model): kept tokens, logits and cached greedy generation, single and left-padded batch."""

from __future__ import annotations

import math

import pytest
import torch

import fastv_reference as ref
from fastv_advanced import apply_pruning, build_method
from test_pruning import PROMPTS, logits, make_inputs, tiny  # noqa: F401  (fixture)
from fastv_advanced.tiny import build_config, build_model, build_processor, build_tokenizer

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
    """VisionZip written out on an eager copy of the vision tower: [batch, D + C, hidden] language-model inputs.
    The features are `hidden_states[-2]`; the [CLS] attention and keys are those of the layer that produced them,
    or, on a one-layer tower (features = patch embeddings), of the first layer, which reads them."""
    import copy

    reference = copy.deepcopy(model)
    reference.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    tower = reference.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        layers = getattr(tower, "vision_model", tower).encoder.layers
        index = -2 if len(layers) > 1 else 0  # the attention layer: producer of the features, or their reader
        layer = layers[index]
        heads = layer.self_attn.num_heads
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index - 1 if index < 0 else 0]))
        keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)  # [batch, T, d]
        attention, hidden = out.attentions[index], out.hidden_states[-2]  # [batch, heads, T, T], [batch, T, width]
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


@pytest.fixture(scope="module")
def one_layer_tower():
    """A tiny LLaVA whose CLIP has one layer: feature layer -2 is the patch embeddings (the embedded model's tower)."""
    tokenizer = build_tokenizer()
    processor = build_processor(image_size=32, patch_size=4, tokenizer=tokenizer)
    model = build_model(build_config(tokenizer, num_layers=4, num_heads=4, num_kv_heads=2, vision_layers=1), seed=0,
                        qk_scale=8.0)
    return model, processor, ref.eager_copy(model)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("tower", ["tiny", "one_layer_tower"])
def test_visionzip_equals_a_shorter_prompt_of_its_tokens(tower, rows, request):
    model, processor, eager = request.getfixturevalue(tower)
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


class SparseVLMReference:
    """SparseVLM v1.5 written out row by row: raters from the input embeddings, rater-row attention of the layer
    before each stage, top-k, recycling by density-peak clustering in plain loops. The first pass records what it
    kept and merged (`plan`); later passes (the prompt plus generated tokens) replay it."""

    def __init__(self, embeds, input_ids, image_token_id, layers, keep, noise_seed=0):
        self.layers, self.keep = layers, keep
        self.starts, self.texts = [], []
        for b, row in enumerate(input_ids.tolist()):
            image = [j for j, t in enumerate(row) if t == image_token_id]
            self.starts.append(image[0])
            self.texts.append(len(row) - image[-1] - 1)  # tokens after the image block
        self.raters = [self._raters(embeds[b], self.starts[b], len(image), self.texts[b])
                       for b in range(embeds.shape[0])]
        self.noise_seed, self.plan, self.scores = noise_seed, {}, {}

    @staticmethod
    def _raters(e, start, n, text):
        image = [e[start + v].float() for v in range(n)]
        tokens = [e[e.shape[0] - text + t].float() for t in range(text)]
        relevance = [0.0] * text
        for v in image:
            row = torch.softmax(torch.stack([v @ t for t in tokens]), dim=0)
            relevance = [r + float(row[t]) / n for t, r in enumerate(relevance)]
        mean = sum(relevance) / text
        return [t for t in range(text) if relevance[t] > mean]  # offsets among the text tokens

    def stages(self, n_image):
        self.n, self.generator = n_image, torch.Generator().manual_seed(self.noise_seed)
        return {layer + 1: (lambda h, p, m, s=s: self._stage(s, h, p, m)) for s, layer in enumerate(self.layers)}

    def _stage(self, s, hidden, probs, mask):
        batch, seq_len, width = hidden.shape
        k = min(self.keep[s], self.n - 1)
        m = int(0.3 * (self.n - k)) + 1
        noise = torch.rand(batch, m, generator=self.generator) * 1e-6
        rows = []
        for b in range(batch):
            start = self.starts[b]
            if s not in self.plan.get(b, {}):
                self.plan.setdefault(b, {})[s] = self._choose(s, b, hidden[b], probs[b], start, k, m, noise[b])
            kept, groups = self.plan[b][s]
            block = [hidden[b, start + j] for j in kept]
            block += [sum(hidden[b, start + j] for j in g) / len(g) for g in groups]
            rows.append(torch.cat([hidden[b, :start], torch.stack(block), hidden[b, start + self.n:]]))
        new_n = k + len(self.plan[0][s][1])
        mask = torch.stack([torch.cat([mask[b, : self.starts[b]], torch.ones(new_n, dtype=mask.dtype),
                                       mask[b, self.starts[b] + self.n:]]) for b in range(batch)])
        self.n = new_n
        return torch.stack(rows), mask

    def _choose(self, s, b, hidden, probs, start, k, m, noise):
        seq_len = hidden.shape[0]
        rater_rows = [seq_len - self.texts[b] + t for t in self.raters[b]]
        head_mean = probs.float().mean(dim=0)  # [S, S]
        scores = [sum(float(head_mean[r, start + j]) for r in rater_rows) / len(rater_rows) for j in range(self.n)]
        self.scores.setdefault(b, {})[s] = scores
        order = sorted(range(self.n), key=lambda j: -scores[j])
        kept, recycled = sorted(order[:k]), order[k : k + m]
        points = [hidden[start + j].float() for j in recycled]
        c = m // 10 + 1
        d = [[float((x - y).norm()) / math.sqrt(hidden.shape[-1]) for y in points] for x in points]
        density = [math.exp(-sum(v * v for v in sorted(row)[:c]) / c) + float(noise[i]) for i, row in enumerate(d)]
        farthest = max(max(row) for row in d)
        delta = [min([d[i][j] for j in range(m) if density[j] > density[i]] or [farthest]) for i in range(m)]
        centres = sorted(range(m), key=lambda i: -density[i] * delta[i])[:c]
        assign = [min(range(c), key=lambda ci: d[i][centres[ci]]) for i in range(m)]
        for ci, centre in enumerate(centres):
            assign[centre] = ci
        return kept, [[recycled[i] for i in range(m) if assign[i] == ci] for ci in range(c)]


@pytest.mark.parametrize("rows", [1, 2])
def test_sparsevlm_matches_a_physical_reference(tiny, rows):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS[:rows], seeds=[31, 32][:rows])
    method = build_method("sparsevlm", {"layers": "0,1", "keep": "30,12"})
    with apply_pruning(model, method) as pruner:
        pruner.reseed(0)
        out_logits = logits(model, inputs)
        selections = pruner.selections
        pruner.reseed(0)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    embeds = ref.embeddings(model, inputs)
    reference = SparseVLMReference(embeds, inputs["input_ids"], model.config.image_token_id, (0, 1), (30, 12))
    expected, mask = ref.physical_forward(eager, embeds, inputs["attention_mask"], ref.plain_positions,
                                          reference.stages(NUM_IMAGE))
    assert [s.num_kept for s in selections] == [30 + 2, 12 + 1]
    for stage, selection in enumerate(selections):
        for b in range(rows):
            torch.testing.assert_close(selection.scores[b], torch.tensor(reference.scores[b][stage]),
                                       rtol=1e-4, atol=1e-6)
    assert out_logits.shape == expected.shape
    for b in range(rows):
        real = mask[b].bool()
        torch.testing.assert_close(out_logits[b][real], expected[b][real], rtol=1e-4, atol=1e-4)

    generating = SparseVLMReference(embeds, inputs["input_ids"], model.config.image_token_id, (0, 1), (30, 12))
    tokens, sequence, full_mask = [], embeds, inputs["attention_mask"]
    for _ in range(4):
        step_logits, _ = ref.physical_forward(eager, sequence, full_mask, ref.generate_positions,
                                              generating.stages(NUM_IMAGE))
        token = step_logits[:, -1].argmax(-1)
        tokens.append(token)
        with torch.no_grad():
            sequence = torch.cat([sequence, eager.get_input_embeddings()(token)[:, None]], dim=1)
        full_mask = torch.cat([full_mask, torch.ones(rows, 1, dtype=full_mask.dtype)], dim=1)
        generating.texts = [t + 1 for t in generating.texts]  # the plan is replayed; the new token is text
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == torch.stack(tokens, dim=1).tolist()
