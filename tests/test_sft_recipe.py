"""recipes/sft.py end to end on the bundled tiny default (1 and 2 CPU processes)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dlo

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses; `-m "not slow"` skips them
CONFIG = ROOT / "recipes" / "configs" / "tiny.yaml"
SMALL = [
    "training.per_device_train_batch_size=4",
    "training.logging_steps=2",
    "training.save_steps=4",
    "training.learning_rate=3e-3",
    "routing.anneal_steps=4",
    "data.max_length=64",
    "data.max_train_samples=256",
    "data.max_eval_samples=16",
    "calibration_samples=16",
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    return env


def run_recipe(out, *overrides, processes=1, check=True):
    args = [f"output_dir={out}", *SMALL, *overrides]
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "recipes/sft.py"), "--config", str(CONFIG), *args]
        env = _env()
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29533", str(ROOT / "recipes/sft.py"), "--config", str(CONFIG), *args]
        env = dict(_env(), ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tensorboard_scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return scalars


def test_single_process_trains_logs_and_saves(tmp_path):
    out = tmp_path / "run"
    run_recipe(out, "training.max_steps=24", "data.max_eval_samples=64", "calibration_samples=64")
    final = out / "final"
    summary = json.loads((final / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["eval_loss"] > 0
    scalars = tensorboard_scalars(out / "tb")
    task = scalars["train/task_loss"]
    assert task[-1] < task[0], task  # the loss falls
    for tag in ("train/router_loss", "train/tokens_per_second", "train/routing/mean_capacity",
                "train/routing/capacity/layer_3", "train/routing/agreement/layer_7",
                "train/flops/routed_over_dense_expanded"):
        assert tag in scalars, sorted(scalars)
    model = dlo.load_model(str(final))
    layers = dlo.routed_layers(model)
    # No adapters: everything trains, and training held what the saved model holds.
    held = sum(p.numel() for p in model.parameters())
    assert summary["parameters"] == {"total": held, "trainable": held}
    assert [layer.layer_index for layer in layers] == [3, 7]
    for layer in layers:  # routers left their zero init; thresholds were calibrated
        assert layer.router.weight.abs().sum() > 0
    # Thresholds calibrated on training text give the target capacity on held-out text (cos-global moves the
    # per-layer targets, so each layer is held to its own).
    for row in summary["layers"]:
        assert abs(row["realised_capacity"] - row["target_capacity"]) <= 0.03, summary["layers"]
    assert abs(sum(row["target_capacity"] for row in summary["layers"]) / 2 - 0.5) < 1e-3


def test_two_cpu_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    proc = run_recipe(out, "training.max_steps=6", "training.per_device_train_batch_size=2", processes=2)
    assert "dlo sft summary" in proc.stdout
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert weights["model.layers.3.router.weight"].abs().sum() > 0
    # The routing state travels in the checkpoint's own weights, not in a side file.
    checkpoint = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert int(checkpoint["dlo_routing_state.step"]) == 4
    assert checkpoint["model.layers.3.score_quantiles"].shape == (101,)
    assert not list((out / "checkpoint-4").glob("dlo_routing_state*"))


def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
    steps = ["training.max_steps=10", "training.save_steps=100", "routing.similarity_every=2"]
    run_recipe(tmp_path / "straight", *steps)

    out = tmp_path / "interrupted"
    cmd = [sys.executable, str(ROOT / "recipes/sft.py"), "--config", str(CONFIG), f"output_dir={out}", *SMALL,
           *steps]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # the first training log line (step 2) means the run is mid-way
        seen.append(line)
        if "'task_loss'" in line:
            proc.send_signal(signal.SIGTERM)
            break
    stdout = "".join(seen) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, stdout[-3000:]
    assert "Resume with" in stdout, stdout[-2000:]
    assert not (out / "final").exists()
    run_recipe(out, *steps, "resume=true")

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


def test_lora_with_routers_saves_and_merges(tmp_path):
    out = tmp_path / "lora"
    run_recipe(out, "training.max_steps=6", "lora.r=4", "lora.alpha=8")
    final = out / "final"
    weights = load_file(str(final / "model.safetensors"))
    assert not any("lora_" in k or "modules_to_save" in k for k in weights)
    assert weights["model.layers.3.router.weight"].abs().sum() > 0
    base = load_file(str(ROOT / "assets/tiny/base/model.safetensors"))
    # Layer 0 of the expanded model is base layer 0; merged adapters changed it.
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    model = dlo.load_model(str(final))
    assert len(dlo.routed_layers(model)) == 2


def test_packed_examples_train_and_save_a_model_that_generates_with_its_cache(tmp_path):
    out = tmp_path / "packed"
    run_recipe(out, "training.max_steps=4", "data.packing=true")
    summary = json.loads((out / "final" / "summary.json").read_text())
    assert summary["data"]["train"]["packed_blocks"] > 0 and summary["steps"] == 4
    # Training ran without a KV cache (so transformers kept the examples apart); the saved model has it back.
    assert json.loads((out / "final" / "config.json").read_text())["use_cache"] is True


def test_clear_errors(tmp_path):
    bad_key = run_recipe(tmp_path / "a", "routing.capacty=0.3", check=False)
    assert bad_key.returncode != 0 and "did you mean 'capacity'" in bad_key.stderr

    no_answer = tmp_path / "noanswer.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    proc = run_recipe(tmp_path / "b", f"data.train_file={no_answer}", "data.eval_file=null", check=False)
    assert proc.returncode != 0 and "no trainable tokens" in proc.stderr

    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"text": "hello"}) + "\n")
    proc = run_recipe(tmp_path / "c", f"data.train_file={missing}", "data.eval_file=null", check=False)
    assert proc.returncode != 0 and "'messages' column" in proc.stderr

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something.txt").write_text("another run")
    proc = run_recipe(taken, check=False)
    assert proc.returncode != 0 and "already holds" in proc.stderr


SHARED_MIDDLE = "model.expansion={strategy: slices, ranges: '0-4,2-6', init: zero, shared: true}"


def test_shared_repetitions_train_route_and_save_once(tmp_path):
    out = tmp_path / "shared"
    run_recipe(out, "training.max_steps=6", SHARED_MIDDLE)
    final = out / "final"
    model = dlo.load_model(str(final))
    layers = model.model.layers
    assert [layer.layer_index for layer in dlo.routed_layers(model)] == [4, 5]  # the repetitions of 2 and 3
    assert layers[4].self_attn.q_proj.weight is layers[2].self_attn.q_proj.weight
    assert layers[4].self_attn.residual_scale.weight.abs().sum() > 0  # trained away from the identity
    weights = load_file(str(final / "model.safetensors"))
    assert not any(k.startswith(("model.layers.4.self_attn.q_proj", "model.layers.5.mlp.up_proj")) for k in weights)
    base = load_file(str(ROOT / "assets/tiny/base/model.safetensors"))
    extra = sum(t.numel() for t in weights.values()) - sum(t.numel() for t in base.values())
    d = model.config.hidden_size
    assert extra == 2 * (d + 1) + 2 * 2 * d + 2 * (1 + 101) + 1  # routers, scales, routing buffers, step


def test_shared_repetitions_with_lora_merge_into_copies(tmp_path):
    out = tmp_path / "shared-lora"
    run_recipe(out, "training.max_steps=4", SHARED_MIDDLE, "lora.r=4", "lora.alpha=8")
    final = out / "final"
    weights = load_file(str(final / "model.safetensors"))
    assert not any("lora_" in k or "modules_to_save" in k or "residual_scale" in k for k in weights)
    # Each repetition merged its own adapters: its weights are its own, no longer its source's.
    assert not torch.equal(weights["model.layers.4.self_attn.q_proj.weight"],
                           weights["model.layers.2.self_attn.q_proj.weight"])
    model = dlo.load_model(str(final))
    assert "dlo_repetitions" not in model.config.to_dict() and len(dlo.routed_layers(model)) == 2


def test_compare_measures_base_dense_twin_routed_and_export_on_the_same_data(tmp_path):
    out = tmp_path / "compare"
    proc = run_recipe(out, "training.max_steps=4", "model.trainable_layers=new", "compare.export_layers=7",
                      "compare.text_file=assets/tiny/sft/eval.jsonl", "compare.max_text_samples=8")
    assert "== comparison on the held-out data ==" in proc.stdout
    rows = {row["name"]: row for row in json.loads((out / "comparison.json").read_text())["models"]}
    assert list(rows) == ["base (as loaded)", "dense expanded, trained", "routed", "routed, every layer run",
                          "static export (7 layers)"]
    assert [rows[name]["layers"] for name in rows] == [6, 8, 8, 8, 7]
    assert rows["base (as loaded)"]["flops"] == 1.0 and rows["routed, every layer run"]["flops"] > 1.0
    assert rows["routed"]["flops"] < rows["routed, every layer run"]["flops"]  # tokens skipped
    assert all(row["text_loss"] > 0 for row in rows.values())

    # The base model measured as a fresh load of the tiny default on the held-out answers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlo.batching import batches
    from dlo.data import build_sft_dataset
    from dlo.evaluation import evaluate

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets/tiny/base")
    held_out, _ = build_sft_dataset(tokenizer, str(ROOT / "assets/tiny/sft/eval.jsonl"), 64, 16)
    base = AutoModelForCausalLM.from_pretrained(ROOT / "assets/tiny/base")
    want = evaluate(base, batches(held_out, 8, tokenizer.pad_token_id), progress=False).loss
    assert abs(rows["base (as loaded)"]["eval_loss"] - want) < 1e-3

    # The dense twin trained the same run without routers; the base layers stayed frozen in both runs.
    dense = AutoModelForCausalLM.from_pretrained(out / "dense" / "final")
    assert not dlo.routed_layers(dense) and dense.config.num_hidden_layers == 8
    routed = dlo.load_model(str(out / "final"))
    untouched = {k: v for k, v in base.state_dict().items() if ".layers." not in k}
    for model in (dense, routed):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in untouched.items())  # embeddings, norm, head frozen
        base_layer = base.state_dict()["model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], base_layer)  # a base layer: frozen
        assert state["model.layers.3.mlp.down_proj.weight"].abs().sum() > 0  # the zero-init copy trained
    exported = AutoModelForCausalLM.from_pretrained(out / "exported")
    assert exported.config.num_hidden_layers == 7 and not dlo.routed_layers(exported)
