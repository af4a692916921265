"""Efficiency study: how much of what extra depth buys does dynamic depth keep, per unit of compute?

    python recipes/study.py --config recipes/configs/study_depth.yaml [key=value ...]

The study builds its testbed (``testbed:``, dlo/tiny/depth_tasks.py: data and a pretrained base model,
cached in ``<study_dir>/testbed``), then trains every arm once per seed as an ordinary recipes/sft.py run of
the shared recipe plus the arm's overrides (same data, steps and optimiser; an arm with ``train_flops_of``
gets the steps that give it the training compute of that arm). From the trained models it derives the
static alternatives (``static:``): block-influence pruning of the dense expanded model (layers with the
highest cos(input, output) on training text are dropped) and dlo's export of every routed model by measured
router usage, at the depths in ``static.num_layers``.

Every model is measured on the same eval records: loss, teacher-forced accuracy and loss of each token-class
group (``eval.groups``), greedy exact match, analytic forward FLOPs per token at the realised capacities,
and, for routed layers, the share of each group's positions that ran them. The models of the first
``timing.seeds`` seeds are timed in interleaved rounds: prefill, training step, decode. Each figure is
aggregated over seeds (mean and 95% t-interval); the gain share ((base - model) / (base - dense) in eval
loss, per seed) and the added-compute share ((model - base) / (dense - base) in FLOPs) give the headline.
Outputs: ``study.md``, ``study.json``, plots ``study_*.png`` and tensorboard (``<study_dir>/tb``).

Training runs ``workers`` at a time (one-process sft.py runs; 2 fill a 2-core CPU), then every run is measured.
The study resumes: a run with ``final/summary.json`` is not retrained, a run with checkpoints continues from
the last one, and measurements and timings are cached in ``arms/<arm>/seed<k>/results.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

import dlo
from dlo.batching import IGNORE_INDEX, pad_token_id
from dlo.batching import batches as make_batches
from dlo.checkpoints import read_config, resolve_model_dir, weight_files
from dlo.evaluation import encode, evaluate, load_batches, read_eval_records
from dlo.expansion import ExpansionPlan
from dlo.expansion_io import expand_checkpoint
from dlo.export import export_static, save_export
from dlo.flops import flop_unit, model_flops
from dlo.modeling import routed_layers
from dlo.recipe_config import RecipeConfig, apply_overrides, reject_unknown_keys, section_from_dict
from dlo.report import device_info, measure_timing, versions
from dlo.tiny import depth_tasks

SFT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft.py")
RECIPE_KEYS = ("calibration_samples", "model", "routing", "data", "training", "lora")
STUDY_KEYS = ("study_dir", "seeds", "workers", "testbed", "arms", "static", "eval", "timing", "compare")
# Arms may differ only in depth, routing and adapters (and, through train_flops_of or train: false, in steps):
# data, seed and optimiser stay shared.
ARM_OVERRIDABLE = ("model.expansion", "routing", "lora")
ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
TESTBED_PLACEHOLDER = "{testbed}"
# Generation may run this many tokens past the longest reference answer, so a model that does not
# stop after the answer is cut off with extra text (a miss), not at exactly the answer (a false hit).
ANSWER_MARGIN_TOKENS = 8
PROMPT = "prompt"  # the group of positions that predict no answer token
# Two-sided 95% quantiles of Student's t by degrees of freedom; beyond the table a Cornish-Fisher expansion.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
METRICS = ("eval_loss", "exact_match", "flops_per_token", "gain_share", "compute_share", "gain_per_compute",
           "prefill_s",
           "decode_s", "train_step_s")


@dataclass
class TestbedSection:
    seed: int = 0
    nodes: int = depth_tasks.TaskSpec.nodes
    walk: int = depth_tasks.TaskSpec.walk
    alphabet: int = depth_tasks.TaskSpec.alphabet
    train_records: int = 40000
    eval_records: int = 512
    pretrain_steps: int = depth_tasks.BaseSpec.pretrain_steps

    def __post_init__(self):
        for name in ("train_records", "eval_records", "pretrain_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"testbed.{name}={getattr(self, name)}: must be >= 1")

    def build_settings(self) -> tuple[dict, dict]:
        """The builder's keyword arguments and the settings its build_info records for them."""
        task = depth_tasks.TaskSpec(nodes=self.nodes, walk=self.walk, alphabet=self.alphabet)
        base = depth_tasks.BaseSpec(pretrain_steps=self.pretrain_steps)
        kwargs = {"seed": self.seed, "task": task, "base": base, "train_records": self.train_records,
                  "eval_records": self.eval_records}
        return kwargs, depth_tasks.settings(**kwargs)


@dataclass
class StaticSection:
    dense: str = "dense"  # the arm pruned by block influence; also the 100% of the gain
    base: str = "base"  # the 0% of the gain and of the added compute
    num_layers: list[int] = field(default_factory=lambda: [2])  # depths of the static alternatives
    calibration_samples: int = 64  # training records on which similarity and router usage are measured

    def __post_init__(self):
        if not self.num_layers or any(not isinstance(n, int) or n < 1 for n in self.num_layers):
            raise ValueError(f"static.num_layers={self.num_layers}: expected a list of integers >= 1")
        if self.calibration_samples < 1:
            raise ValueError(f"static.calibration_samples={self.calibration_samples}: must be >= 1")


@dataclass
class EvalSection:
    max_samples: int = 512  # eval-loss sequences: the first N records of data.eval_file
    batch_size: int = 64
    accuracy_samples: int = 128  # exact-match prompts: the first N records of data.eval_file
    # Token-class groups reported apart; a record's `token_classes` names the class of each answer token.
    groups: dict[str, list[str]] = field(default_factory=lambda: {"easy": ["format", "copy"], "hard": ["lookup"]})

    def __post_init__(self):
        for name in ("max_samples", "batch_size", "accuracy_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)}: must be >= 1")
        if not isinstance(self.groups, dict) or PROMPT in self.groups or not all(
                isinstance(v, list) and v for v in self.groups.values()):
            raise ValueError(f"eval.groups={self.groups!r}: expected a mapping of group name to a non-empty list of "
                             f"token classes (the name {PROMPT!r} is taken: positions that predict no answer token)")


@dataclass
class TimingSection:
    batch_size: int = 16  # the first N eval records, one batch
    warmup: int = 1
    repeats: int = 5
    decode_tokens: int = 8  # decode time per token: generate(N) minus generate(1), over N - 1 steps
    seeds: int = 1  # the models of the first N seeds are timed

    def __post_init__(self):
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0 or self.decode_tokens < 2 or self.seeds < 1:
            raise ValueError(f"timing={dataclasses.asdict(self)}: batch_size, repeats and seeds must be >= 1, "
                             "warmup >= 0, decode_tokens >= 2")


@dataclass
class Arm:
    name: str
    overrides: list[str]
    recipe: dict  # the sft.py config of this arm without seed and output_dir (raw, validated)
    train_flops_of: str | None = None  # train as many steps as give this arm the training FLOPs of that arm
    train: bool = True  # False: the model as built (expanded, not trained) is measured

    @property
    def kind(self) -> str:
        if self.recipe.get("routing") is not None:
            return "dlo"
        return "dense" if self.recipe["model"].get("expansion") else "base"


