"""The study config: the shared recipe, the arms, and the sections that say what is derived and measured."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from dlo.recipe_config import apply_overrides, reject_unknown_keys, section_from_dict
from dlo.study.arms import Arm, make_arm
from dlo.study.testbed import TestbedSection, with_testbed_paths

RECIPE_KEYS = ("calibration_samples", "model", "routing", "data", "training", "lora")
STUDY_KEYS = ("study_dir", "seeds", "workers", "testbed", "arms", "static", "eval", "timing", "compare")


PROMPT = "prompt"  # the group of positions that predict no answer token
ANSWER = "answer"  # the one group of every answer token when eval.groups is empty


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
    accuracy_samples: int = 128  # exact-match prompts: the first N records of data.eval_file (0: not measured)
    # Token-class groups reported apart; a record's `token_classes` names the class of each answer token. Empty:
    # every answer token is in the one group ANSWER, and records need no `token_classes` (real data).
    groups: dict[str, list[str]] = field(default_factory=lambda: {"easy": ["format", "copy"], "hard": ["lookup"]})
    text_file: str | None = None  # held-out plain text ({"text"} records): every model's text_loss (null: none)
    max_text_samples: int | None = None  # the first N records of text_file (null: all)
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-eval task names scored for every model
    lm_eval_include: str | None = None  # a directory of lm-eval task definitions (null: lm-eval's own tasks)
    lm_eval_limit: int | None = None  # documents per lm-eval task (null: all)

    def __post_init__(self):
        for name in ("max_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)}: must be >= 1")
        if self.accuracy_samples < 0:
            raise ValueError(f"eval.accuracy_samples={self.accuracy_samples}: must be >= 0 (0: no exact match)")
        for name in ("max_text_samples", "lm_eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)}: must be >= 1 or null (all)")
        if not isinstance(self.groups, dict) or {PROMPT, ANSWER} & set(self.groups) or not all(
                isinstance(v, list) and v for v in self.groups.values()):
            raise ValueError(f"eval.groups={self.groups!r}: expected a mapping of group name to a non-empty list of "
                             f"token classes, or {{}} for one group of every answer token (the names {PROMPT!r} "
                             f"and {ANSWER!r} are taken)")
        for name in ("text_file", "lm_eval_include"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"eval.{name}={getattr(self, name)!r}: expected a path or null")
        if not isinstance(self.lm_eval_tasks, list) or not all(isinstance(t, str) and t for t in self.lm_eval_tasks):
            raise ValueError(f"eval.lm_eval_tasks={self.lm_eval_tasks!r}: expected a list of lm-eval task names")

    @property
    def group_names(self) -> list[str]:
        """The answer groups reported apart, in order: the configured ones, or ANSWER alone."""
        return list(self.groups) or [ANSWER]


@dataclass
class TimingSection:
    batch_size: int = 16  # the first N eval records, one batch
    warmup: int = 1
    repeats: int = 5
    decode_tokens: int = 8  # decode time per token: generate(N) minus generate(1), over N - 1 steps
    seeds: int = 1  # the models of the first N seeds are timed (0: no timing)

    def __post_init__(self):
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0 or self.decode_tokens < 2 or self.seeds < 0:
            raise ValueError(f"timing={dataclasses.asdict(self)}: batch_size and repeats must be >= 1, seeds and "
                             "warmup >= 0, decode_tokens >= 2")


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
    recipe = with_testbed_paths({k: raw[k] for k in RECIPE_KEYS if k in raw}, os.path.join(study_dir, "testbed"))
    if not (recipe["data"] or {}).get("eval_file"):
        raise ValueError("data.eval_file is required: every model is measured on it")
    if not isinstance(raw["arms"], dict):
        raise ValueError("arms must map an arm name to its list of key=value overrides")
    arms = [make_arm(name, spec, recipe) for name, spec in raw["arms"].items()]
    cfg = StudyConfig(study_dir=study_dir, seeds=seeds, workers=workers, testbed=testbed, arms=arms, recipe=recipe,
                      static=section_from_dict(StaticSection, "static", raw.get("static")),
                      eval=section_from_dict(EvalSection, "eval", raw.get("eval")),
                      timing=section_from_dict(TimingSection, "timing", raw.get("timing")),
                      compare=raw.get("compare") or [])
    _check_references(cfg)
    return cfg


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


def select_arms(cfg: StudyConfig, names: list[str]):
    """Keep only the arms ``names`` and those they need: the static base and dense (every share is relative to
    them) and the arms whose training FLOPs they match; ``compare`` keeps the pairs left whole."""
    known = [arm.name for arm in cfg.arms]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--arms: {unknown} are not arms of the config; arms: {known}")
    keep = {*names, cfg.static.base, cfg.static.dense}
    keep |= {cfg.arm(n).train_flops_of for n in names if cfg.arm(n).train_flops_of is not None}
    cfg.arms = [arm for arm in cfg.arms if arm.name in keep]
    models = set(model_names(cfg))
    cfg.compare = [pair for pair in cfg.compare if set(pair) <= models]
