"""Training runs: one recipes/sft.py process per arm and seed, resumed or reused when finished."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import yaml
from transformers.trainer_utils import get_last_checkpoint

from dlo.checkpoints import read_config, resolve_model_dir
from dlo.expansion_io import expand_checkpoint
from dlo.recipe_config import RecipeConfig
from dlo.study.arms import Arm, expansion_plan
from dlo.study.config import StudyConfig
from dlo.study.jsonfiles import read_json, write_json

# The study drives the checkout's own SFT recipe, one process per run (recipes/ is not installed with dlo).
SFT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes", "sft.py")


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
    write_json(os.path.join(final, "summary.json"), {"steps": 0, "train_seconds": 0.0, "model": arm.recipe["model"]})


def _check_built_model(arm: Arm, out: str):
    """An untrained model built under other settings must not enter this study's table silently."""
    recorded = read_json(os.path.join(out, "final", "summary.json")).get("model")
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
