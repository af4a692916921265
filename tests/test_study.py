"""recipes/study.py end to end on the tiny default: two training steps per arm, tiny eval sizes."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses; `-m "not slow"` skips them
CONFIG = ROOT / "recipes" / "configs" / "study_tiny.yaml"
SMALL = [
    "training.max_steps=2",
    "training.save_steps=2",
    "training.logging_steps=1",
    "routing.anneal_steps=1",
    "data.max_length=64",
    "data.max_train_samples=64",
    "data.max_eval_samples=8",
    "calibration_samples=8",
    "eval.max_samples=16",
    "eval.batch_size=8",
    "eval.accuracy_samples=3",
    "timing.batch_size=4",
    "timing.warmup=0",
    "timing.repeats=1",
]
NUMBERS = ("num_layers", "parameters", "eval_loss", "eval_perplexity", "accuracy", "flops_per_token", "prefill_s",
           "train_step_s")


def load_study_module():
    name = "dlo_study_recipe"
    if name not in sys.modules:  # dataclasses look their module up in sys.modules while the file executes
        spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / "study.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run_study(study_dir, *overrides):
    # One thread: on a shared 2-core machine, two busy torch pools slow each other down many times over.
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "recipes" / "study.py"), "--config", str(CONFIG), f"study_dir={study_dir}",
           *SMALL, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"study failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def configured_arms() -> dict[str, list[str]]:
    return yaml.safe_load(CONFIG.read_text())["arms"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("study")
    return study_dir, run_study(study_dir)


def test_every_model_has_every_number(study):
    study_dir, proc = study
    rows = {row["name"]: row for row in json.loads((study_dir / "study.json").read_text())["rows"]}
    arms = configured_arms()
    routed = [name for name, overrides in arms.items() if "routing=null" not in overrides]
    assert set(rows) == set(arms) | {f"{name}/export" for name in routed}
    for row in rows.values():
        for key in NUMBERS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["name"], key, row[key])
        assert 0.0 <= row["accuracy"] <= 1.0 and row["eval_loss"] > 0 and row["prefill_s"] > 0
    # FLOPs follow depth and realised capacity: routing saves compute against the dense expansion.
    assert rows["base"]["num_layers"] < rows["dense"]["num_layers"]
    assert rows["base"]["flops_per_token"] < rows["dlo-c050"]["flops_per_token"] < rows["dense"]["flops_per_token"]
    assert rows["dlo-c025"]["flops_per_token"] < rows["dlo-c075"]["flops_per_token"]
    for name in routed:
        assert rows[name]["realised_capacity"] and rows[f"{name}/export"]["kind"] == "export"

    table = (study_dir / "study.md").read_text()
    for name in rows:
        assert f"| {name} |" in table
    assert "dlo efficiency study" in proc.stdout and "| dlo-c050 |" in proc.stdout
    assert (study_dir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((study_dir / "tb").rglob("events.out.tfevents.*"))


def test_exports_load_with_plain_transformers(study):
    study_dir, _ = study
    exports = [row for row in json.loads((study_dir / "study.json").read_text())["rows"] if row["kind"] == "export"]
    assert exports
    for row in exports:
        model = AutoModelForCausalLM.from_pretrained(row["model_dir"])
        assert type(model) is LlamaForCausalLM
        assert not hasattr(model.config, "dlo_routing")
        assert model.config.num_hidden_layers == 8 - len(row["dropped"]) == row["num_layers"]
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 9, 12]])).logits
        assert torch.isfinite(logits).all()


def test_rerun_trains_nothing_and_a_stopped_arm_resumes(study):
    study_dir, _ = study
    weights = sorted(study_dir.glob("arms/*/final/model.safetensors"))
    assert len(weights) == len(configured_arms())
    before = {path: path.stat().st_mtime_ns for path in weights}

    proc = run_study(study_dir)
    assert "training" not in proc.stdout, proc.stdout
    assert proc.stdout.count("cached") == len(configured_arms())
    assert {path: path.stat().st_mtime_ns for path in weights} == before

    # An arm stopped after its last checkpoint but before saving the final model resumes, alone.
    stopped = study_dir / "arms" / "dense"
    for path in (stopped / "final").iterdir():
        path.unlink()
    (stopped / "final").rmdir()
    proc = run_study(study_dir)
    assert "training (resuming from checkpoint-2)" in proc.stdout, proc.stdout
    assert (stopped / "final" / "summary.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in weights if stopped not in p.parents} == \
        {p: t for p, t in before.items() if stopped not in p.parents}


def test_bad_config_is_refused_with_a_clear_error():
    study = load_study_module()
    with pytest.raises(ValueError, match=r"unknown config key 'evl'; did you mean 'eval'"):
        study.load_study_config(str(CONFIG), ["evl.max_samples=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'eval.acuracy_samples'; did you mean 'accuracy_samples'"):
        study.load_study_config(str(CONFIG), ["eval.acuracy_samples=3"])
    with pytest.raises(ValueError, match=r"export.min_capacity=1.5: must be in \(0, 1\]"):
        study.load_study_config(str(CONFIG), ["export.min_capacity=1.5"])
    with pytest.raises(ValueError, match=r"arm 'fast': override 'training.max_steps' is not allowed"):
        study.load_study_config(str(CONFIG), ["arms.fast=[training.max_steps=10]"])
    with pytest.raises(ValueError, match=r"arm 'odd': .*capacity=2.0: must be in \(0, 1\]"):
        study.load_study_config(str(CONFIG), ["arms.odd=[routing.capacity=2.0]"])


def test_an_arm_trained_under_other_settings_is_not_reused(study, tmp_path):
    study_dir, _ = study
    module = load_study_module()
    cfg = module.load_study_config(str(CONFIG), [f"study_dir={study_dir}", *SMALL, "training.learning_rate=0.5"])
    with pytest.raises(ValueError, match=r"arm 'base' .* was trained with other settings \(sections \['training'\]"):
        module.train_arm(cfg, cfg.arms[0], str(tmp_path / "unused.yaml"))