@dataclass
class StudyConfig:
    study_dir: str
    seeds: list[int]
    workers: int  # training runs at a time (each a one-process sft.py run)
    testbed: TestbedSection | None
    arms: list[Arm]
    static: StaticSection
    eval: EvalSection
    timing: TimingSection
    compare: list[list[str]]
    recipe: dict

    @property
    def testbed_dir(self) -> str:
        return os.path.join(self.study_dir, "testbed")

    def run_dir(self, arm: Arm, seed: int) -> str:
        return os.path.join(self.study_dir, "arms", arm.name, f"seed{seed}")

    def run_recipe(self, arm: Arm, seed: int) -> dict:
        return apply_overrides(arm.recipe, [f"seed={seed}", f"output_dir={self.run_dir(arm, seed)}"])

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def load_study_config(path: str, overrides: list[str]) -> StudyConfig:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a study config must be a YAML mapping")
    raw = apply_overrides(raw, overrides)
    reject_unknown_keys("", raw, [*RECIPE_KEYS, *STUDY_KEYS])
    for required in ("study_dir", "seeds", "arms", "model", "data"):
        if not raw.get(required):
            raise ValueError(f"{path}: the study config needs {required!r}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) < 2:
        raise ValueError(f"seeds={seeds!r}: expected a list of at least two distinct integers >= 0 (intervals "
                         "over seeds need two)")
    workers = raw.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r}: expected an integer >= 1 (training runs at a time)")
    study_dir = str(raw["study_dir"])
    testbed = None if raw.get("testbed") is None else section_from_dict(TestbedSection, "testbed", raw["testbed"])
    recipe = _with_testbed_paths({k: raw[k] for k in RECIPE_KEYS if k in raw}, os.path.join(study_dir, "testbed"))
    if not (recipe["data"] or {}).get("eval_file"):
        raise ValueError("data.eval_file is required: every model is measured on it")
    if not isinstance(raw["arms"], dict):
        raise ValueError("arms must map an arm name to its list of key=value overrides")
    arms = [_make_arm(name, spec, recipe) for name, spec in raw["arms"].items()]
    cfg = StudyConfig(study_dir=study_dir, seeds=seeds, workers=workers, testbed=testbed, arms=arms, recipe=recipe,
                      static=section_from_dict(StaticSection, "static", raw.get("static")),
                      eval=section_from_dict(EvalSection, "eval", raw.get("eval")),
                      timing=section_from_dict(TimingSection, "timing", raw.get("timing")),
                      compare=raw.get("compare") or [])
    _check_references(cfg)
    return cfg


def _with_testbed_paths(node, testbed_dir: str):
    """``node`` with ``{testbed}`` in its strings replaced by the testbed directory."""
    if isinstance(node, dict):
        return {k: _with_testbed_paths(v, testbed_dir) for k, v in node.items()}
    if isinstance(node, str):
        return node.replace(TESTBED_PLACEHOLDER, testbed_dir)
    return node


def _make_arm(name, spec, recipe: dict) -> Arm:
    if not ARM_NAME.match(str(name)):
        raise ValueError(f"arm name {name!r}: use letters, digits, '-' and '_' only (it names a directory)")
    train_flops_of, train = None, True
    if isinstance(spec, dict):
        reject_unknown_keys(f"arms.{name}", spec, ["overrides", "train_flops_of", "train"])
        overrides, train_flops_of, train = spec.get("overrides"), spec.get("train_flops_of"), spec.get("train", True)
        if not isinstance(train, bool):
            raise ValueError(f"arms.{name}.train={train!r}: must be true or false")
        if not train and train_flops_of is not None:
            raise ValueError(f"arms.{name}: train: false and train_flops_of exclude each other")
    else:
        overrides = spec
    overrides = overrides or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"arm {name!r}: overrides must be a list of 'key=value' strings, got {overrides!r}")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(ARM_OVERRIDABLE):
            raise ValueError(f"arm {name!r}: override {key!r} is not allowed; arms may only change "
                             f"{' or '.join(ARM_OVERRIDABLE)} (everything else is shared, so budgets stay equal)")
    arm_recipe = apply_overrides(recipe, overrides)
    try:
        RecipeConfig.from_dict({**arm_recipe, "output_dir": "unused"})
    except (ValueError, TypeError) as err:
        raise ValueError(f"arm {name!r}: {err}") from err
    if not train and (arm_recipe.get("routing") is not None or arm_recipe.get("lora") is not None):
        raise ValueError(f"arms.{name}: train: false measures the model as built (expanded or not); it takes no "
                         "routing or lora (untrained routers and adapters have nothing to measure)")
    return Arm(str(name), overrides, arm_recipe, train_flops_of, train)


def _check_references(cfg: StudyConfig):
    names = {arm.name: arm for arm in cfg.arms}
    for role, name in (("static.base", cfg.static.base), ("static.dense", cfg.static.dense)):
        if name not in names:
            raise ValueError(f"{role}={name!r} is not an arm; arms: {sorted(names)}")
    if names[cfg.static.dense].kind != "dense":
        raise ValueError(f"static.dense={cfg.static.dense!r} must be an expanded arm without routing")
    for arm in cfg.arms:
        if arm.train_flops_of is not None and arm.train_flops_of not in names:
            raise ValueError(f"arms.{arm.name}.train_flops_of={arm.train_flops_of!r} is not an arm")
    models = set(model_names(cfg))
    for pair in cfg.compare:
        if not (isinstance(pair, list) and len(pair) == 2 and set(pair) <= models):
            raise ValueError(f"compare entry {pair!r}: expected [model, model] among {sorted(models)}")


def model_names(cfg: StudyConfig) -> list[str]:
    """Every model the study measures: the arms, then the static alternatives derived from them."""
    names = [arm.name for arm in cfg.arms]
    names += [f"shortgpt-{n}L" for n in cfg.static.num_layers]
    names += [f"{arm.name}/usage-{n}L" for arm in cfg.arms if arm.kind == "dlo" for n in cfg.static.num_layers]
    return names


# -- testbed and planned compute --------------------------------------------------------------------------------


def ensure_testbed(cfg: StudyConfig):
    """Build the testbed unless ``<study_dir>/testbed`` holds one built with the same settings."""
    if cfg.testbed is None:
        return
    kwargs, expected = cfg.testbed.build_settings()
    info_path = os.path.join(cfg.testbed_dir, "build_info.json")
    info = _read_json(info_path)
    if info is not None and info["settings"] == expected:
        print(f"[study] testbed: {cfg.testbed_dir} (built before)", flush=True)
        return
    print(f"[study] building the testbed in {cfg.testbed_dir}", flush=True)
    shutil.rmtree(cfg.testbed_dir, ignore_errors=True)
    info = depth_tasks.build(cfg.testbed_dir, **kwargs)
    losses = ", ".join(f"{k} {v:.3f}" for k, v in info["base_eval_class_loss"].items())
    print(f"  base: {info['parameters']:,} parameters; eval loss per token class: {losses}", flush=True)


def expansion_plan(spec: dict, num_layers: int) -> ExpansionPlan:
    """The layer map a recipe's ``model.expansion`` (validated by RecipeConfig) makes of ``num_layers``."""
    spec = dict(spec)
    return ExpansionPlan.build(spec.pop("strategy"), num_layers, **spec)


