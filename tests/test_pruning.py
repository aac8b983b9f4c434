"""FastV pruning on a tiny random LLaVA, checked against independent eager computations (tests/fastv_reference.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fastv_reference as ref
from fastv_advanced import FastVConfig, apply_fastv, available_strategies, register_strategy, strategies
from fastv_advanced.selection import last_query_attention
from fastv_advanced.tiny import build_config, build_model, build_processor, build_tokenizer

PROMPTS = [
    "USER: <image>\nWhich shape is red and which is blue? Look at the picture. ASSISTANT:",
    "USER: <image>\nHow many? ASSISTANT:",
]
NUM_IMAGE = 64  # 32 x 32 image, 4 x 4 patches


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    processor = build_processor(image_size=32, patch_size=4, tokenizer=tokenizer)
    config = build_config(tokenizer, num_layers=4, num_heads=4, num_kv_heads=2)
    model = build_model(config, seed=0, qk_scale=8.0)
    return model, processor, ref.eager_copy(model)


def random_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_inputs(processor, prompts, seeds=None):
    seeds = seeds or list(range(len(prompts)))
    return dict(
        processor(images=[random_image(s) for s in seeds], text=prompts, return_tensors="pt", padding=True)
    )


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_same_topk(kept: list[int], expected: list[int], scores: torch.Tensor):
    """Equal index sets, except where two scores tie within float tolerance at the cut-off."""
    if kept == expected:
        return
    cutoff = float(scores[expected[-1]]) if expected else 0.0
    differing = set(kept) ^ set(expected)
    assert all(abs(float(scores[i]) - cutoff) < 1e-6 for i in differing), (kept, expected)


def test_keep_all_tokens_equals_unmodified_model(tiny):
    model, processor, _ = tiny
    inputs = make_inputs(processor, PROMPTS)
    expected = logits(model, inputs)
    with apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=NUM_IMAGE)) as fastv:
        got = logits(model, inputs)
    assert fastv.last_selection.kept_image_indices.tolist() == [list(range(NUM_IMAGE))] * 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "method,alpha",
    [("avg_all_heads", 0.5), ("max_head", 0.5), ("weighted_combination", 0.7), ("weighted_combination", 0.0)],
)
@pytest.mark.parametrize("agg_layer", [1, 2, 3])
def test_kept_indices_match_eager_attention(tiny, method, alpha, agg_layer):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS, seeds=[3, 4])
    rank = 24
    config = FastVConfig(agg_layer=agg_layer, attention_rank=rank, token_selection_method=method, weighted_alpha=alpha)
    with apply_fastv(model, config) as fastv:
        logits(model, inputs)
    selection = fastv.last_selection
    rows = ref.last_row_image_attention(eager, inputs, agg_layer)
    for b, attn in enumerate(rows):
        scores = ref.reference_scores(attn, method, alpha)
        torch.testing.assert_close(selection.scores[b], scores, rtol=1e-4, atol=1e-6)
        assert_same_topk(selection.kept_image_indices[b].tolist(), ref.reference_kept(scores, rank), scores)
        if method == "avg_all_heads":
            assert selection.head_index is None
        else:
            totals = attn.sum(dim=-1)
            assert int(selection.head_index[b]) == int(totals.argmax())
    positions = ref.image_positions(inputs["input_ids"], model.config.image_token_id)
    assert selection.image_start.tolist() == [p[0] for p in positions]


def test_rows_pick_their_own_head():
    """Two rows whose dominant heads differ get different heads and tokens (not row 0's for both)."""
    attention = torch.zeros(2, 3, 5)
    attention[0, 1] = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.0])
    attention[1, 2] = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.6])
    attention[:, 0] = 0.05
    from fastv_advanced.strategies import max_head

    scores, head = max_head(attention, FastVConfig())
    assert head.tolist() == [1, 2]
    assert scores.argmax(-1).tolist() == [0, 4]


