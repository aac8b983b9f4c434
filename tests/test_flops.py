"""The FLOPs model against hand computations (DESIGN.md section 4)."""

from types import SimpleNamespace

import pytest

from fastv_advanced.flops import DecoderShape, layer_flops, prefill_flops

LLAVA_7B = DecoderShape(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                        head_dim=128)


def test_layer_flops_by_hand():
    n, d, m = 10, 8, 20
    shape = DecoderShape(hidden_size=d, intermediate_size=m, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4)
    # q, o: d x 8; k, v: d x 4 -> n*d*(8+8+4+4); QK^T and AV: 2*n*n*8; SwiGLU: 3*n*d*m; 2 FLOPs per multiply-add
    expected = 2 * (n * d * 24 + 2 * n * n * 8 + 3 * n * d * m)
    assert layer_flops(shape, n) == expected


def test_llava_7b_ratio_matches_design_range():
    n = 35 + 576 + 90
    info = prefill_flops(LLAVA_7B, n, 576, 288, 2)
    assert info["pruned_num_tokens"] == n - 288
    per_token_unpruned = info["baseline_flops"] / (32 * n)
    assert per_token_unpruned > 4e8  # ~2 * (4 d^2 + 3 d m) per token per layer: hundreds of MFLOPs
    assert 0.59 <= info["ratio"] <= 0.61
    fastv_paper_style = (2 * (4 * n * 4096**2 + 2 * n * n * 4096 + 3 * n * 4096 * 11008)) * 32
    assert info["baseline_flops"] == fastv_paper_style  # no GQA: the real shapes reduce to FastV's formula


@pytest.mark.parametrize("kept,layer", [(None, 2), (288, None)])
def test_unpruned_ratio_is_one(kept, layer):
    assert prefill_flops(LLAVA_7B, 700, 576, kept, layer)["ratio"] == 1.0


def test_keeping_every_token_costs_the_baseline():
    assert prefill_flops(LLAVA_7B, 700, 576, 576, 2)["ratio"] == 1.0


def test_shape_from_text_config():
    config = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=None, hidden_act="silu")
    shape = DecoderShape.from_text_config(config)
    assert (shape.head_dim, shape.num_kv_heads, shape.gated_mlp) == (16, 2, True)


def test_schedule_flops_sums_the_segments_between_stages():
    from fastv_advanced.flops import DecoderShape, layer_flops, schedule_flops

    shape = DecoderShape(hidden_size=64, intermediate_size=160, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
    n, image = 100, 64
    result = schedule_flops(shape, n, image, [(1, 40), (3, 12)])
    expected = layer_flops(shape, n) + 2 * layer_flops(shape, n - 24) + layer_flops(shape, n - 52)
    assert result["flops"] == expected
    assert result["image_tokens_per_layer"] == [64, 40, 40, 12]
    assert result["pruned_num_tokens"] == n - 52
    before_the_model = schedule_flops(shape, n, image, [(0, 16)])
    assert before_the_model["flops"] == 4 * layer_flops(shape, n - 48)
    assert schedule_flops(shape, n, image, [])["ratio"] == 1.0