def planned_flops(recipe: dict, seq_len: float) -> float:
    """Forward FLOPs per token of an arm's model at its target capacities, known before training."""
    cfg = RecipeConfig.from_dict({**recipe, "output_dir": "unused"})
    config = AutoConfig.from_pretrained(resolve_model_dir(cfg.model.path))
    layers = config.num_hidden_layers
    new = []
    if cfg.model.expansion:
        plan = expansion_plan(cfg.model.expansion, layers)
        layers, new = len(plan.layers), plan.new_indices
    routed = {}
    if cfg.routing is not None:
        chosen = cfg.routing.layers
        indices = new if chosen == "new" else list(range(layers)) if chosen == "all" else list(chosen)
        capacity = cfg.routing.capacity
        routed = dict(zip(indices, capacity if isinstance(capacity, list) else [capacity] * len(indices)))
    granularity = cfg.routing.granularity if cfg.routing is not None else "block"
    return model_flops(config, seq_len, routed, granularity, num_layers=layers)["total"]


def match_training_flops(cfg: StudyConfig, seq_len: float):
    """Give every arm with ``train_flops_of`` the steps that match that arm's training FLOPs.

    Training costs about three forward passes for every arm alike, so forward FLOPs per token at the target
    capacities decide the ratio (the dense similarity pass of cos labels is left out).
    """
    for arm in cfg.arms:
        if arm.train_flops_of is None:
            continue
        other = cfg.arm(arm.train_flops_of)
        ratio = planned_flops(other.recipe, seq_len) / planned_flops(arm.recipe, seq_len)
        steps = round(other.recipe["training"]["max_steps"] * ratio)
        arm.recipe = apply_overrides(arm.recipe, [f"training.max_steps={steps}"])
        print(f"[study] {arm.name}: {steps} steps, the training FLOPs of {other.name} ({ratio:.3f} x its "
              "FLOPs per token)", flush=True)


# -- training ---------------------------------------------------------------------------------------------------


def finished(cfg: StudyConfig, arm: Arm, seed: int) -> bool:
    return os.path.isfile(os.path.join(cfg.run_dir(arm, seed), "final", "summary.json"))


def train_run(cfg: StudyConfig, arm: Arm, seed: int, config_path: str) -> bool:
    """Train ``arm`` with ``seed`` unless its final model exists; True when it trained now."""
    out = cfg.run_dir(arm, seed)
    recipe = cfg.run_recipe(arm, seed)
    if not arm.train:
        if finished(cfg, arm, seed):
            _check_built_model(arm, out)
            return False
        print(f"  {arm.name} seed {seed}: building (not trained)", flush=True)
        build_untrained(arm, out)
        return True
    if finished(cfg, arm, seed):
        _check_recorded_config(arm, recipe, out)
        return False
    resume = os.path.isdir(out) and get_last_checkpoint(out) is not None
    if resume:
        _check_recorded_config(arm, recipe, out)
    elif os.path.isdir(out):
        # A run that died before its first checkpoint left nothing to resume from.
        shutil.rmtree(out)
    # The log lives outside the run directory: sft.py refuses to start in a non-empty one.
    log_path = os.path.join(cfg.study_dir, "logs", f"{arm.name}-seed{seed}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [sys.executable, SFT, "--config", config_path, *(["resume=true"] if resume else [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TENSORBOARD_LOGGING_DIR", None)  # else every run would log into the same directory
    resuming = f" (resuming from {os.path.basename(get_last_checkpoint(out))})" if resume else ""
    print(f"  {arm.name} seed {seed}: training{resuming}; log: {log_path}", flush=True)
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not os.path.isfile(os.path.join(out, "final", "summary.json")):
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"arm {arm.name!r} seed {seed}: training failed (exit {proc.returncode}); end of "
                           f"{log_path}:\n{tail}")
    return True


def build_untrained(arm: Arm, out: str):
    """``<out>/final``: the arm's model as built from its base (expanded, or the base itself), no step trained."""
    shutil.rmtree(out, ignore_errors=True)  # a build that died before summary.json left nothing worth keeping
    base = resolve_model_dir(arm.recipe["model"]["path"])
    final = os.path.join(out, "final")
    spec = arm.recipe["model"].get("expansion")
    if spec:
        expand_checkpoint(base, expansion_plan(spec, read_config(base)["num_hidden_layers"]), final)
    else:
        shutil.copytree(base, final)
    # The model section it was built from: a rerun with other settings must not reuse it (_check_built_model).
    _write_json(os.path.join(final, "summary.json"), {"steps": 0, "train_seconds": 0.0, "model": arm.recipe["model"]})


def _check_built_model(arm: Arm, out: str):
    """An untrained model built under other settings must not enter this study's table silently."""
    recorded = _read_json(os.path.join(out, "final", "summary.json")).get("model")
    if recorded != arm.recipe["model"]:
        raise ValueError(f"arm {arm.name!r} in {out} was built with other settings (model {recorded!r}, now "
                         f"{arm.recipe['model']!r}); use another study_dir or delete that arm's directory to "
                         "rebuild it")


def _check_recorded_config(arm: Arm, recipe: dict, out: str):
    """A run trained under other settings must not enter this study's table silently."""
    with open(os.path.join(out, "recipe_config.yaml")) as fh:
        recorded = yaml.safe_load(fh)
    expected = yaml.safe_load(yaml.safe_dump(RecipeConfig.from_dict(recipe).to_dict(), sort_keys=False))
    differ = sorted(k for k in set(expected) | set(recorded)
                    if k != "output_dir" and expected.get(k) != recorded.get(k))
    if differ:
        raise ValueError(f"arm {arm.name!r} in {out} was trained with other settings (sections {differ} differ); "
                         "use another study_dir or delete that arm's directory to retrain it")


def write_run_config(cfg: StudyConfig, arm: Arm, seed: int, source: str) -> str:
    path = os.path.join(cfg.study_dir, "configs", f"{arm.name}-seed{seed}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"# Arm {arm.name!r}, seed {seed}, of the study {source}, written by recipes/study.py.\n"
                 f"# Arm overrides: {arm.overrides or 'none'}\n#\n#   python recipes/sft.py --config {path}\n\n")
        yaml.safe_dump(cfg.run_recipe(arm, seed), fh, sort_keys=False)
    return path


# -- measurement ------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    batches: list[dict]  # eval-loss batches, each with "group" (B, T): the group index each position predicts
    groups: list[str]  # group names by index; index 0 is PROMPT
    records: list[dict]  # exact-match records
    max_new_tokens: int
    timing_batch: dict
    prompt_batch: dict  # left-padded generation prompts of the timing records
    calibration: list[dict]  # training-text batches for similarity and router usage

    @classmethod
    def load(cls, cfg: StudyConfig, tokenizer) -> EvalData:
        data = cfg.recipe["data"]
        path, max_length = data["eval_file"], data.get("max_length", 512)
        groups = [PROMPT, *cfg.eval.groups]
        group_of = {c: groups.index(g) for g, classes in cfg.eval.groups.items() for c in classes}
        records = read_eval_records(path, cfg.eval.max_samples)
        encoded = [dict(zip(("input_ids", "labels"), encode(r, tokenizer, max_length))) for r in records]
        pad = pad_token_id(tokenizer)
        batches = make_batches(encoded, cfg.eval.batch_size, pad)
        for n, batch in enumerate(batches):
            chunk = records[n * cfg.eval.batch_size:(n + 1) * cfg.eval.batch_size]
            batch["group"] = _position_groups(batch["labels"], chunk, group_of, path)
        accuracy = records[:cfg.eval.accuracy_samples]
        longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in accuracy)
        timed = records[:cfg.timing.batch_size]
        timing = make_batches(encoded[:cfg.timing.batch_size], cfg.timing.batch_size, pad)[0]
        calibration = load_batches(data["train_file"], tokenizer, cfg.eval.batch_size, max_length,
                                   cfg.static.calibration_samples)
        return cls(batches=batches, groups=groups, records=accuracy, max_new_tokens=longest + ANSWER_MARGIN_TOKENS,
                   timing_batch=timing, prompt_batch=_prompts(tokenizer, timed), calibration=calibration)