def test_last_query_attention_matches_softmax_of_full_rows():
    """The one-row computation equals the last row of a full eager attention (GQA, padding mask)."""
    torch.manual_seed(0)
    batch, seq, heads, kv_heads, dim = 2, 7, 4, 2, 8
    query = torch.randn(batch, seq, heads * dim)
    keys = torch.randn(batch, seq, kv_heads * dim)
    angles = torch.randn(1, seq, dim // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    q = query.view(batch, seq, heads, dim).transpose(1, 2)
    k = keys.view(batch, seq, kv_heads, dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)

    def rope(x):
        half = dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    full = rope(q) @ rope(k).transpose(-1, -2) / dim**0.5
    allowed = torch.ones(seq, seq).tril().bool()[None, None] & pad.bool()[:, None, None, :]
    expected = full.masked_fill(~allowed, float("-inf")).softmax(-1)[:, :, -1]
    got = last_query_attention(query[:, -1:], keys, cos, sin, allowed, dim, dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got_2d = last_query_attention(query[:, -1:], keys, cos, sin, pad, dim, dim**-0.5)
    torch.testing.assert_close(got_2d, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [0, 16, 40])
def test_logits_equal_masked_attention_reference(tiny, rank):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS, seeds=[5, 6])  # left-padded: rows differ in length
    config = FastVConfig(agg_layer=2, attention_rank=rank, token_selection_method="max_head")
    with apply_fastv(model, config) as fastv:
        pruned = logits(model, inputs)
    kept = fastv.last_selection.kept_positions  # [batch, S']
    seq_len = inputs["input_ids"].shape[1]
    assert pruned.shape[1] == seq_len - (NUM_IMAGE - rank) == kept.shape[1]
    dropped = torch.ones(2, seq_len, dtype=torch.bool)
    dropped.scatter_(1, kept, False)
    embeds = ref.embeddings(model, inputs)
    positions = torch.arange(seq_len).expand(2, -1)
    expected = ref.masked_forward_logits(eager, embeds, inputs["attention_mask"], positions, 2, dropped)
    for b in range(2):
        real = inputs["attention_mask"][b].bool()[kept[b]]  # compare token rows, not padding rows
        torch.testing.assert_close(pruned[b][real], expected[b, kept[b]][real], rtol=1e-4, atol=1e-4)


def test_generate_with_cache_equals_no_cache_recomputation(tiny):
    model, processor, eager = tiny
    inputs = make_inputs(processor, PROMPTS, seeds=[7, 8])
    new_tokens = 6
    config = FastVConfig(agg_layer=2, attention_rank=20, token_selection_method="avg_all_heads")
    with apply_fastv(model, config) as fastv:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    generated = out[:, inputs["input_ids"].shape[1] :]
    kept = fastv.last_selection.kept_positions
    dropped = torch.ones_like(inputs["attention_mask"], dtype=torch.bool)
    dropped.scatter_(1, kept, False)
    embeds = ref.embeddings(model, inputs)
    expected = ref.masked_greedy_generate(eager, embeds, inputs["attention_mask"], 2, dropped, new_tokens)
    assert generated.tolist() == expected.tolist()


def test_batch_rows_equal_single_runs(tiny):
    model, processor, _ = tiny
    batch_inputs = make_inputs(processor, PROMPTS, seeds=[9, 10])
    config = FastVConfig(agg_layer=2, attention_rank=24, token_selection_method="weighted_combination")
    with apply_fastv(model, config) as fastv:
        batch_logits = logits(model, batch_inputs)[:, -1]
        batch_kept = fastv.last_selection.kept_image_indices
        with torch.no_grad():
            batch_gen = model.generate(**batch_inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, -5:]
        for b, (prompt, seed) in enumerate(zip(PROMPTS, [9, 10])):
            single = make_inputs(processor, [prompt], seeds=[seed])
            torch.testing.assert_close(logits(model, single)[0, -1], batch_logits[b], rtol=1e-4, atol=1e-4)
            assert fastv.last_selection.kept_image_indices[0].tolist() == batch_kept[b].tolist()
            with torch.no_grad():
                gen = model.generate(**single, max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, -5:]
            assert gen[0].tolist() == batch_gen[b].tolist()


def test_text_only_prompt_runs_unpruned(tiny):
    model, processor, _ = tiny
    inputs = dict(processor.tokenizer(["USER: Which shape? ASSISTANT:"], return_tensors="pt"))
    expected = logits(model, inputs)
    with apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=4)) as fastv:
        got = logits(model, inputs)
        assert fastv.last_selection is None
        logits(model, make_inputs(processor, PROMPTS[:1]))
        assert fastv.last_selection is not None
        logits(model, inputs)  # a new text-only prompt clears the previous image prompt's selection
        assert fastv.last_selection is None
    torch.testing.assert_close(got, expected)


def test_keep_ratio_sets_the_rank(tiny):
    model, processor, _ = tiny
    inputs = make_inputs(processor, PROMPTS[:1])
    with apply_fastv(model, FastVConfig(agg_layer=1, keep_ratio=0.25)) as fastv:
        logits(model, inputs)
    assert fastv.last_selection.num_kept == NUM_IMAGE // 4


