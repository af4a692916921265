"""The runs a user makes with a real model: a hub id, the large configs' settings, bf16.

Tolerances in bf16 (8 bits of mantissa, about 3 significant digits): a logit of size ~10 carries a
rounding step of ~0.06, and cached decoding computes attention over a cache in another order than a
cache-free forward, so the two may differ by a few such steps. Greedy tokens are compared where the
cache-free top-2 margin exceeds that (BF16_LOGIT_ATOL); logits within it.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dlo
from dlo.expansion import ExpansionPlan, expand_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny"
BF16_LOGIT_ATOL = 0.25


@pytest.mark.slow
def test_recipe_on_a_hub_id_with_the_large_configs_settings(hub_cache, tmp_path):
    """recipes/sft.py, offline, on a model named by hub id in the local cache, with gradient checkpointing,
    LoRA, cos-global labels and annealing in bf16 (what llama3-8b-llama-pro.yaml asks for, at tiny size)."""
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", f"model.path={hub_cache.repo}", "model.dtype=bfloat16",
                 "model.gradient_checkpointing=true", "lora.r=4", "lora.alpha=8", "routing.label=cos-global",
                 "routing.anneal_steps=2", "training.max_steps=3", "training.per_device_train_batch_size=4",
                 "training.logging_steps=1", "training.save_steps=100", "data.max_length=96",
                 "data.max_train_samples=24", "data.max_eval_samples=8", "calibration_samples=8"]
    env = {"HF_HOME": str(hub_cache.home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "recipes/sft.py"), "--config", str(ROOT / "recipes/configs/tiny.yaml"),
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "final" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss"] > 0
    model = dlo.load_model(str(out / "final"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert [layer.layer_index for layer in dlo.routed_layers(model)] == [3, 7]
    for layer in dlo.routed_layers(model):
        assert layer.router.weight.abs().sum() > 0  # routers trained (with LoRA, through modules_to_save)
        assert layer.score_quantiles.dtype == torch.float32  # thresholds keep full precision in a bf16 model
    assert int(dlo.routing_state(model).step) == 3


@pytest.fixture(scope="module")
def bf16_routed():
    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.bfloat16)
    model = expand_model(base, ExpansionPlan.llama_pro(num_layers=6, groups=2, init="copy"))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="all", capacity=0.5, label="cos-global",
                                                        anneal_steps=1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in dlo.routed_layers(model):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * 0.05)
    return model


def _ids(n, length, seed):
    return torch.randint(10, 4000, (n, length), generator=torch.Generator().manual_seed(seed))


def test_bf16_training_step_keeps_routing_state_in_fp32(bf16_routed):
    model = copy.deepcopy(bf16_routed).train()
    assert {layer.capacity.dtype for layer in dlo.routed_layers(model)} == {torch.float32}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = _ids(2, 24, 1)
    for _ in range(2):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    assert 0 < out.router_loss.item() < 2
    layers = dlo.routed_layers(model)
    assert all(layer.score_quantiles.dtype == torch.float32 for layer in layers)
    assert len({round(layer.target_capacity, 6) for layer in layers}) > 1  # cos-global moved them, unrounded


def test_bf16_cached_generation_equals_cache_free(bf16_routed):
    model = copy.deepcopy(bf16_routed).eval()
    dlo.calibrate(model, [{"input_ids": _ids(4, 32, 2)}], progress=False)
    ids = _ids(2, 10, 3)
    steps = 8
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=True, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    seq = ids
    with torch.no_grad():
        for t in range(steps):
            logits = model(seq, use_cache=False).logits[:, -1].float()
            torch.testing.assert_close(out.logits[t].float(), logits, atol=BF16_LOGIT_ATOL, rtol=0)
            top2 = logits.topk(2).values
            decided = (top2[:, 0] - top2[:, 1]) > BF16_LOGIT_ATOL
            assert torch.equal(out.sequences[decided, ids.shape[1] + t], logits.argmax(-1)[decided])
            seq = out.sequences[:, : ids.shape[1] + t + 1]  # follow the cached run's tokens


def test_bf16_report_and_export(bf16_routed, tmp_path):
    from dlo.batching import batches
    from dlo.report import build_report

    model = copy.deepcopy(bf16_routed).eval()
    dlo.calibrate(model, [{"input_ids": _ids(4, 32, 4)}], progress=False)
    ids = _ids(3, 20, 5)
    eval_batches = batches([{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids], batch_size=3, pad_id=0)
    report, _ = build_report(model, eval_batches, warmup=0, repeats=1, progress=False)
    assert 0 < report["eval"]["loss"] < 20
    assert all(0 < row["capacity"] <= 1 for row in report["layers"])
    exported = dlo.export_static(model, num_layers=6)
    assert exported.dtype == torch.bfloat16 and exported.config.num_hidden_layers == 6
    exported.save_pretrained(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, exported(ids).logits, atol=0, rtol=0)
