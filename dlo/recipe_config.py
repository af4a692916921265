"""Recipe configuration: a commented YAML file plus ``key=value`` overrides.

Top-level keys are ``output_dir``, ``seed``, ``calibration_samples`` and the sections ``model``, ``routing``, ``data``,
``training`` (passed to transformers' TrainingArguments), ``lora``. An override addresses a
section with a dotted key (``routing.capacity=0.25``); values are parsed as YAML scalars.
Unknown keys are errors that name the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import yaml

from dlo.config import RoutingConfig


def reject_unknown_keys(section: str, given: dict, valid: list[str]):
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(valid)}"
            name = f"{section}.{key}" if section else key
            raise ValueError(f"unknown config key {name!r}{hint}")


def section_from_dict(cls, section: str, data: dict | None):
    data = dict(data or {})
    reject_unknown_keys(section, data, [f.name for f in dataclasses.fields(cls)])
    return cls(**data)


@dataclass
class ModelSection:
    path: str = field(metadata={"help": "Directory of a HF checkpoint (plain, expanded or routed)."})
    expansion: dict | None = field(
        default=None,
        metadata={"help": "Optional ExpansionPlan applied on load, e.g. {strategy: llama-pro, groups: 8}."},
    )
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager (block routing needs one)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute layers in backward."})

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}: expected float32, bfloat16 or float16")


@dataclass
class DataSection:
    train_file: str = field(metadata={"help": "JSONL/JSON/parquet file or a `datasets` directory."})
    eval_file: str | None = field(default=None, metadata={"help": "Optional held-out file, same format."})
    max_length: int = field(default=512, metadata={"help": "Truncate tokenised examples to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval examples."})
    packing: bool = field(
        default=False, metadata={"help": "Concatenate examples into full max_length blocks (labels kept)."}
    )

    def __post_init__(self):
        if self.max_length < 8:
            raise ValueError(f"data.max_length={self.max_length}: must be >= 8")


@dataclass
class LoraSection:
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers that get adapters; routers always train fully."},
    )
    merge: bool = field(default=True, metadata={"help": "Merge adapters into the final saved model."})

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r={self.r}: must be >= 1")


@dataclass
class RecipeConfig:
    output_dir: str
    model: ModelSection
    data: DataSection
    routing: RoutingConfig | None = None
    training: dict[str, Any] = field(default_factory=dict)
    lora: LoraSection | None = None
    seed: int = 0
    calibration_samples: int = 64

    @classmethod
    def from_dict(cls, raw: dict) -> RecipeConfig:
        reject_unknown_keys("", raw, [f.name for f in dataclasses.fields(cls)])
        for required in ("output_dir", "model", "data"):
            if required not in raw:
                raise ValueError(f"config is missing the required key {required!r}")
        routing = raw.get("routing")
        lora = raw.get("lora")
        return cls(
            output_dir=str(raw["output_dir"]),
            model=section_from_dict(ModelSection, "model", raw["model"]),
            data=section_from_dict(DataSection, "data", raw["data"]),
            routing=None if routing is None else section_from_dict(RoutingConfig, "routing", routing),
            training=dict(raw.get("training") or {}),
            lora=None if lora is None else section_from_dict(LoraSection, "lora", lora),
            seed=int(raw.get("seed", 0)),
            calibration_samples=int(raw.get("calibration_samples", 64)),
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["routing"] = None if self.routing is None else self.routing.to_dict()
        return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (dotted keys address sections) to a raw config dict."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. routing.capacity=0.25)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {key!r}: {part!r} is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = _parse_scalar(value)
    return raw


def _parse_scalar(text: str):
    """YAML scalar, except that YAML 1.1 leaves '1e-4' a string: numbers without a dot are numbers too."""
    if text == "":
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_recipe_config(path: str, overrides: list[str] | None = None) -> RecipeConfig:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe config must be a YAML mapping")
    return RecipeConfig.from_dict(apply_overrides(raw, overrides or []))