def _position_groups(labels: torch.Tensor, records: list[dict], group_of: dict[str, int], path: str) -> torch.Tensor:
    """(B, T) group index of the answer token each position predicts (0: none), -1 on the last position."""
    groups = torch.zeros_like(labels)
    groups[:, -1] = -1
    for row, record in enumerate(records):
        classes = record.get("token_classes")
        answer = (labels[row, 1:] != IGNORE_INDEX).nonzero().flatten().tolist()
        if classes is None or len(classes) != len(answer):
            raise ValueError(f"{path}: record {record.get('answer')!r} needs 'token_classes' with one class per "
                             f"answer token ({len(answer)} here, the end-of-turn marker included)")
        unknown = sorted(set(classes) - set(group_of))
        if unknown:
            raise ValueError(f"{path}: token classes {unknown} are in no eval.groups group")
        for position, name in zip(answer, classes):
            groups[row, position] = group_of[name]
    return groups


def _prompts(tokenizer, records: list[dict]) -> dict:
    texts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
             for r in records]
    return dict(tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left"))


def stop_token_ids(model, tokenizer) -> list[int]:
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops] if stops is not None else [])
    stops.add(tokenizer.eos_token_id)
    end = tokenizer.convert_tokens_to_ids("<|end|>")  # the tiny chat template's end of turn
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        stops.add(end)
    return sorted(s for s in stops if s is not None)


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 64) -> float:
    """Share of records whose greedy reply (prompt = messages minus the final assistant turn) is the answer."""
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model.eval()
    hits = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = _prompts(tokenizer, chunk)
        out = model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad, use_cache=True)
        for row, record in enumerate(chunk):
            reply = out[row, prompts["input_ids"].shape[1]:].tolist()
            reply = reply[:next((i for i, t in enumerate(reply) if t in stops), len(reply))]
            hits += tokenizer.decode(reply, skip_special_tokens=True).strip() == str(record["answer"]).strip()
    return hits / len(records)


@torch.no_grad()
def token_pass(model, data: EvalData) -> dict:
    """Loss and accuracy per group, per-token loss quantiles, realised capacity and, per routed layer, the
    share of each group's positions that ran it. A position belongs to the group of the token it predicts."""
    routed = routed_layers(model)
    n_groups = len(data.groups)
    nll_sum, hits, count = torch.zeros(n_groups), torch.zeros(n_groups), torch.zeros(n_groups)
    ran = {layer.layer_index: torch.zeros(n_groups) for layer in routed}
    positions = torch.zeros(n_groups)
    answer_nll, valid_tokens = [], 0
    model.eval()
    for batch in data.batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    **({"output_router_logits": True} if routed else {}))
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        correct = (logits.argmax(-1) == labels).float()
        group = batch["group"][:, :-1]
        answer = labels != IGNORE_INDEX
        for g in range(1, n_groups):
            mask = answer & (group == g)
            nll_sum[g] += nll[mask].sum()
            hits[g] += correct[mask].sum()
            count[g] += mask.sum()
        answer_nll.append(nll[answer])
        valid = batch["attention_mask"].bool()
        valid_tokens += int(valid.sum())
        position_group = batch["group"].clamp(min=0)  # the last position predicts nothing: a prompt position
        for g in range(n_groups):
            positions[g] += (valid & (position_group == g)).sum()
        for layer, record in zip(routed, out.routing if routed else ()):
            selected = record.selected & valid
            for g in range(n_groups):
                ran[layer.layer_index][g] += (selected & (position_group == g)).sum()
    answer_nll = torch.cat(answer_nll)
    quantiles = torch.quantile(answer_nll, torch.tensor([0.1, 0.5, 0.9])).tolist()
    result = {"eval_loss": float(answer_nll.mean()), "token_nll_p10_p50_p90": quantiles,
              "realised_capacity": {str(i): float(r.sum() / valid_tokens) for i, r in ran.items()},
              "capacity_by_group": {str(i): {name: float(r[g] / positions[g]) for g, name in enumerate(data.groups)}
                                    for i, r in ran.items()}}
    for g, name in enumerate(data.groups[1:], 1):
        result[f"loss_{name}"] = float(nll_sum[g] / count[g])
        result[f"accuracy_{name}"] = float(hits[g] / count[g])
    result["mean_seq_len"] = valid_tokens / sum(int(b["input_ids"].shape[0]) for b in data.batches)
    return result


def measure(model, tokenizer, data: EvalData) -> dict:
    measured = token_pass(model, data)
    routed = {int(i): c for i, c in measured["realised_capacity"].items()}
    granularity = model.dlo_routing_config.granularity if routed else "block"
    return {
        "num_layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "exact_match": exact_match(model, tokenizer, data.records, data.max_new_tokens),
        "flops_per_token": model_flops(model.config, measured["mean_seq_len"], routed, granularity)["total"],
        "target_capacity": {str(layer.layer_index): float(layer.target_capacity) for layer in routed_layers(model)},
        **measured,
    }


def load_trained(path: str, attn_implementation: str):
    config = read_config(path)
    dlo_model = "dlo_routing" in config or "dlo_repetitions" in config  # routers or shared repetitions
    loader = dlo.load_model if dlo_model else AutoModelForCausalLM.from_pretrained
    return loader(path, dtype=torch.float32, attn_implementation=attn_implementation).eval()


def _static_model(model, tokenizer, out: str, attn: str, **selection):
    """Export ``model`` with the layers ``selection`` chooses (dlo.export_static), save it, reload it plainly."""
    exported = export_static(model, **selection)
    info = exported.config.dlo_export
    path = save_export(exported, out, tokenizer, dict(info), force=True)
    # Measure what users get: the saved checkpoint, loaded by stock transformers.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval(), path, info


def checkpoint_mib(model_dir: str) -> float:
    """MiB of the weight files a saved model stores (a shared tensor is stored once)."""
    files = set(weight_files(model_dir).values())
    return sum(os.path.getsize(f) for f in files) / 2**20


def routing_label(routing) -> str:
    """The label kind, with the similarity estimator where a label uses one (``cos-global/dense``)."""
    if routing.label == "self" or routing.similarity_source == "packed":
        return routing.label
    return f"{routing.label}/{routing.similarity_source}"


