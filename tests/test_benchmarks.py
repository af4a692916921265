"""The benchmark scripts run end to end (smoke sizes) and their JSON holds what docs/BENCHMARKS.md reports."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses; `-m "not slow"` skips them


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_layer_benchmark_json(tmp_path):
    result = run_benchmark("layer.py", tmp_path / "layer.json", "--quick", "--capacities", "1.0", "0.25",
                           "--profile", "0.25")
    assert result["environment"]["device"] and result["environment"]["backend"] == "torch"  # the device is named
    cells = {(r["capacity"], r["approach"], r["mode"]): r for r in result["timings"]}
    for c in (1.0, 0.25):
        for approach in ("dense", "block", "mlp", "packed", "mask", "boolidx"):
            for mode in ("fwd", "fwd+bwd"):
                assert _finite_positive(cells[c, approach, mode]["ratio"]), (c, approach, mode)
        assert cells[c, "dense", "fwd"]["ratio"] == pytest.approx(1.0)  # ratios are to dense in the same round
        # the correctness check ran before timing: block and mlp agree with their references
        assert set(result["checks_max_abs_diff"][str(c)]) == {"block", "mlp"}
        assert max(result["checks_max_abs_diff"][str(c)].values()) < 1e-4
    memory = {(m["capacity"], m["approach"]): m["saved_ratio"] for m in result["memory"]}
    # Activation memory follows capacity: at c=0.25 block routing saves far less for backward than dense.
    assert memory[0.25, "block"] < 0.6 * memory[0.25, "dense"]
    assert memory[0.25, "mask"] >= 1.0  # the masking peer runs every token: no saving
    profile = result["profile"]["0.25"]
    assert set(profile) == {"dense", "packed", "block"} and all(sum(v.values()) > 0 for v in profile.values())


def test_long_seq_benchmark_json(tmp_path):
    result = run_benchmark("long_seq.py", tmp_path / "long_seq.json", "--quick")
    rows = {(r["seq"], r["padding"], r["capacity"], r["approach"]): r for r in result["timings"]}
    memory = {(m["seq"], m["padding"], m["capacity"], m["approach"]): m for m in result["memory"]}
    (seq,) = result["config"]["seqs"]
    for padding in ("unpadded", "padded"):
        assert rows[seq, padding, None, "dense"]["ratio"] == pytest.approx(1.0)
        for c in (0.5, 0.25):
            for approach in ("block", "packed"):
                assert _finite_positive(rows[seq, padding, c, approach]["ratio"])
            # activation memory follows capacity, padded or not; padded, the gathered-mask path keeps more
            assert memory[seq, padding, c, "block"]["saved_ratio"] < c + 0.15
    for c in (0.5, 0.25):
        block = memory[seq, "padded", c, "block"]
        assert block["saved_bytes"] < block["saved_bytes_mask_path"]
    assert {(t["seq"], t["capacity"]) for t in result["targets"]} == {(seq, 0.5), (seq, 0.25)}


def test_model_benchmark_json(tmp_path):
    result = run_benchmark("model.py", tmp_path / "model.json", "--quick", "--capacities", "0.5")
    rows = {(r["capacity"], r["approach"], r["mode"]): r for r in result["timings"]}
    for approach in ("dense", "block", "mlp"):
        for mode in ("fwd+bwd", "step"):
            assert _finite_positive(rows[0.5, approach, mode]["ratio"])
    flops = {(m["capacity"], m["approach"]): m["flops_ratio"] for m in result["memory"]}
    assert flops[0.5, "dense"] == pytest.approx(1.0)
    assert flops[0.5, "block"] < flops[0.5, "mlp"] < 1.0  # block also skips attention


def test_similarity_benchmark_json(tmp_path):
    result = run_benchmark("similarity.py", tmp_path / "similarity.json", "--quick", "--capacities", "0.5")
    rows = {r["approach"]: r for r in result["cost"]}
    assert set(rows) == {"dense", "limit", "self", "cos", "cos-global", "cos-global/dense"}
    assert all(_finite_positive(r["ratio"]) for r in rows.values())
    assert rows["dense"]["ratio"] == pytest.approx(1.0) and rows["self"]["saved_ratio_to_self"] == pytest.approx(1.0)
    # The sample and the estimate keep nothing for backward beyond what 'self' keeps.
    assert rows["cos-global"]["saved_bytes"] <= 1.1 * rows["self"]["saved_bytes"]
    quality = result["quality"]
    assert {q["label"] for q in quality["agreement"]} == {"cos", "cos-global"}
    assert all(0.0 <= a <= 1.0 for q in quality["agreement"] for a in q["agreement"])
    assert {t["source"] for t in quality["training"]} == {"packed", "dense"}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_benchmark_json(tmp_path, cache):
    # 12 new tokens: a decode step's time is t(N+1 tokens) - t(1 token), which a tiny N leaves at the load's mercy.
    result = run_benchmark("decode.py", tmp_path / "decode.json", "--sizes", "64,96", "--layers", "2", "--vocab", "128",
                           "--prompt", "8", "--new-tokens", "12", "--repeats", "2", "--batch-sizes", "1,3",
                           "--cache", cache)
    assert result["cache"] == cache
    assert result["device"] and result["load_average_before"] >= 0  # the hardware and the load are named
    assert [m["hidden_size"] for m in result["models"]] == [64, 96]  # both sizes in one run
    for model in result["models"]:
        assert model["routed_layers"] == [0, 1] and model["target_capacity"] == [0.5, 0.5]
        assert [r["batch"] for r in model["rows"]] == [1, 3]
        for row in model["rows"]:
            for name in ("routed", "masked", "forced", "plain"):
                assert _finite_positive(row[f"{name}_tokens_per_s"]), (name, row)
                assert len(row[f"{name}_step_ms"]) == 2  # one sample per round
                assert row[f"{name}_ops_per_step"] > 0
            if cache == "dynamic":  # every token running every layer dispatches no more ops than the stock model
                assert row["forced_ops_per_step"] <= row["plain_ops_per_step"]  # (transformers passes no mask)
            for name in ("routed", "masked", "forced"):
                assert _finite_positive(row[f"{name}_speed_vs_plain"]), (name, row)
            assert 0.0 <= row["decode_run_share"] <= 1.0 and 0.0 <= row["idle_layer_steps"] <= 1.0


def test_compiled_benchmark_json(tmp_path):
    # dynamo alone (backend "eager"): what decides recompiles is the same as inductor's, at a fraction of the cost.
    result = run_benchmark("compiled.py", tmp_path / "compiled.json", "--quick", "--models", "d512",
                           "--backend", "eager")
    rows = {r["candidate"]: r for r in result["timings"]}
    assert set(rows) == {"dense", "dense+c", "routed", "routed+c"}
    assert all(_finite_positive(r["ratio"]) for r in rows.values())
    (info,) = result["models"]
    assert info["routing_steps"] == result["config"]["warmup"] + result["config"]["repeats"]
    # The timed steps anneal (the packed width changes every step), yet compile nothing new, and the compiled
    # model trains as the eager one does.
    assert rows["routed+c"]["graphs_after_warmup"] == 0 and info["recompile_limit_hits"] == 0
    assert rows["routed+c"]["loss_max_abs_diff"] < 1e-4 and rows["dense+c"]["loss_max_abs_diff"] < 1e-4


def test_frankenmodel_benchmark_json(tmp_path):
    """Three short recipe runs: the base, the middle third repeated as copies, and as shared repetitions."""
    from transformers import AutoConfig

    result = run_benchmark("frankenmodel.py", tmp_path / "frankenmodel.json", "--quick")
    base, copied, shared = (result["arms"][name] for name in ("base", "copied", "shared"))
    config = AutoConfig.from_pretrained(ROOT / "assets" / "tiny" / "base")
    d = config.hidden_size
    # Two repetitions, each adding two residual scales of d and a router (d weights and a bias); two copies add
    # two whole layers.
    assert shared["parameters"] - base["parameters"] == 2 * (2 * d + d + 1)
    layer = (copied["parameters"] - base["parameters"] - 2 * (d + 1)) / 2
    assert layer > 100 * d
    assert shared["checkpoint_bytes"] < copied["checkpoint_bytes"] - 1.5 * layer * 4
    assert shared["optimizer_bytes"] < copied["optimizer_bytes"]
    assert [row["layer"] for row in shared["layers"]] == [row["layer"] for row in copied["layers"]] == [4, 5]
    for arm in (base, copied, shared):
        assert math.isfinite(arm["eval_loss"]) and arm["eval_loss"] > 0


def test_real_model_benchmark_json(tmp_path):
    """The real-model benchmark on a tiny random Llama saved as a checkpoint, expanded 4 -> 6 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    result = run_benchmark("real_model.py", tmp_path / "real_model.json", "--quick", "--model", str(tmp_path / "tiny"),
                           "--groups", "2", "--profile", "--threads", "1")  # tiny ops: threads only contend
    assert result["config"]["layers"] == 6 and result["config"]["new_layers"] == [2, 5]
    training = {(r["capacity"], r["candidate"]): r for r in result["training"]}
    for c in (0.5, 0.25):
        for name in ("dense", "routed-new", "limit-new", "routed-all", "limit-all"):
            assert _finite_positive(training[c, name]["ratio"]), (c, name)
        assert training[c, "dense"]["ratio"] == pytest.approx(1.0)
        for name in ("routed-new", "routed-all"):
            assert math.isfinite(training[c, name]["gap"])
    prefill = {(r["batch"], r["candidate"]): r for r in result["prefill"]}
    decode = {(r["batch"], r["candidate"]): r for r in result["decode"]}
    for b in result["config"]["batch_sizes"]:
        for name in ("dense", "routed-new", "limit-new", "routed-all", "limit-all"):
            assert _finite_positive(prefill[b, name]["ratio"]), (b, name)
        for name in ("dense", "routed-new", "routed-all"):
            assert _finite_positive(decode[b, name]["ratio"]), (b, name)
        for name in ("routed-new", "routed-all"):  # calibrated thresholds: some tokens run, not necessarily all
            assert 0.0 < prefill[b, name]["run_share"] <= prefill[b, name]["packed_share"] <= 1.0
            assert 0.0 <= decode[b, name]["run_share"] <= 1.0
    for per in result["profile"].values():
        assert set(per) == {"routed-all", "limit-all"} and all(sum(ops.values()) > 0 for ops in per.values())
    assert result["load_average_before"] >= 0 and result["environment"]["device"]
