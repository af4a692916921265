"""Arms: named sets of overrides of the shared recipe, and the training compute they are planned to spend."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import AutoConfig

from dlo.checkpoints import resolve_model_dir
from dlo.expansion import ExpansionPlan
from dlo.flops import model_flops
from dlo.recipe_config import RecipeConfig, apply_overrides, reject_unknown_keys

if TYPE_CHECKING:
    from dlo.study.config import StudyConfig


# Arms may differ only in depth, routing, adapters and which layers train (all, or LLaMA-Pro's new layers only),
# and through train_flops_of or train: false in steps: data, seed and optimiser stay shared.
ARM_OVERRIDABLE = ("model.expansion", "model.trainable_layers", "routing", "lora")
ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


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


def make_arm(name, spec, recipe: dict) -> Arm:
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