def measure_run(cfg: StudyConfig, arm: Arm, seed: int, tokenizer, data: EvalData) -> list[dict]:
    """The rows of one trained run and of the static models derived from it."""
    out = cfg.run_dir(arm, seed)
    attn = cfg.recipe["model"].get("attn_implementation", "sdpa")
    model = load_trained(os.path.join(out, "final"), attn)
    with open(os.path.join(out, "final", "summary.json")) as fh:
        summary = json.load(fh)
    label = routing_label(model.dlo_routing_config) if arm.kind == "dlo" else None
    common = {"arm": arm.name, "seed": seed, "label": label, "train_seconds": summary["train_seconds"],
              "train_steps": summary["steps"]}
    measured = measure(model, tokenizer, data)
    # Memory: what training held (shared repetitions count once; adapters included, before any merge; unknown for
    # a run saved without the count) and what the saved model stores.
    held = {"total": measured["parameters"], "trainable": 0} if not arm.train else \
        summary.get("parameters", {"total": None, "trainable": None})
    rows = [{"name": arm.name, "kind": arm.kind, "model_dir": os.path.join(out, "final"), **common,
             "training_parameters": held["total"], "trainable_parameters": held["trainable"],
             "checkpoint_mib": checkpoint_mib(os.path.join(out, "final")), **measured}]
    derived = []
    if arm.name == cfg.static.dense:
        similarity = evaluate(model, data.calibration, progress=False).similarity
        derived = [(f"shortgpt-{n}L", "shortgpt", {"num_layers": n, "similarity": similarity})
                   for n in cfg.static.num_layers]
    elif arm.kind == "dlo":
        usage = evaluate(model, data.calibration, progress=False)
        derived = [(f"{arm.name}/usage-{n}L", "usage-export",
                    {"num_layers": n, "capacities": usage.capacity, "similarity": usage.similarity})
                   for n in cfg.static.num_layers]
    for name, kind, selection in derived:
        if selection["num_layers"] > model.config.num_hidden_layers:
            raise ValueError(f"static.num_layers has {selection['num_layers']}, more than the "
                             f"{model.config.num_hidden_layers} layers of {arm.name}")
        static, path, info = _static_model(model, tokenizer, os.path.join(out, "static", name.split("/")[-1]),
                                           attn, **selection)
        rows.append({"name": name, "kind": kind, "model_dir": path, "source": arm.name, "kept": info["kept"],
                     "dropped": info["dropped"], **common, "label": label, "checkpoint_mib": checkpoint_mib(path),
                     **measure(static, tokenizer, data)})
    return rows


# -- timing -----------------------------------------------------------------------------------------------------


def decode_seconds(model, prompts: dict, new_tokens: int) -> float:
    """Seconds per decoded token: generate(new_tokens) minus generate(1), over new_tokens - 1 steps."""
    def generate_seconds(n: int) -> float:
        start = time.perf_counter()
        model.generate(**prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                       pad_token_id=model.generation_config.pad_token_id)
        return time.perf_counter() - start

    with torch.no_grad():
        return (generate_seconds(new_tokens) - generate_seconds(1)) / (new_tokens - 1)


def _timed_round(model, batch: dict, prompts: dict, decode_tokens: int) -> tuple[float, float, float]:
    """One (prefill, train step, decode per token) timing, as deployed / as trained (similarity amortised)."""
    t = measure_timing(model, batch, warmup=0, repeats=1, progress=False)
    decode = decode_seconds(model, prompts, decode_tokens)
    if not routed_layers(model):
        return t["prefill"]["dense_s"], t["train_step"]["dense_s"], decode
    routing = model.dlo_routing_config
    train = t["train_step"]["routed_s"]
    if routing.label != "self":
        every = routing.similarity_every
        train = (t["train_step_similarity_s"] + (every - 1) * train) / every
    return t["prefill"]["routed_s"], train, decode


def time_rows(rows: list[dict], data: EvalData, timing: TimingSection, attn: str):
    """Median prefill, train-step and decode seconds of every row, in rounds that visit every model in turn.

    Interleaving spreads the load of other processes on this machine over all models alike, instead
    of penalising whichever model happened to be timed during a busy minute.
    """
    models = {row["name"] + f"@{row['seed']}": load_trained(row["model_dir"], attn) for row in rows}
    device = device_info(torch.device("cpu"))  # cached with the numbers: a later run may time on another machine
    samples = {key: ([], [], []) for key in models}
    for round_ in range(timing.warmup + timing.repeats):
        for key, model in models.items():
            measured = _timed_round(model, data.timing_batch, data.prompt_batch, timing.decode_tokens)
            if round_ >= timing.warmup:
                for values, value in zip(samples[key], measured):
                    values.append(value)
    for row in rows:
        prefill, train, decode = samples[row["name"] + f"@{row['seed']}"]
        row["prefill_s"], row["train_step_s"], row["decode_s"] = map(statistics.median, (prefill, train, decode))
        row["timed_on"] = device


# -- aggregation over seeds -------------------------------------------------------------------------------------


