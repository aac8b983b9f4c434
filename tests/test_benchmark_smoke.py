"""The prefill benchmark's smallest mode end to end, and its mask-mode / eager-FastV baselines against the drop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastv_advanced import FastVConfig, apply_fastv

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_prefill  # noqa: E402
import selection_cost  # noqa: E402
from fastv_baselines import EagerFastV, MaskModeFastV  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    preset = bench_prefill.PRESETS["tiny"]
    device, dtype = torch.device("cpu"), torch.float32
    model = bench_prefill.build_model(preset, device, dtype, seed=0)
    inputs = bench_prefill.build_inputs(model, preset, device, dtype, batch=2, seed=1)
    return model, inputs


def test_cli_smoke_writes_complete_result(tmp_path, capsys):
    returned = bench_prefill.main(
        ["--preset", "tiny", "--smoke", "--threads", "1", "--cpu-memory", "inprocess", "--out", str(tmp_path)]
    )
    assert "| mode | K | R |" in capsys.readouterr().out
    [path] = tmp_path.glob("bench_prefill_tiny_smoke_cpu_*.json")
    assert path.with_suffix(".md").exists()
    result = json.loads(path.read_text())
    assert result["rows"] == json.loads(json.dumps(returned["rows"]))

    meta = result["meta"]
    for key in ("device_name", "torch", "transformers", "date", "command", "threads", "load_before", "elapsed_s"):
        assert meta[key] is not None, key
    assert meta["n_image"] == 64 and meta["prefill_rounds"] == 1 and meta["threads"] == 1

    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"baseline", "eager_baseline"} | {
        f"{mode}/K2/R{rank}" for mode in ("drop", "mask", "eager_fastv") for rank in (64, 32, 0)
    }
    for row in rows.values():
        assert row["prefill_s"] > 0 and row["decoder_s"] > 0 and row["decoder_s"] < row["prefill_s"]
        assert row["prefill_speedup"] > 0 and 0 < row["flops_ratio"] <= 1
    assert rows["baseline"]["prefill_speedup"] == 1.0
    assert rows["drop/K2/R32"]["tokens_after_k"] == meta["n_tokens"] - 32
    assert rows["mask/K2/R32"]["tokens_after_k"] == meta["n_tokens"]  # mask mode removes nothing
    assert rows["drop/K2/R64"]["flops_ratio"] == 1.0 and rows["drop/K2/R0"]["flops_ratio"] < 1.0
    # end-to-end and memory on the subset (K=2, R=32 in smoke mode) and the references
    for key in ("baseline", "drop/K2/R32", "mask/K2/R32", "eager_fastv/K2/R32"):
        assert rows[key]["e2e_1_s"] > 0 and rows[key]["e2e_4_s"] > rows[key]["e2e_1_s"] * 0.5
        assert rows[key]["generate_4_peak_extra_bytes"] is not None
    assert "e2e_1_s" not in rows["drop/K2/R0"]

    assert {s["rank"] for s in result["selection"]} == {64, 32, 0}
    assert all(0 < s["share_of_prefill"] < 1 for s in result["selection"])
    assert [m["seq_len"] for m in result["selection_memory"]] == [meta["n_tokens"] * f for f in (1, 2, 4, 8)]
    assert {"K2_R288", "selection_share_met", "selection_memory_growth_exponent"} <= set(result["targets"])

    for check in result["checks"]:
        assert check["mask_same_kept_positions"] and check["eager_fastv_same_kept_positions"]
        assert check["mask_vs_drop_max_abs_logit_diff"] < 1e-4
        assert check["eager_fastv_vs_drop_max_abs_logit_diff"] < 1e-4


def test_cpu_memory_worker_measures_one_configuration_in_a_fresh_process():
    args = bench_prefill.parse_args(["--preset", "tiny", "--smoke", "--threads", "1"])
    memory = bench_prefill.run_memory_worker(args, "drop/K2/R32", 4)
    assert set(memory) == {"prefill_peak_extra_bytes", "prefill_peak_total_bytes", "generate_4_peak_extra_bytes",
                           "generate_4_peak_total_bytes"}
    assert 0 < memory["prefill_peak_extra_bytes"] < memory["prefill_peak_total_bytes"]


def _last_logits_and_kept(model, inputs, context):
    with context as fastv, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    return logits, fastv.last_selection.kept_positions


@pytest.mark.parametrize("agg_layer,rank", [(1, 20), (2, 32), (3, 0)])
def test_mask_mode_and_eager_fastv_match_physical_drop(tiny, agg_layer, rank):
    model, inputs = tiny
    config = FastVConfig(agg_layer=agg_layer, attention_rank=rank)
    with torch.no_grad():
        unpruned = model(**inputs).logits[:, -1]
    drop, kept = _last_logits_and_kept(model, inputs, apply_fastv(model, config))
    mask, mask_kept = _last_logits_and_kept(model, inputs, MaskModeFastV(model, config))
    eager, eager_kept = _last_logits_and_kept(model, inputs, EagerFastV(model, config))

    assert kept.shape == (2, inputs["input_ids"].shape[1] - (64 - rank))
    assert torch.equal(mask_kept, kept) and torch.equal(eager_kept, kept)
    torch.testing.assert_close(mask, drop, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager, drop, rtol=1e-4, atol=1e-5)
    assert (drop - unpruned).abs().max() > 1e-3  # pruning changed the answer: the comparison is not vacuous
    assert model.config.text_config._attn_implementation == "sdpa"  # EagerFastV restored the attention


def test_mask_mode_and_eager_fastv_decode_like_physical_drop(tiny):
    """Decode steps: mask mode keeps masking the dropped prompt tokens; eager FastV's cache holds only kept ones."""
    model, inputs = tiny
    config = FastVConfig(agg_layer=2, attention_rank=16)
    scores = {}
    for name, make in (("drop", apply_fastv), ("mask", MaskModeFastV), ("eager", EagerFastV)):
        with make(model, config), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        scores[name] = (out.sequences, torch.stack(out.scores))
    for name in ("mask", "eager"):
        assert torch.equal(scores[name][0], scores["drop"][0]), name
        torch.testing.assert_close(scores[name][1], scores["drop"][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("agg_layer,rank", [(1, 20), (2, 32), (3, 0), (2, 64)])
def test_timed_selection_step_keeps_what_apply_fastv_keeps(tiny, agg_layer, rank):
    """The benchmark's selection step, on the tensors it captures at layer K-1, keeps the pruner's positions."""
    model, inputs = tiny
    config = FastVConfig(agg_layer=agg_layer, attention_rank=rank)
    with apply_fastv(model, config) as fastv, torch.no_grad():
        model(**inputs)
    captured = selection_cost.selection_inputs(model, inputs, agg_layer)
    generator = torch.Generator().manual_seed(0)
    kept = selection_cost.selection_step(captured, config, generator, with_gathers=True)
    assert torch.equal(kept, fastv.last_selection.kept_positions)
    assert torch.equal(selection_cost.selection_step(captured, config, generator), kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only detectable on CUDA")
def test_timed_selection_step_has_no_host_sync():
    preset, device = bench_prefill.PRESETS["tiny"], torch.device("cuda")
    model = bench_prefill.build_model(preset, device, torch.float32, seed=0)
    inputs = bench_prefill.build_inputs(model, preset, device, torch.float32, batch=2, seed=1)
    captured = selection_cost.selection_inputs(model, inputs, 2)
    config = FastVConfig(agg_layer=2, attention_rank=32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        selection_cost.selection_step(captured, config, torch.Generator().manual_seed(0), True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- --zoo: every pruning method at its papers' presets ----------------------------------------------------------

import fastv_advanced.pruning as pruning_module  # noqa: E402
import zoo  # noqa: E402
import zoo_methods  # noqa: E402
from fastv_advanced import apply_pruning  # noqa: E402
from modes import Config  # noqa: E402


def test_zoo_cli_smoke_reports_a_row_per_method_and_preset(tmp_path, capsys):
    returned = bench_prefill.main(["--preset", "tiny", "--smoke", "--zoo", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| method | preset | settings run |" in out and "parameter: paper → here" in out
    [path] = tmp_path.glob("bench_prefill_zoo_tiny_smoke_cpu_*.json")
    assert path.with_suffix(".md").exists()
    result = json.loads(path.read_text())
    assert result["rows"] == json.loads(json.dumps(returned["rows"]))
    meta = result["meta"]
    assert meta["zoo"] and meta["prefill_rounds"] == 1 and meta["stage_reps"] == 1 and meta["threads"] == 1

    rows = {r["key"]: r for r in result["rows"]}
    expected = {f"zoo/{m}/{p}" for m in ("fastv", "pdrop", "sparsevlm", "dart", "visionzip", "divprune")
                for p in ("192", "128", "64")} | {f"zoo/{m}/{p}" for m in ("uniform", "pool") for p in ("144", "64")}
    assert set(rows) == expected | {"baseline"}
    assert rows["baseline"]["prefill_speedup"] == 1.0 and rows["baseline"]["flops_ratio"] == 1.0
    for key in expected:
        row = rows[key]
        assert 0 < row["flops_ratio"] < 1 and row["theoretical_speedup"] == pytest.approx(1 / row["flops_ratio"])
        for field in ("prefill_speedup", "prefill_speedup_over_theoretical", "decoder_speedup",
                      "decoder_speedup_over_theoretical", "prefill_speedup_paired_over_theoretical"):
            assert row[field] > 0, (key, field)
        assert row["decoder_s"] < row["prefill_s"]
        assert 0 < row["ceiling_over_theoretical"] < 1  # the vision tower and logits are not pruned
        # shares only > 0: one instrumented run of a millisecond prefill on a shared machine can be preempted
        assert 0 < row["selection_s"] <= row["stage_work_s"] and row["selection_share"] > 0
        assert row["stage_work_share"] == pytest.approx(row["stage_work_s"] / row["instrumented_prefill_s"])
        assert row["measured_kept_per_stage"] == row["planned_kept_per_stage"], key  # what ran is what was costed
        assert row["logits_finite"]
    # the mapping is reported: 4 layers, 64 image tokens
    assert rows["zoo/pdrop/64"]["parameters"]["layers"] == [1, 2, 3]
    assert rows["zoo/fastv/192"]["mapped"] == {"agg_layer": [2, 1], "attention_rank": [192, 21]}
    # methods that prune before the language model run only the pruned count from layer 0
    assert rows["zoo/uniform/64"]["image_tokens_per_layer"] == [9] * 4


def test_zoo_methods_option_restricts_the_methods(tmp_path):
    result = bench_prefill.main(["--preset", "tiny", "--smoke", "--methods", "uniform", "pool", "--threads", "1",
                                 "--stage-reps", "2", "--out", str(tmp_path)])
    assert [r["key"] for r in result["rows"]] == ["baseline", "zoo/uniform/144", "zoo/uniform/64", "zoo/pool/144",
                                                  "zoo/pool/64"]
    assert all(len(r["stage_seconds_samples"]["choose"]) == 2 for r in result["rows"][1:])


def test_layer_mapping_rule_against_hand_computed_examples():
    # 8 layers (the scaled preset): s -> max(1, round_half_up(s * 8 / 32))
    assert zoo_methods.map_stage_layers((2, 8, 16), 8) == (1, 2, 4)  # 0.5 -> 1, 2, 4
    assert zoo_methods.map_stage_layers((3, 7, 16), 8) == (1, 2, 4)  # 0.75 -> 1, 1.75 -> 2, 4
    assert zoo_methods.map_stage_layers((2,), 8) == (1,)
    assert zoo_methods.map_stage_layers((2, 8, 16), 32) == (2, 8, 16)  # 32 layers: unchanged
    # 4 layers: 0.5 -> 1, 2 -> 2, 4 -> 3 capped at L - 1 = 3
    assert zoo_methods.map_stage_layers((2, 8, 16), 4) == (1, 2, 3)
    # 0.25 -> 1 and 1 -> 1 collide: the second moves up to 2
    assert zoo_methods.map_stage_layers((1, 4, 9), 4) == (1, 2, 3)  # 9 -> round(2.25) = 2 -> after 2: 3
    # 24, 28, 31 on 8 layers: 6, 7, 8 -> pulled down from the end to 5, 6, 7
    assert zoo_methods.map_stage_layers((24, 28, 31), 8) == (5, 6, 7)
    with pytest.raises(ValueError):
        zoo_methods.map_stage_layers((1, 2, 3, 4), 4)  # four stages cannot fit layers 1..3

    # each method's layer field, on the scaled preset (8 layers, 576 image tokens): counts unchanged
    assert zoo_methods.zoo_params("fastv", "64", 8, 576) == {"agg_layer": 1, "attention_rank": 64}
    assert zoo_methods.zoo_params("dart", "128", 8, 576) == {"max_num_truncation": 128, "layer": 1}
    assert zoo_methods.zoo_params("pdrop", "128", 8, 576) == {"layers": (1, 2, 4), "ratio": 0.42}
    # SparseVLM rates at l and prunes before l + 1: stages (3, 7, 16) -> (1, 2, 4), rating layers (0, 1, 3)
    assert zoo_methods.zoo_params("sparsevlm", "192", 8, 576) == {"budget": 192, "layers": (0, 1, 3)}
    assert zoo_methods.zoo_params("visionzip", "64", 8, 576) == {"dominant": 54, "contextual": 10}

    # 64 image tokens: counts scaled by 64 / 576 and rounded half up
    assert zoo_methods.zoo_params("fastv", "192", 4, 64)["attention_rank"] == 21  # 21.33
    assert zoo_methods.zoo_params("visionzip", "64", 4, 64) == {"dominant": 6, "contextual": 1}  # 6, 1.11
    assert zoo_methods.zoo_params("sparsevlm", "64", 4, 64)["keep"] == (7, 3, 2)  # 66, 30, 17 -> 7.33, 3.33, 1.89
    assert zoo_methods.zoo_params("divprune", "64", 4, 64) == {"ratio": round(64 / 576, 4)}  # the preset as written
    assert zoo_methods.changed_settings("pdrop", "64", 8, 576) == {"layers": ((2, 8, 16), (1, 2, 4))}
    assert Config.from_key("zoo/pdrop/64") == Config("zoo", method="pdrop", preset="64")
    assert Config.from_key(Config("drop", 2, 288).key) == Config("drop", 2, 288)


@pytest.mark.parametrize("name,params", [("fastv", {"agg_layer": 2, "attention_rank": 20}),
                                         ("pdrop", {"layers": (1, 3), "ratio": 0.5})])
def test_stage_timer_counts_each_part_once_and_changes_nothing(tiny, name, params):
    model, inputs = tiny
    method = zoo_methods.build_method(name, params)
    originals = {n: getattr(pruning_module, n) for n in zoo.CAPTURE_FUNCTIONS + zoo.SELECT_FUNCTIONS}
    with apply_pruning(model, method), torch.no_grad():
        plain = model(**inputs).logits[:, -1]
    with apply_pruning(model, method) as pruner, torch.no_grad():
        with zoo.StageTimer(pruner, torch.device("cpu")) as timer:
            timed = model(**inputs).logits[:, -1]
    assert torch.equal(timed, plain)
    assert {n: getattr(pruning_module, n) for n in originals} == originals  # unwrapped again
    assert "choose" not in method.__dict__ and "_run_stage" not in pruner.__dict__
    t = timer.seconds
    assert t["choose"] > 0 and t["select_drop"] > 0 and t["image_lookup"] > 0
    assert t["inputs"] + t["choose"] + t["select_drop"] <= t["stage"]
    if name == "fastv":  # the layer K-1 attention row is computed in that layer's hooks, before the stage
        assert t["capture"] > 0
    else:  # PyramidDrop computes each stage layer's own attention inside the stage: counted once, as inputs
        assert t["capture"] == 0 and t["inputs"] > 0


def test_profile_choose_profiles_each_stage_of_a_method():
    import profile_choose

    out = profile_choose.main(["--preset", "tiny", "--threads", "1", "--reps", "1", "zoo/pdrop/64", "zoo/pool/64"])
    assert set(out) == {"zoo/pdrop/64#0", "zoo/pdrop/64#1", "zoo/pdrop/64#2", "zoo/pool/64#0"}
    assert all(v["seconds"] > 0 and "Self CPU" in v["table"] for v in out.values())


import bench_families  # noqa: E402


def test_family_benchmark_smoke_writes_every_budget(tmp_path, capsys):
    """The NeXT-like and Qwen2.5-VL-like benchmark: each budget really keeps its tokens, and the theoretical
    speed-up is the FLOPs model's (recomputed here by hand from the layer formula)."""
    assert bench_families.main(["--smoke", "--output-dir", str(tmp_path)]) == 0
    (result_file,) = tmp_path.glob("bench_families_smoke_*.json")
    result = json.loads(result_file.read_text())
    assert [r["family"] for r in result["results"]] == ["next", "qwen"]
    for family in result["results"]:
        rows = family["rows"]
        assert rows[0]["config"] == "baseline" and rows[0]["theoretical"] == 1.0
        n, image = family["num_tokens"], family["num_image_tokens"]
        shape = family["decoder_shape"]
        d, m, q = shape["hidden_size"], shape["intermediate_size"], shape["num_heads"] * shape["head_dim"]
        kv = shape["num_kv_heads"] * shape["head_dim"]
        layers = shape["num_layers"]

        def layer(tokens):
            return 2 * (tokens * d * (2 * q + 2 * kv) + 2 * tokens * tokens * q + 3 * tokens * d * m)

        for row in rows[1:]:
            assert row["kept_measured"] == row["kept"] < image
            hand = layers * layer(n) / (2 * layer(n) + (layers - 2) * layer(n - image + row["kept"]))
            assert row["theoretical"] == pytest.approx(hand)
            assert row["prefill_s"] > 0 and row["decoder_s"] > 0
    assert "next-like" in capsys.readouterr().out