def test_remove_restores_the_model_and_applying_twice_does_not_stack(tiny):
    model, processor, _ = tiny
    modules = list(model.modules())

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    before = hook_count()
    implementation = model.config.text_config._attn_implementation
    forwards = {id(m): m.forward for m in modules}
    first = apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=8))
    once = hook_count()
    assert once > before
    second = apply_fastv(model, FastVConfig(agg_layer=1, attention_rank=8))
    assert hook_count() == once + 1  # K=1 hooks one more later layer, nothing stacked
    assert first._handles == []
    second.remove()
    assert hook_count() == before
    assert model.config.text_config._attn_implementation == implementation
    assert all(m.forward == forwards[id(m)] for m in modules)
    inputs = make_inputs(processor, PROMPTS[:1])
    assert logits(model, inputs).shape[1] == inputs["input_ids"].shape[1]


def test_custom_strategy_by_decorator_and_by_import_path(tiny):
    model, processor, _ = tiny
    inputs = make_inputs(processor, PROMPTS[:1])

    @register_strategy("first_tokens_test")
    def first_tokens(attention, config):
        batch, _, n = attention.shape
        return -torch.arange(n, dtype=torch.float32).expand(batch, n)

    try:
        assert "first_tokens_test" in available_strategies()
        config = FastVConfig(agg_layer=2, attention_rank=5, token_selection_method="first_tokens_test")
        with apply_fastv(model, config) as f:
            logits(model, inputs)
    finally:
        strategies._REGISTRY.pop("first_tokens_test")
    assert f.last_selection.kept_image_indices[0].tolist() == [0, 1, 2, 3, 4]
    path = "fastv_advanced.strategies:max_head"
    with apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=5, token_selection_method=path)) as f:
        logits(model, inputs)
    assert f.last_selection.head_index is not None


def test_random_strategy_is_seeded(tiny):
    model, processor, _ = tiny
    inputs = make_inputs(processor, PROMPTS[:1])
    picks = []
    for seed in (1, 1, 2):
        with apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=10, token_selection_method="random", seed=seed)) as f:
            logits(model, inputs)
        picks.append(f.last_selection.kept_image_indices[0].tolist())
    assert picks[0] == picks[1] != picks[2]


def test_guide_span_mismatch_warns_once(tiny):
    model, processor, _ = tiny
    inputs = make_inputs(processor, PROMPTS[:1])
    config = FastVConfig(agg_layer=2, attention_rank=8, sys_length=35, image_token_length=576)
    with apply_fastv(model, config) as fastv, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits(model, inputs)
        logits(model, inputs)
    messages = [str(w.message) for w in caught if "FastV" in str(w.message)]
    assert len(messages) == 1
    start = int(fastv.last_selection.image_start[0])
    assert "sys_length=35" in messages[0] and f"starts at {start}" in messages[0]
    assert "image_token_length=576" in messages[0] and f"has {NUM_IMAGE}" in messages[0]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"agg_layer": 0}, "agg_layer=0"),
        ({"agg_layer": True}, "agg_layer=True"),
        ({"weighted_alpha": 1.5}, "weighted_alpha=1.5"),
        ({"weighted_alpha": -0.1}, "[0, 1]"),
        ({"token_selection_method": "best_head"}, "registered: avg_all_heads, "),
        ({"attention_rank": -1}, "attention_rank=-1"),
        ({"attention_rank": 8, "keep_ratio": 0.5}, "not both"),
        ({"keep_ratio": 2.0}, "keep_ratio=2.0"),
        ({"token_selection_method": "no_such_module_xyz:fn"}, "cannot import"),
    ],
)
def test_config_validation(kwargs, fragment):
    with pytest.raises(ValueError) as error:
        FastVConfig(**kwargs)
    assert fragment in str(error.value)


def test_layer_and_rank_validated_against_the_model(tiny):
    model, processor, _ = tiny
    with pytest.raises(ValueError, match=r"agg_layer=4 is outside the allowed range \[1, 3\]"):
        apply_fastv(model, FastVConfig(agg_layer=4, attention_rank=8))
    inputs = make_inputs(processor, PROMPTS[:1])
    with apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=NUM_IMAGE + 1)):
        with pytest.raises(ValueError, match=rf"attention_rank={NUM_IMAGE + 1} is larger than the {NUM_IMAGE}"):
            logits(model, inputs)


def test_right_padding_is_rejected(tiny):
    model, processor, _ = tiny
    inputs = make_inputs(processor, PROMPTS)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    with apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=8)):
        with pytest.raises(ValueError, match="left padding"):
            logits(model, inputs)