def t95(df: int) -> float:
    if df in T95:
        return T95[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values: list[float]) -> dict:
    """Mean, 95% t-interval half width and the values themselves (n >= 2 for a width)."""
    n = len(values)
    mean = statistics.fmean(values)
    half = t95(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": half, "n": n, "values": values}


def with_references(rows: list[dict], cfg: StudyConfig) -> list[dict]:
    """The rows of the seeds whose base and dense runs were measured (the shares are relative to them)."""
    names = {(r["name"], r["seed"]) for r in rows}
    return [r for r in rows if {(cfg.static.base, r["seed"]), (cfg.static.dense, r["seed"])} <= names]


def add_shares(rows: list[dict], cfg: StudyConfig):
    """Per row: the share of the dense expansion's eval-loss gain it keeps, and of the added FLOPs it spends,
    against the base and dense models of the same seed."""
    refs = {(r["name"], r["seed"]): r for r in rows if r["name"] in (cfg.static.base, cfg.static.dense)}
    for row in rows:
        base, dense = refs[(cfg.static.base, row["seed"])], refs[(cfg.static.dense, row["seed"])]
        row["gain_share"] = (base["eval_loss"] - row["eval_loss"]) / (base["eval_loss"] - dense["eval_loss"])
        row["compute_share"] = ((row["flops_per_token"] - base["flops_per_token"])
                                / (dense["flops_per_token"] - base["flops_per_token"]))
        # The headline: gain kept per unit of added compute (1 for dense; undefined without added compute).
        row["gain_per_compute"] = row["gain_share"] / row["compute_share"] if row["compute_share"] > 1e-9 else None


def summarise(rows: list[dict], cfg: StudyConfig, data: EvalData) -> list[dict]:
    """One row per model: every metric as an interval over seeds."""
    group_metrics = [f"{kind}_{g}" for g in data.groups[1:] for kind in ("loss", "accuracy")]
    summary = []
    for name in model_names(cfg):
        mine = [r for r in rows if r["name"] == name]
        if not mine:  # not trained (yet): --no-train leaves unfinished runs out
            continue
        first = mine[0]
        entry = {"name": name, "kind": first["kind"], "label": first["label"], "num_layers": first["num_layers"],
                 "parameters": first["parameters"], "training_parameters": first.get("training_parameters"),
                 "trainable_parameters": first.get("trainable_parameters"),
                 "checkpoint_mib": first["checkpoint_mib"], "train_steps": first["train_steps"],
                 "seeds": [r["seed"] for r in mine]}
        for key in (*METRICS, *group_metrics):
            values = [r[key] for r in mine if r.get(key) is not None]
            entry[key] = interval(values) if values else None
        entry["realised_capacity"] = {i: interval([r["realised_capacity"][i] for r in mine])
                                      for i in first["realised_capacity"]}
        entry["capacity_by_group"] = {i: {g: interval([r["capacity_by_group"][i][g] for r in mine])
                                          for g in data.groups} for i in first["capacity_by_group"]}
        entry["dropped"] = sorted({tuple(r["dropped"]) for r in mine}) if "dropped" in first else None
        summary.append(entry)
    return summary


def paired_differences(rows: list[dict], cfg: StudyConfig, data: EvalData) -> list[dict]:
    """For each ``compare`` pair [a, b]: a - b per seed, as intervals (eval loss, hard-group accuracy, FLOPs)."""
    keys = ["eval_loss", *[f"accuracy_{g}" for g in data.groups[1:]], "flops_per_token"]
    by = {(r["name"], r["seed"]): r for r in rows}
    out = []
    for a, b in cfg.compare:
        seeds = [s for s in cfg.seeds if (a, s) in by and (b, s) in by]
        if not seeds:
            continue
        out.append({"a": a, "b": b, **{k: interval([by[(a, s)][k] - by[(b, s)][k] for s in seeds]) for k in keys}})
    return out


# -- the pre-registered criterion and question (docs/STUDY.md) ------------------------------------------------

QUESTION_CAPACITY, KEEP_AT_LEAST, SPEND_AT_MOST = 0.5, 0.8, 0.6


def preregistered(rows: list[dict], cfg: StudyConfig, groups: list[str]) -> dict:
    """The testbed criterion and the question of docs/STUDY.md, evaluated on the measured rows.

    ``groups`` is [prompt, easy, ..., hard]: the first answer group is the easy one, the last the hard one.
    """
    by = {(r["name"], r["seed"]): r for r in rows}
    base, dense = cfg.static.base, cfg.static.dense
    seeds = sorted({r["seed"] for r in rows})  # those with base and dense (with_references)
    easy, hard = groups[1], groups[-1]

    def paired(a: str, b: str, key: str, over: list[int] = seeds) -> dict:
        return interval([by[(a, s)][key] - by[(b, s)][key] for s in over])

    base_loss = [by[(base, s)]["eval_loss"] for s in seeds]
    gain, hard_gain = paired(base, dense, "eval_loss"), paired(dense, base, f"accuracy_{hard}")
    gap = interval([by[(base, s)][f"loss_{hard}"] - by[(base, s)][f"loss_{easy}"] for s in seeds])
    testbed = {"gain": gain, "gain_relative": gain["mean"] / statistics.fmean(base_loss),
               "hard_accuracy_gain": hard_gain,
               "base_eval_loss_sd": statistics.stdev(base_loss) if len(base_loss) > 1 else math.nan,
               "hard_minus_easy_loss_of_base": gap}
    testbed["checks"] = {
        "gain interval excludes zero": gain["mean"] - gain["ci95"] > 0,
        "gain >= 5% of base eval loss or >= 10 points of hard accuracy":
            testbed["gain_relative"] >= 0.05 or hard_gain["mean"] >= 0.10,
        "gain >= 5 x seed sd of base eval loss": gain["mean"] >= 5 * testbed["base_eval_loss_sd"],
        "base hard-token loss >= easy-token loss + 1 nat": gap["mean"] >= 1.0}
    testbed["holds"] = all(testbed["checks"].values())
    question = []
    for arm in cfg.arms:
        if arm.kind != "dlo" or arm.recipe["routing"].get("capacity") != QUESTION_CAPACITY:
            continue
        mine = [s for s in seeds if (arm.name, s) in by]
        if len(mine) < 2:  # no interval without two seeds
            continue
        shares = {key: interval([by[(arm.name, s)][key] for s in mine]) for key in ("gain_share", "compute_share")}
        static = [f"shortgpt-{n}L" for n in cfg.static.num_layers]
        static += [f"{arm.name}/usage-{n}L" for n in cfg.static.num_layers]
        versus = {name: paired(arm.name, name, "eval_loss", mine) for name in static
                  if all((name, s) in by for s in mine)}
        checks = {f"keeps >= {KEEP_AT_LEAST:.0%} of the gain": shares["gain_share"]["mean"] >= KEEP_AT_LEAST,
                  f"spends <= {SPEND_AT_MOST:.0%} of the added compute":
                      shares["compute_share"]["mean"] <= SPEND_AT_MOST}
        checks |= {f"lower eval loss than {name} (interval below zero)": d["mean"] + d["ci95"] < 0
                   for name, d in versus.items()}
        question.append({"arm": arm.name, "seeds": mine, "label": by[(arm.name, mine[0])]["label"], **shares,
                         "versus": versus,
                         "checks": checks, "yes": all(checks.values())})
    return {"testbed": testbed, "question": question}


def preregistered_text(verdict: dict) -> str:
    t = verdict["testbed"]
    lines = ["## Pre-registered criterion (docs/STUDY.md)", "",
             f"Testbed: dense - base eval-loss gain {_pm(t['gain'])} ({t['gain_relative']:.1%} of the base's loss), "
             f"hard-token accuracy gain {_pm(t['hard_accuracy_gain'], 100, 1)} points, seed sd of the base's eval "
             f"loss {t['base_eval_loss_sd']:.3f}; base hard - easy token loss {_pm(t['hard_minus_easy_loss_of_base'])}"
             f" nats.", ""]
    lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in t["checks"].items()]
    lines += ["", f"The testbed criterion {'holds' if t['holds'] else 'does NOT hold'}.", ""]
    for q in verdict["question"]:
        lines += [f"{q['arm']} ({q['label']}, seeds {q['seeds']}): gain kept {_pm(q['gain_share'], 100, 1)}%, "
                  f"added compute {_pm(q['compute_share'], 100, 1)}%; eval loss minus "
                  + ", ".join(f"{name} {_pm(d)}" for name, d in q["versus"].items()) + ".", ""]
        lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in q["checks"].items()]
        lines += ["", f"Answer for {q['arm']}: {'YES' if q['yes'] else 'NO'}.", ""]
    return "\n".join(lines)


# -- outputs ----------------------------------------------------------------------------------------------------


