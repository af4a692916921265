"""recipes/study.py (dlo.study) end to end on a tiny depth testbed: two seeds, three arms, two training steps each."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dlo.chat import assistant_token_mask
from dlo.expansion import ExpansionPlan, expand_model
from dlo.flops import model_flops
from dlo.tiny import depth_tasks

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "study_depth.yaml"
FREE_LUNCH = ("shared-untrained: {overrides: [routing=null, \"model.expansion={strategy: slices, "
              "ranges: '0-1,0-1,0-1', init: copy, shared: true}\"], train: false}, "
              "shared-lora: [routing=null, model.expansion.shared=true, \"lora={r: 4, alpha: 8}\"]")
ARMS = ("{base: [model.expansion=null, routing=null], dense: [routing=null], dlo-c050-cos: [routing.capacity=0.5], "
        + FREE_LUNCH + "}")
SMALL = [
    "seeds=[0, 1]",
    "workers=2",
    f"arms={ARMS}",
    "compare=[[dense, base], [dlo-c050-cos, shortgpt-2L]]",
    "testbed.train_records=256",
    "testbed.eval_records=48",
    "testbed.pretrain_steps=4",
    "training.max_steps=2",
    "training.save_steps=2",
    "training.logging_steps=1",
    "routing.anneal_steps=1",
    "data.max_eval_samples=8",
    "calibration_samples=8",
    "static.calibration_samples=8",
    "eval.max_samples=32",
    "eval.batch_size=16",
    "eval.accuracy_samples=4",
    "timing.batch_size=4",
    "timing.warmup=0",
    "timing.repeats=1",
    "timing.decode_tokens=2",
    "timing.seeds=1",
]
MODELS = ("base", "dense", "dlo-c050-cos", "shared-untrained", "shared-lora", "shortgpt-2L", "dlo-c050-cos/usage-2L")
RUNS = 5 * 2  # arms x seeds
NUMBERS = ("num_layers", "parameters", "eval_loss", "loss_easy", "loss_hard", "accuracy_easy", "accuracy_hard",
           "exact_match", "flops_per_token", "gain_share", "compute_share")
TIMES = ("prefill_s", "decode_s", "train_step_s")


def load_study_module():
    """The study package behind recipes/study.py."""
    return importlib.import_module("dlo.study")


def run_study(study_dir, *overrides):
    # One thread: on a shared 2-core machine, two busy torch pools slow each other down many times over.
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "recipes" / "study.py"), "--config", str(CONFIG), f"study_dir={study_dir}",
           *SMALL, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"study failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("study")
    return study_dir, run_study(study_dir)


def study_json(study_dir) -> dict:
    return json.loads((study_dir / "study.json").read_text())


def study_rows(study_dir):
    """The study module, the tiny study's config and its rows by (model, seed)."""
    module = load_study_module()
    cfg = module.load_study_config(str(CONFIG), [f"study_dir={study_dir}", *SMALL])
    return module, cfg, {(row["name"], row["seed"]): row for row in study_json(study_dir)["rows"]}


def test_testbed_records_label_every_answer_token():
    task = depth_tasks.TaskSpec()
    tokenizer = depth_tasks.build_tokenizer(task)
    for record in depth_tasks.generate(task, 20, seed=3):
        ids, mask = assistant_token_mask(tokenizer, record["messages"])
        assert sum(mask) == len(record["token_classes"]) == task.walk + 3
        assert tokenizer.unk_token_id not in ids
        words = record["answer"].split()
        prompt = record["messages"][0]["content"].split()
        pairs = {key: value for key, value, _ in zip(*[iter(prompt[:-2])] * 3)}  # "key value ," triples
        start, walk = words[1], words[2:]
        assert record["messages"][0]["content"].endswith(f"? {start}")
        assert walk == [pairs[letter] for letter in [start, *walk[:-1]]]  # each step looks up the previous letter
        assert len(set([start, *walk])) == task.walk + 1  # a walk shorter than the cycle never revisits
    assert depth_tasks.generate(task, 5, seed=3) == depth_tasks.generate(task, 5, seed=3)
    assert depth_tasks.generate(task, 5, seed=3) != depth_tasks.generate(task, 5, seed=4)
    with pytest.raises(ValueError, match="walk=10: must be in"):
        depth_tasks.TaskSpec(walk=10)