def _pm(value: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "-"
    half = value["ci95"] * scale
    return f"{value['mean'] * scale:.{digits}f} ± {half:.{digits}f}" if math.isfinite(half) else \
        f"{value['mean'] * scale:.{digits}f}"


def _capacity_text(entry: dict) -> str:
    if entry["dropped"] is not None:
        return "dropped " + " or ".join(str(list(d)) for d in entry["dropped"])
    if not entry["realised_capacity"]:
        return "-"
    return "/".join(f"{c['mean']:.2f}" for c in entry["realised_capacity"].values())


def markdown_tables(summary: list[dict], pairs: list[dict], groups: list[str]) -> str:
    divisor, unit = flop_unit(max(e["flops_per_token"]["mean"] for e in summary))
    most = max(len(e["seeds"]) for e in summary)
    group_cols = " | ".join(f"{g} acc | {g} loss" for g in groups[1:])
    lines = [f"| model | kind | layers | realised capacity / dropped | eval loss | {group_cols} | exact match "
             f"| {unit}/token | gain kept | added compute | gain kept / added compute | prefill ms "
             "| decode ms/token | train step ms |",
             "|---" * (13 + 2 * len(groups[1:])) + "|"]
    for e in summary:
        kind = e["kind"] + (f" ({e['label']})" if e["label"] else "")
        group_values = " | ".join(f"{_pm(e['accuracy_' + g])} | {_pm(e['loss_' + g])}" for g in groups[1:])
        name = e["name"] + (f" (seeds {e['seeds']})" if len(e["seeds"]) < most else "")
        lines.append(f"| {name} | {kind} | {e['num_layers']} | {_capacity_text(e)} | {_pm(e['eval_loss'])} "
                     f"| {group_values} | {_pm(e['exact_match'])} | {_pm(e['flops_per_token'], 1 / divisor)} "
                     f"| {_pm(e['gain_share'], 100, 1)}% | {_pm(e['compute_share'], 100, 1)}% "
                     f"| {_pm(e['gain_per_compute'], 1, 2)} "
                     f"| {_pm(e['prefill_s'], 1e3, 2)} | {_pm(e['decode_s'], 1e3, 3)} "
                     f"| {_pm(e['train_step_s'], 1e3, 1)} |")
    capacity = ["| model | layer | " + " | ".join(f"ran: {g}" for g in groups) + " |",
                "|---|---|" + "---|" * len(groups)]
    for e in summary:
        for layer, shares in e["capacity_by_group"].items():
            capacity.append(f"| {e['name']} | {layer} | " + " | ".join(_pm(shares[g]) for g in groups) + " |")
    paired = [f"| a | b | Δ eval loss | {' | '.join(f'Δ {g} acc' for g in groups[1:])} | Δ {unit}/token |",
              "|---|---|---|" + "---|" * (len(groups) - 1) + "---|"]
    for p in pairs:
        accs = " | ".join(_pm(p[f"accuracy_{g}"]) for g in groups[1:])
        paired.append(f"| {p['a']} | {p['b']} | {_pm(p['eval_loss'])} | {accs} "
                      f"| {_pm(p['flops_per_token'], 1 / divisor)} |")
    memory = ["| model | training steps | parameters in training | trainable | parameters stored | checkpoint MiB |",
              "|---|---|---|---|---|---|"]
    for e in summary:
        derived = e["kind"] in ("shortgpt", "usage-export")  # a static model of a trained one: stored only
        held = ["-" if derived or e[k] is None else f"{e[k]:,}"
                for k in ("training_parameters", "trainable_parameters")]
        memory.append(f"| {e['name']} | {'-' if derived else e['train_steps']} | {held[0]} | {held[1]} "
                      f"| {e['parameters']:,} | {e['checkpoint_mib']:.2f} |")
    return "\n".join([*lines, "", "Share of each token group's positions that ran each routed layer (a position "
                      "belongs to the group of the token it predicts):", "", *capacity, "",
                      "Paired differences a - b over seeds:", "", *paired, "",
                      "Memory (shared repetitions count once; under LoRA, training holds the frozen weights and "
                      "the adapters, and the saved model has the adapters merged):", "", *memory])


STYLE = {"base": ("*", "#6b7280"), "dense": ("D", "#111827"), "shortgpt": ("v", "#9333ea"),
         "usage-export": ("s", "#d97706"), "cos-global": ("o", "#1f6fb2"), "cos-global/dense": ("o", "#60a5fa"),
         "cos": ("o", "#2a9d8f"), "cos/dense": ("o", "#5eead4"),
         "self": ("o", "#e76f51")}


def _style(entry: dict) -> tuple[str, str, bool]:
    """Marker, colour, hollow: DLO by label, exports hollow in their label's colour, static kinds their own."""
    if entry["kind"] == "dlo":
        return (*STYLE[entry["label"]], False)
    if entry["kind"] == "usage-export":
        return "s", STYLE[entry["label"]][1], True
    return (*STYLE[entry["kind"]], entry["kind"] == "shortgpt")


def _figure(cols: int, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * cols, 4.6 * rows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _scatter(ax, summary: list[dict], xkey: str, ykey: str, xscale: float = 1.0, yscale: float = 1.0,
             ylim: tuple[float, float] | None = None):
    """Means with 95% intervals; a mean outside ``ylim`` is drawn as an arrow at the edge, its value written."""
    for e in summary:
        if e[xkey] is None or e[ykey] is None:
            continue
        marker, color, hollow = _style(e)
        x, y = e[xkey]["mean"] * xscale, e[ykey]["mean"] * yscale
        if ylim is not None and not ylim[0] <= y <= ylim[1]:
            edge = min(max(y, ylim[0]), ylim[1])
            ax.plot(x, edge, marker="^" if y > ylim[1] else "v", ms=8, color=color, ls="none", zorder=3)
            ax.annotate(f"{e['name']} ({y:.3g}, off scale)", (x, edge), fontsize=7, xytext=(4, -10 if y < edge else 3),
                        textcoords="offset points")
            continue
        xerr, yerr = (abs(e[k]["ci95"] * s) if math.isfinite(e[k]["ci95"]) else 0.0
                      for k, s in ((xkey, xscale), (ykey, yscale)))
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, ms=7, color=color, mfc="none" if hollow else color,
                    capsize=3, lw=1, zorder=3)
        ax.annotate(e["name"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if e["kind"] in ("base", "dense") and e["name"] in ("base", "dense"):
            ax.axhline(y, color=color, lw=0.8, ls="--" if e["kind"] == "base" else ":")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)


def plot_study(summary: list[dict], groups: list[str], out_dir: str, timing_shape: list[int]) -> dict[str, object]:
    divisor, unit = flop_unit(max(e["flops_per_token"]["mean"] for e in summary))
    hard = groups[-1]
    figures = {}
    # Scales that keep the informative range readable: accuracies in [0, 1], eval loss up to 1.5 x the worst
    # unexpanded base (a model far worse than that is shown off scale), gain kept from -60% to 130%.
    worst_base = max((e["eval_loss"]["mean"] for e in summary if e["kind"] == "base"),
                     default=max(e["eval_loss"]["mean"] for e in summary))
    accuracy = (-0.05, 1.05)
    fig, axes = _figure(3)
    for ax, (ykey, label, ylim) in zip(axes[0], (("eval_loss", "eval loss (lower is better)", (-0.1, 1.5 * worst_base)),
                                                 (f"accuracy_{hard}", f"{hard}-token accuracy", accuracy),
                                                 ("exact_match", "exact-match accuracy", accuracy))):
        _scatter(ax, summary, "flops_per_token", ykey, 1 / divisor, ylim=ylim)
        ax.set(xlabel=f"forward {unit}s per token (analytic, realised capacities)", ylabel=label)
    fig.suptitle("Quality vs compute, mean and 95% interval over seeds (filled circles: DLO by label; hollow "
                 "squares: usage exports; triangles: block-influence pruning; dashed: base, dotted: dense)")
    figures["quality_flops"] = fig
    fig, axes = _figure(3)
    for ax, (xkey, scale, label) in zip(axes[0], (("prefill_s", 1e3, f"prefill ms, batch {timing_shape}"),
                                                  ("decode_s", 1e3, "decode ms per token (same batch)"),
                                                  ("train_step_s", 1e3, "training step ms (same batch)"))):
        _scatter(ax, summary, xkey, f"accuracy_{hard}", scale, ylim=accuracy)
        ax.set(xlabel=f"{label}, measured", ylabel=f"{hard}-token accuracy")
    fig.suptitle("Quality vs wall-clock (CPU), timed models only")
    figures["quality_time"] = fig
    fig, axes = _figure(1)
    ax = axes[0][0]
    _scatter(ax, summary, "compute_share", "gain_share", 100, 100, ylim=(-60, 130))
    ax.plot([0, 100], [0, 100], color="0.6", lw=0.8, ls="-.")
    ax.axhline(80, color="#16a34a", lw=0.8)
    ax.axvline(60, color="#16a34a", lw=0.8)
    ax.set(xlabel="share of the dense expansion's added FLOPs spent (%)",
           ylabel="share of the dense expansion's eval-loss gain kept (%)")
    ax.set_title("Gain kept vs added compute (dash-dot: proportional; green: 80% at 60%)", fontsize=9)
    figures["gain"] = fig
    routed = [e for e in summary if e["capacity_by_group"]]
    if routed:
        fig, axes = _figure(min(3, len(routed)), math.ceil(len(routed) / 3))
        for ax in axes.flat[len(routed):]:
            ax.set_visible(False)
        for ax, e in zip(axes.flat, routed):
            layers = list(e["capacity_by_group"])
            width = 0.8 / len(groups)
            for g, name in enumerate(groups):
                shares = [e["capacity_by_group"][i][name] for i in layers]
                ax.bar([k + g * width for k in range(len(layers))], [s["mean"] for s in shares], width,
                       yerr=[s["ci95"] if math.isfinite(s["ci95"]) else 0 for s in shares], capsize=2, label=name)
            ax.set_xticks([k + width * (len(groups) - 1) / 2 for k in range(len(layers))],
                          [f"layer {i}" for i in layers])
            ax.set(ylim=(0, 1.05), ylabel="share of positions that ran", title=e["name"])
            ax.legend(fontsize=7)
        fig.suptitle("Where each routed layer spends its capacity, by the group of the token a position predicts")
        figures["capacity"] = fig
    for key, figure in figures.items():
        figure.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle above the top row's titles
        figure.savefig(os.path.join(out_dir, f"study_{key}.png"), dpi=100)
    return figures


def write_tensorboard(summary: list[dict], text: str, figures: dict, logdir: str):
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(logdir, ignore_errors=True)  # derived from the cached results; rewrite rather than append
    for e in summary:
        with SummaryWriter(os.path.join(logdir, e["name"].replace("/", "_"))) as writer:
            for key in METRICS:
                if e[key] is not None:
                    writer.add_scalar(f"study/{key}", e[key]["mean"], 0)
    with SummaryWriter(logdir) as writer:
        writer.add_text("study/tables", text, 0)
        for key, figure in figures.items():
            writer.add_figure(f"study/{key}", figure, 0)


def _timing_conditions(rows: list[dict]) -> str:
    conditions = {(d["name"], d["threads"], d["load_average_1m"]) for d in (r["timed_on"] for r in rows)}
    return "; ".join(f"{name} ({threads} threads, load average {'?' if load is None else f'{load:.2f}'} at start)"
                     for name, threads, load in sorted(conditions, key=str))


def write_outputs(cfg: StudyConfig, rows: list[dict], data: EvalData, config_path: str) -> str:
    summary = summarise(rows, cfg, data)
    pairs = paired_differences(rows, cfg, data)
    verdict = preregistered(rows, cfg, data.groups)
    tables = markdown_tables(summary, pairs, data.groups) + "\n\n" + preregistered_text(verdict)
    shape = list(data.timing_batch["input_ids"].shape)
    figures = plot_study(summary, data.groups, cfg.study_dir, shape)
    timed = [r for r in rows if "timed_on" in r]
    sequences = sum(b["input_ids"].shape[0] for b in data.batches)
    setup = (f"Seeds {cfg.seeds}; every figure is the mean ± the 95% t-interval half width over seeds. Eval: "
             f"{sequences} records of {cfg.recipe['data']['eval_file']} (mean length {rows[0]['mean_seq_len']:.1f} "
             f"tokens); exact match: greedy generation on {len(data.records)} prompts. Gain kept: (base - model) / "
             f"(base - {cfg.static.dense}) in eval loss; added compute: (model - base) / ({cfg.static.dense} - base) "
             f"in FLOPs per token. Timing: median of {cfg.timing.repeats} rounds over every model of the first "
             f"{cfg.timing.seeds} seed(s) in turn, batch {shape}, on {_timing_conditions(timed)}.")
    with open(os.path.join(cfg.study_dir, "study.md"), "w") as fh:
        fh.write(f"# dlo efficiency study\n\nConfig: `{config_path}`. {setup}\n\n{tables}\n\n"
                 + "".join(f"![{key}](study_{key}.png)\n" for key in figures))
    study = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "versions": versions(), "config": config_path, "seeds": cfg.seeds,
             "eval": dataclasses.asdict(cfg.eval), "static": dataclasses.asdict(cfg.static),
             "timing": {**dataclasses.asdict(cfg.timing), "batch_shape": shape},
             "summary": summary, "paired": pairs, "preregistered": verdict, "rows": rows}
    with open(os.path.join(cfg.study_dir, "study.json"), "w") as fh:
        json.dump(study, fh, indent=2)
    write_tensorboard(summary, tables, figures, os.path.join(cfg.study_dir, "tb"))
    return tables


# -- driver -----------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _write_json(path: str, value: dict):
    with open(path, "w") as fh:
        json.dump(value, fh, indent=2)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="study YAML (see recipes/configs/study_depth.yaml)")
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: measure and report the runs that have finished (e.g. while another "
                             "process trains the rest); unfinished runs are left out of every table")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys into sections")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_study_config(args.config, args.overrides)
    hf_logging.disable_progress_bar()  # dozens of models load; their bars would bury the progress lines
    os.makedirs(cfg.study_dir, exist_ok=True)
    ensure_testbed(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg.recipe["model"]["path"]))
    data = EvalData.load(cfg, tokenizer)
    seq_len = float(data.timing_batch["attention_mask"].sum(1).float().mean())
    match_training_flops(cfg, seq_len)
    # What the cached measurements depend on besides the trained weights.
    settings = {"eval_file": cfg.recipe["data"]["eval_file"], "max_length": cfg.recipe["data"].get("max_length"),
                "eval": dataclasses.asdict(cfg.eval), "static": dataclasses.asdict(cfg.static)}
    timing_settings = dataclasses.asdict(cfg.timing)
    timed_seeds = cfg.seeds[:cfg.timing.seeds]
    runs = [(arm, seed) for arm in cfg.arms for seed in cfg.seeds]
    if args.no_train:
        runs = [(arm, seed) for arm, seed in runs if finished(cfg, arm, seed)]
        trained = [False] * len(runs)
        print(f"[study] --no-train: measuring the {len(runs)} finished runs", flush=True)
    else:
        configs = [write_run_config(cfg, arm, seed, args.config) for arm, seed in runs]
        print(f"[study] {len(runs)} runs of {len(cfg.arms)} arms, {cfg.workers} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(cfg.workers) as pool:  # each thread waits on one sft.py process
            trained = list(pool.map(lambda run, path: train_run(cfg, *run, path), runs, configs))
    rows, untimed, caches = [], [], {}
    for (arm, seed), fresh in zip(runs, trained):
        cache_path = os.path.join(cfg.run_dir(arm, seed), "results.json")
        cache = _read_json(cache_path)
        if fresh or cache is None or cache["settings"] != settings:
            print(f"  {arm.name} seed {seed}: measuring", flush=True)
            cache = {"settings": settings, "timing_settings": None,
                     "rows": measure_run(cfg, arm, seed, tokenizer, data)}
            _write_json(cache_path, cache)
        else:
            print(f"  {arm.name} seed {seed}: trained and measured before: cached", flush=True)
        caches[cache_path] = cache
        rows += cache["rows"]
        if seed in timed_seeds and cache["timing_settings"] != timing_settings:
            untimed += cache["rows"]
    if untimed:
        print(f"[study] timing {len(untimed)} models, {cfg.timing.warmup}+{cfg.timing.repeats} rounds", flush=True)
        time_rows(untimed, data, cfg.timing, cfg.recipe["model"].get("attn_implementation", "sdpa"))
        for path, cache in caches.items():
            if cache["rows"][0]["seed"] in timed_seeds:
                cache["timing_settings"] = timing_settings
                _write_json(path, cache)
    rows = with_references(rows, cfg)
    add_shares(rows, cfg)
    bad = [(r["name"], r["seed"], k) for r in rows for k in ("eval_loss", "exact_match", "flops_per_token")
           if not math.isfinite(r[k])]
    if bad:
        raise RuntimeError(f"non-finite measurements: {bad}")
    tables = write_outputs(cfg, rows, data, args.config)
    print(f"\n== dlo efficiency study: {cfg.study_dir}/study.md ==\n{tables}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