@pytest.mark.slow
def test_every_model_has_every_number(study):
    study_dir, proc = study
    result = study_json(study_dir)
    rows = {(row["name"], row["seed"]): row for row in result["rows"]}
    assert set(rows) == {(name, seed) for name in MODELS for seed in (0, 1)}
    for row in rows.values():
        timed = row["seed"] == 0
        for key in NUMBERS + (TIMES if timed else ()):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["name"], key, row[key])
        assert all(key not in row for key in TIMES) or timed
        assert 0.0 <= row["accuracy_hard"] <= 1.0 and row["eval_loss"] > 0
    # FLOPs follow depth and realised capacity; the static alternatives have the two layers asked for.
    for seed in (0, 1):
        base, dense, routed = (rows[(name, seed)] for name in ("base", "dense", "dlo-c050-cos"))
        assert base["flops_per_token"] < routed["flops_per_token"] < dense["flops_per_token"]
        assert (base["gain_share"], dense["gain_share"]) == (0.0, 1.0)
        assert rows[("shortgpt-2L", seed)]["num_layers"] == rows[("dlo-c050-cos/usage-2L", seed)]["num_layers"] == 2
        shares = routed["capacity_by_group"]
        assert set(shares) == {"1", "2"} and set(shares["1"]) == {"prompt", "easy", "hard"}
    summary = {entry["name"]: entry for entry in result["summary"]}
    assert set(summary) == set(MODELS)
    assert summary["base"]["eval_loss"]["n"] == 2 and math.isfinite(summary["base"]["eval_loss"]["ci95"])
    assert [(p["a"], p["b"]) for p in result["paired"]] == [("dense", "base"), ("dlo-c050-cos", "shortgpt-2L")]

    # The pre-registered criterion and question, evaluated from the rows.
    verdict = result["preregistered"]
    gains = [rows[("base", s)]["eval_loss"] - rows[("dense", s)]["eval_loss"] for s in (0, 1)]
    assert verdict["testbed"]["gain"]["mean"] == pytest.approx(sum(gains) / 2)
    assert [q["arm"] for q in verdict["question"]] == ["dlo-c050-cos"]
    assert set(verdict["question"][0]["versus"]) == {"shortgpt-2L", "dlo-c050-cos/usage-2L"}
    routed = rows[("dlo-c050-cos", 1)]
    assert routed["gain_per_compute"] == pytest.approx(routed["gain_share"] / routed["compute_share"])

    table = (study_dir / "study.md").read_text()
    assert "## Pre-registered criterion" in table and "Answer for dlo-c050-cos:" in table
    for name in MODELS:
        assert f"| {name} |" in table
    assert "dlo efficiency study" in proc.stdout and "| dlo-c050-cos |" in proc.stdout
    for plot in ("quality_flops", "quality_time", "gain", "capacity"):
        assert (study_dir / f"study_{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((study_dir / "tb").rglob("events.out.tfevents.*"))
    info = json.loads((study_dir / "testbed" / "build_info.json").read_text())
    assert info["settings"]["train_records"] == 256 and set(info["base_eval_class_loss"]) == set(
        depth_tasks.TOKEN_CLASSES)


@pytest.mark.slow
def test_static_models_load_with_plain_transformers(study):
    study_dir, _ = study
    static = [row for row in study_json(study_dir)["rows"] if row["kind"] in ("shortgpt", "usage-export")]
    assert {row["kind"] for row in static} == {"shortgpt", "usage-export"}
    for row in static:
        model = AutoModelForCausalLM.from_pretrained(row["model_dir"])
        assert type(model) is LlamaForCausalLM
        assert not hasattr(model.config, "dlo_routing")
        assert model.config.num_hidden_layers == 3 - len(row["dropped"]) == row["num_layers"] == 2
        assert row["kept"][0] == 0  # the base layer is never the one dropped at this depth
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 9, 12]])).logits
        assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_a_rerun_resumes_the_stopped_run_alone(study):
    study_dir, _ = study
    weights = sorted(study_dir.glob("arms/*/seed*/final/model.safetensors"))
    assert len(weights) == RUNS
    before = {path: path.stat().st_mtime_ns for path in weights}
    # A run stopped after its last checkpoint but before saving the final model resumes; the others are kept.
    stopped = study_dir / "arms" / "dense" / "seed1"
    for path in (stopped / "final").iterdir():
        path.unlink()
    (stopped / "final").rmdir()
    # --no-train reports the finished runs only: seed 1 has no dense reference now, so only seed 0 is left.
    proc = run_study(study_dir, "--no-train")
    assert ": training" not in proc.stdout and f"measuring the {RUNS - 1} finished runs" in proc.stdout, proc.stdout
    partial = study_json(study_dir)
    assert {row["seed"] for row in partial["rows"]} == {0} and len(partial["rows"]) == len(MODELS)
    assert not partial["preregistered"]["testbed"]["holds"] and partial["preregistered"]["question"] == []
    proc = run_study(study_dir)
    assert "seed 1: training (resuming from checkpoint-2)" in proc.stdout, proc.stdout
    assert proc.stdout.count(": training") == 1 and "building the testbed" not in proc.stdout, proc.stdout
    assert proc.stdout.count("cached") == RUNS - 1
    assert (stopped / "final" / "summary.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in weights if stopped not in p.parents} == \
        {p: t for p, t in before.items() if stopped not in p.parents}


@pytest.mark.slow
def test_free_lunch_arms_measure_the_expansion_as_built_and_its_memory(study):
    """An untrained arm is the expansion of the pretrained base, nothing trained; memory counts shared tensors once."""
    study_dir, _ = study
    _, cfg, rows = study_rows(study_dir)
    base_dir = study_dir / "testbed" / "base"
    pretrained = AutoModelForCausalLM.from_pretrained(base_dir)
    width = pretrained.config.hidden_size
    layer = sum(p.numel() for p in pretrained.model.layers[0].parameters())
    plan = ExpansionPlan.slices("0-1,0-1,0-1", init="copy", shared=True)
    built = expand_model(AutoModelForCausalLM.from_pretrained(base_dir), plan).eval()
    records = [json.loads(line) for line in (study_dir / "testbed" / "data" / "eval.jsonl").read_text().splitlines()]
    direct = direct_token_classes(built, AutoTokenizer.from_pretrained(base_dir), records[:cfg.eval.max_samples],
                                  cfg.eval.groups)
    base_params = sum(p.numel() for p in pretrained.parameters())
    for seed in (0, 1):
        base, dense, untrained, lora = (rows[(n, seed)] for n in ("base", "dense", "shared-untrained", "shared-lora"))
        assert untrained["train_steps"] == 0 and untrained["num_layers"] == 3
        assert untrained["eval_loss"] == pytest.approx(direct["eval_loss"], abs=1e-4)
        assert untrained["accuracy_hard"] == pytest.approx(direct["accuracy_hard"], abs=1e-6)
        # Two repetitions add two residual scales of `width` each; copies add two whole layers.
        assert untrained["parameters"] == base["parameters"] + 2 * 2 * width == base_params + 4 * width
        assert dense["parameters"] == base["parameters"] + 2 * layer
        assert untrained["checkpoint_mib"] < 0.8 * dense["checkpoint_mib"]
        assert untrained["checkpoint_mib"] == pytest.approx(base["checkpoint_mib"], rel=0.02)
        # LoRA freezes the base's weights, and the originals of the residual scales it trains as copies
        # (peft's modules_to_save); the saved model has its adapters merged into copies.
        assert lora["training_parameters"] - lora["trainable_parameters"] == base_params + 4 * width
        assert 4 * width < lora["trainable_parameters"] < layer
        assert lora["parameters"] == dense["parameters"] and lora["train_steps"] == 2
    table = (study_dir / "study.md").read_text()
    assert f"| shared-untrained | 0 | {base_params + 4 * width:,} | 0 |" in table


def direct_token_classes(model, tokenizer, records: list[dict], groups: dict[str, list[str]]) -> dict:
    """Per record, alone and unpadded: loss and accuracy per token group, and per routed layer the share of each
    group's positions that ran it (a position belongs to the group of the token it predicts; 'prompt': none)."""
    group_of = {name: group for group, names in groups.items() for name in names}
    nll, hits, ran, seen = ({} for _ in range(4))
    with torch.no_grad():
        for record in records:
            ids, mask = assistant_token_mask(tokenizer, record["messages"])
            out = model(torch.tensor([ids]), output_router_logits=True) if hasattr(model, "dlo_routing_config") \
                else model(torch.tensor([ids]))
            answer = [p for p, m in enumerate(mask) if m]
            predicts = dict.fromkeys(range(len(ids)), "prompt")
            for position, name in zip(answer, record["token_classes"], strict=True):
                group = group_of[name]
                logits = out.logits[0, position - 1]
                nll.setdefault(group, []).append(float(torch.log_softmax(logits, -1)[ids[position]].neg()))
                hits.setdefault(group, []).append(float(int(logits.argmax()) == ids[position]))
                predicts[position - 1] = group
            for layer, decision in enumerate(getattr(out, "routing", None) or ()):
                for position, group in predicts.items():
                    ran.setdefault((layer, group), []).append(float(decision.selected[0, position]))
    result = {f"loss_{g}": sum(v) / len(v) for g, v in nll.items()}
    result |= {f"accuracy_{g}": sum(v) / len(v) for g, v in hits.items()}
    result["eval_loss"] = sum(map(sum, nll.values())) / sum(map(len, nll.values()))
    result["ran"] = {key: sum(v) / len(v) for key, v in ran.items()}
    return result


@pytest.mark.slow
def test_token_class_figures_match_a_direct_computation(study):
    """The study's batched, padded token pass against each record run alone, class by class."""
    study_dir, _ = study
    module, cfg, rows = study_rows(study_dir)
    records = [json.loads(line) for line in (study_dir / "testbed" / "data" / "eval.jsonl").read_text().splitlines()]
    records = records[:cfg.eval.max_samples]
    for name in ("dlo-c050-cos", "shortgpt-2L"):
        row = rows[(name, 0)]
        model = module.load_trained(row["model_dir"], "sdpa")
        tokenizer = AutoTokenizer.from_pretrained(row["model_dir"])
        direct = direct_token_classes(model, tokenizer, records, cfg.eval.groups)
        for key in ("eval_loss", "loss_easy", "loss_hard", "accuracy_easy", "accuracy_hard"):
            assert row[key] == pytest.approx(direct[key], abs=1e-4), (name, key)
        routed = sorted(row["capacity_by_group"])
        assert len(routed) == (2 if name == "dlo-c050-cos" else 0)
        for layer, index in enumerate(routed):
            for group in ("prompt", "easy", "hard"):
                assert row["capacity_by_group"][index][group] == pytest.approx(direct["ran"][(layer, group)])


@pytest.mark.slow
def test_the_long_base_gets_the_training_flops_of_its_reference(study):
    """Steps that give the base the training FLOPs of DLO at c = 0.5, against the trained models' own configs."""
    study_dir, _ = study
    module = load_study_module()
    arms = ARMS[:-1] + ", base-long: {overrides: [model.expansion=null, routing=null], train_flops_of: dlo-c050-cos}}"
    cfg = module.load_study_config(str(CONFIG), [f"study_dir={study_dir}", *SMALL, f"arms={arms}",
                                                 "training.max_steps=300"])
    module.match_training_flops(cfg, 40.0)
    routed = AutoConfig.from_pretrained(study_dir / "arms" / "dlo-c050-cos" / "seed0" / "final")
    base = AutoConfig.from_pretrained(study_dir / "testbed" / "base")
    flops = model_flops(routed, 40.0, {1: 0.5, 2: 0.5}, "block")["total"], model_flops(base, 40.0, {}, "block")["total"]
    ratio = flops[0] / flops[1]
    assert 1.5 < ratio < 2.5 and cfg.arm("base-long").recipe["training"]["max_steps"] == round(300 * ratio)
    assert cfg.arm("base").recipe["training"]["max_steps"] == 300


def test_bad_config_is_refused_with_a_clear_error():
    study = load_study_module()
    with pytest.raises(ValueError, match=r"unknown config key 'evl'; did you mean 'eval'"):
        study.load_study_config(str(CONFIG), ["evl.max_samples=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'eval.acuracy_samples'; did you mean 'accuracy_samples'"):
        study.load_study_config(str(CONFIG), ["eval.acuracy_samples=3"])
    with pytest.raises(ValueError, match=r"static.num_layers=\[0\]: expected a list of integers >= 1"):
        study.load_study_config(str(CONFIG), ["static.num_layers=[0]"])
    with pytest.raises(ValueError, match=r"arm 'fast': override 'training.max_steps' is not allowed"):
        study.load_study_config(str(CONFIG), ["arms.fast=[training.max_steps=10]"])
    with pytest.raises(ValueError, match=r"arm 'odd': .*capacity=2.0: must be in \(0, 1\]"):
        study.load_study_config(str(CONFIG), ["arms.odd=[routing.capacity=2.0]"])
    with pytest.raises(ValueError, match=r"seeds=\[3\]: expected a list of at least two distinct integers"):
        study.load_study_config(str(CONFIG), ["seeds=[3]"])
    with pytest.raises(ValueError, match=r"arms.long.train_flops_of='dlo-c999' is not an arm"):
        study.load_study_config(str(CONFIG), ["arms.long={overrides: [routing=null], train_flops_of: dlo-c999}"])
    with pytest.raises(ValueError, match=r"arms.raw: train: false measures the model as built .* takes no routing"):
        study.load_study_config(str(CONFIG), ["arms.raw={overrides: [routing.capacity=0.5], train: false}"])
    with pytest.raises(ValueError, match=r"arms.raw.train='no': must be true or false"):
        study.load_study_config(str(CONFIG), ["arms.raw={overrides: [routing=null], train: 'no'}"])
    with pytest.raises(ValueError, match=r"compare entry \['dense', 'nothing'\]"):
        study.load_study_config(str(CONFIG), ["compare=[[dense, nothing]]"])


def test_arms_may_differ_in_which_layers_train():
    study = load_study_module()
    cfg = study.load_study_config(str(CONFIG), ["arms.frozen=[routing=null, model.trainable_layers=new]"])
    assert cfg.arm("frozen").recipe["model"]["trainable_layers"] == "new"
    assert cfg.arm("dense").recipe["model"].get("trainable_layers", "all") == "all"
    with pytest.raises(ValueError, match=r"arm 'half': override 'model.dtype' is not allowed"):
        study.load_study_config(str(CONFIG), ["arms.half=[model.dtype=bfloat16]"])


def test_intervals_over_seeds():
    study = load_study_module()
    result = study.interval([1.0, 2.0, 3.0])
    assert result["mean"] == 2.0 and result["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert study.t95(40) == pytest.approx(2.021, abs=2e-3)  # the expansion beyond the table
    assert study.t95(11) > study.t95(30) > 1.96  # falls towards the normal quantile


@pytest.mark.slow
def test_a_run_trained_under_other_settings_is_not_reused(study, tmp_path):
    study_dir, _ = study
    module = load_study_module()
    cfg = module.load_study_config(str(CONFIG), [f"study_dir={study_dir}", *SMALL, "training.learning_rate=0.5"])
    with pytest.raises(ValueError, match=r"arm 'base' .* was trained with other settings \(sections \['training'\]"):
        module.train_run(cfg, cfg.arms[0], 0, str(tmp_path / "unused.yaml"))
    # An untrained arm records the model section it was built from: another expansion is refused, not reused.
    arms = ARMS.replace("'0-1,0-1,0-1', init: copy", "'0-1,0-1', init: copy")
    assert arms != ARMS
    cfg = module.load_study_config(str(CONFIG), [f"study_dir={study_dir}", *SMALL, f"arms={arms}"])
    with pytest.raises(ValueError, match=r"arm 'shared-untrained' .* was built with other settings"):
        module.train_run(cfg, cfg.arm("shared-untrained"), 0, str(tmp_path / "unused.yaml"))


def test_the_full_config_names_every_arm_of_the_study():
    raw = yaml.safe_load(CONFIG.read_text())
    study = load_study_module()
    cfg = study.load_study_config(str(CONFIG), [])
    assert len(cfg.seeds) >= 3 and cfg.static.dense == "dense" and cfg.static.base == "base"
    kinds = {arm.name: arm.kind for arm in cfg.arms}
    assert {name for name, kind in kinds.items() if kind == "dlo"} == {
        f"dlo-c{c}-{label}" for c in ("075", "050", "025") for label in ("cos", "self", "cosd")} | {
        "shared-dlo-c050", "dlo-c050-s8", "dlo-c050-s8f"}
    sharpened = cfg.arm("dlo-c050-s8").recipe["routing"]  # the fix of docs/STUDY.md: dlo-c050-cos, sharpened
    assert {**cfg.arm("dlo-c050-cos").recipe["routing"], "reallocation_sharpness": 8} == sharpened
    for c in ("075", "050", "025"):  # the dense-similarity reference of each packed-estimator arm
        packed, reference = (cfg.arm(f"dlo-c{c}-{label}").recipe["routing"] for label in ("cos", "cosd"))
        assert packed.get("similarity_source", "packed") == "packed" and reference["similarity_source"] == "dense"
        assert {**packed, "similarity_source": "dense"} == reference
    assert {"llama-pro", "dus", "base-long"} <= set(raw["arms"])
    # "Is layer duplication a free lunch?": untrained and trained shared repetitions, against the copies and base.
    assert not cfg.arm("base-untrained").train and not cfg.arm("shared-untrained").train
    assert cfg.arm("shared-untrained").recipe["model"]["expansion"]["shared"] is True
    dense = cfg.arm("dense").recipe
    for name in ("shared", "shared-lora"):
        recipe = cfg.arm(name).recipe
        assert recipe["model"]["expansion"] == {**dense["model"]["expansion"], "shared": True}
        assert recipe["training"] == dense["training"] and recipe["routing"] is None
    assert cfg.arm("shared-lora").recipe["lora"]["r"] >= 1 and cfg.arm("shared").recipe.get("lora") is None
    routed_shared, routed = cfg.arm("shared-dlo-c050").recipe, cfg.arm("dlo-c050-cos").recipe
    assert routed_shared["routing"] == routed["routing"]
    assert routed_shared["model"]["expansion"] == {**routed["model"]["expansion"], "shared": True}


@pytest.mark.slow
def test_every_training_run_writes_its_curves_and_each_arm_a_figure(study):
    """What the trainer logged, per step (logging_steps=1, two steps), from each run's final/log_history.json."""
    study_dir, _ = study
    _, _, rows = study_rows(study_dir)
    diagnostics = study_dir / "diagnostics"
    for arm in ("base", "dense", "dlo-c050-cos", "shared-lora"):
        assert (diagnostics / f"{arm}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for seed in (0, 1):
            run = json.loads((diagnostics / arm / f"seed{seed}.json").read_text())
            steps = rows[(arm, seed)]["train_steps"]  # 2, or more for the run another test stopped and resumed
            assert (run["arm"], run["seed"], run["steps"]) == (arm, seed, list(range(1, steps + 1)))
            assert len(run["loss"]) == len(run["task_loss"]) == steps and math.isfinite(run["eval_loss"])
            assert ("layers" in run) == ("router_loss" in run) == (arm == "dlo-c050-cos")
    run = json.loads((diagnostics / "dlo-c050-cos" / "seed0.json").read_text())
    assert set(run["layers"]) == {"1", "2"} and len(run["router_loss"]) == 2
    for curves in run["layers"].values():
        assert set(curves) >= {"capacity", "target_capacity", "label_agreement", "score_std"}
        assert all(len(values) == 2 and all(0.0 <= v <= 1.0 for v in values) for values in curves.values())
    # The untrained arms have no training to show.
    assert not (diagnostics / "shared-untrained").exists() and not (diagnostics / "shared-untrained.png").exists()


def test_selected_arms_bring_their_references():
    study = load_study_module()
    cfg = study.load_study_config(str(CONFIG), [])
    study.select_arms(cfg, ["dlo-c050-cos"])
    assert [arm.name for arm in cfg.arms] == ["base", "dense", "dlo-c050-cos"]
    assert cfg.compare == [["dense", "base"], ["dlo-c050-cos", "shortgpt-2L"],
                           ["dlo-c050-cos", "dlo-c050-cos/usage-2L"]]
    cfg = study.load_study_config(str(CONFIG), [])
    study.select_arms(cfg, ["base-long"])  # trained for the FLOPs of dlo-c050-cos, which it needs
    assert [arm.name for arm in cfg.arms] == ["base", "dense", "dlo-c050-cos", "base-long"]
    with pytest.raises(ValueError, match=r"--arms: \['nope'\] are not arms of the config"):
        study.select_arms(cfg, ["nope"])
