"""Recipe configuration: a commented YAML file plus ``key=value`` overrides, typed and checked.

Top-level keys are ``output_dir``, ``seed``, ``calibration_samples`` and the sections ``model``, ``routing``, ``data``,
``training`` (passed to transformers' TrainingArguments), ``lora``. An override addresses a
section with a dotted key (``routing.capacity=0.25``); values are parsed as YAML scalars.

Every key has a type and a range, checked before anything runs; a mistake is one ``UserError`` naming the dotted
key, the value and what is valid (``routing.capacity='abc': expected a number in (0, 1] ...``). Unknown keys name
the closest valid key. ``training`` keys are checked against TrainingArguments' own fields and types, and
``training_arguments`` builds it so that its errors name the key that causes them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import TrainingArguments

from dlo.config import RoutingConfig
from dlo.errors import UserError
from dlo.validation import (
    AnyOf,
    Boolean,
    Choice,
    ConfigValueError,
    ListOf,
    Mapping,
    Number,
    Optional,
    Text,
    check_fields,
)

DTYPES = ("float32", "bfloat16", "float16")
SAMPLES = Optional(Number(low=1, integer=True))
# TrainingArguments the recipe sets itself (``remove_unused_columns``: its examples hold only model inputs).
RECIPE_TRAINING_KEYS = {"output_dir": "use the top-level 'output_dir'", "seed": "use the top-level 'seed'",
                        "remove_unused_columns": "the recipe sets it to false"}
# The recipe's defaults for TrainingArguments (the rest keep transformers' defaults).
TRAINING_DEFAULTS = {"report_to": ["tensorboard"], "save_strategy": "steps", "ddp_find_unused_parameters": False}
# Ranges TrainingArguments' field types cannot express.
STEPS = Number(low=0, low_open=True)
TRAINING_RANGES = {
    "max_steps": Number(low=1, integer=True, also=(-1,)),
    "num_train_epochs": Number(low=0, low_open=True),
    "per_device_train_batch_size": Number(low=1, integer=True),
    "per_device_eval_batch_size": Number(low=1, integer=True),
    "gradient_accumulation_steps": Number(low=1, integer=True),
    "learning_rate": Number(low=0),
    "weight_decay": Number(low=0),
    "max_grad_norm": Number(low=0),
    "warmup_steps": Number(low=0),
    "logging_steps": STEPS,
    "save_steps": STEPS,
    "eval_steps": Optional(STEPS),
    "save_total_limit": Optional(Number(low=1, integer=True)),
    "dataloader_num_workers": Number(low=0, integer=True),
}
# Settings that may differ when a run resumes: how long it trains, when it logs, saves and evaluates, what it
# evaluates on, the final calibration, and where the output is. Everything else shapes the trained weights.
RESUME_SAFE_KEYS = (
    "output_dir", "calibration_samples", "data.eval_file", "data.max_eval_samples",
    "training.max_steps", "training.num_train_epochs", "training.logging_steps", "training.logging_strategy",
    "training.logging_first_step", "training.logging_dir", "training.save_steps", "training.save_strategy",
    "training.save_total_limit", "training.eval_steps", "training.eval_strategy", "training.per_device_eval_batch_size",
    "training.report_to", "training.disable_tqdm", "training.dataloader_num_workers", "training.run_name",
)


def reject_unknown_keys(section: str, given: dict, valid: list[str]):
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(valid)}"
            name = f"{section}.{key}" if section else key
            raise UserError(f"unknown config key {name!r}{hint}")


def section_from_dict(cls, section: str, data: dict | None):
    """``cls`` built from the section's mapping; unknown, missing and bad keys are named with the section."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigValueError(section, data, "expected a section (key: value lines)")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    reject_unknown_keys(section, data, [f.name for f in fields])
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise UserError(f"config is missing the required key '{section}.{f.name}'")
    try:
        return cls(**data)
    except ConfigValueError as err:
        raise err.within(section) from err


@dataclass
class ModelSection:
    path: str = field(metadata={"help": "Directory of a HF checkpoint (plain, expanded or routed), a hub id, or a "
                                        ".gguf file (converted once into a cached safetensors checkpoint).",
                                "check": Text()})
    gguf_file: str | None = field(
        default=None, metadata={"help": "A GGUF file inside model.path (a directory or a hub id), converted once "
                                        "into a cached safetensors checkpoint.", "check": Optional(Text())}
    )
    expansion: dict | None = field(
        default=None,
        metadata={"help": "Optional ExpansionPlan applied on load, e.g. {strategy: llama-pro, groups: 8}; "
                          "shared: true makes the duplicates repetitions reusing their source's weights.",
                  "check": Optional(Mapping())},
    )
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16.", "check": Choice(DTYPES)})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa | eager | flash_attention_2 (what block routing runs; others are "
                                  "refused when routers attach).", "check": Text()}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute layers in backward.", "check": Boolean()}
    )
    trainable_layers: str = field(
        default="all", metadata={"help": "all | new: 'new' trains only the layers expansion inserted (and routers), "
                                         "the base layers, embeddings and head frozen (LLaMA-Pro's recipe).",
                                 "check": Choice(("all", "new"))}
    )

    def __post_init__(self):
        check_fields(self)
        if self.expansion is not None and "strategy" not in self.expansion:
            raise ConfigValueError("expansion", self.expansion,
                                   "needs a 'strategy' (llama-pro, dus, idus or slices)")


@dataclass
class DataSection:
    train_file: str = field(metadata={"help": "JSONL/JSON/parquet file or a `datasets` directory.", "check": Text()})
    eval_file: str | None = field(
        default=None, metadata={"help": "Optional held-out file, same format.", "check": Optional(Text())}
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Truncate tokenised examples to this many tokens.", "check": Number(low=8, integer=True)},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N examples (null: all).", "check": SAMPLES}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N eval examples (null: all).", "check": SAMPLES}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Concatenate examples into full max_length blocks, position ids restarting per example "
                          "(no token attends across examples; routing budgets per block).", "check": Boolean()},
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class LoraSection:
    r: int = field(default=16, metadata={"help": "LoRA rank.", "check": Number(low=1, integer=True)})
    alpha: float = field(default=32, metadata={"help": "LoRA alpha.", "check": Number(low=0, low_open=True)})
    dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout.", "check": Number(low=0, high=1, high_open=True)}
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers that get adapters; routers always train fully.", "check": ListOf(Text())},
    )
    merge: bool = field(
        default=True, metadata={"help": "Merge adapters into the final saved model.", "check": Boolean()}
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class CompareSection:
    base: bool = field(default=True, metadata={"help": "Measure the model as loaded (before expansion and routers).",
                                                "check": Boolean()})
    dense: bool = field(
        default=True, metadata={"help": "Train the dense twin (the same run with routing: null) in "
                                        "<output_dir>/dense and measure it.", "check": Boolean()}
    )
    export_layers: int | None = field(
        default=None, metadata={"help": "Export the routed model statically pruned to this many layers (the least "
                                        "used routed layers dropped) into <output_dir>/exported and measure it.",
                                "check": Optional(Number(low=1, integer=True))}
    )
    text_file: str | None = field(
        default=None, metadata={"help": "Held-out plain text ({'text': ...} records) whose language-modelling loss "
                                        "every model is measured on too.", "check": Optional(Text())}
    )
    max_text_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N text records (null: all).", "check": SAMPLES}
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class RecipeConfig:
    output_dir: str = field(metadata={"check": Text()})
    model: ModelSection
    data: DataSection
    routing: RoutingConfig | None = None
    training: dict[str, Any] = field(default_factory=dict)
    lora: LoraSection | None = None
    compare: CompareSection | None = None
    seed: int = field(default=0, metadata={"check": Number(low=0, high=2**32 - 1, integer=True)})
    calibration_samples: int = field(default=64, metadata={"check": Number(low=0, integer=True)})

    def __post_init__(self):
        check_fields(self)
        if self.compare is not None and self.data.eval_file is None:
            raise UserError("compare: the models are compared on held-out data; set data.eval_file")
        if self.lora is not None and self.model.trainable_layers != "all":
            raise UserError(f"model.trainable_layers={self.model.trainable_layers} with lora: LoRA already decides "
                            "what trains (adapters and routers); use one or the other")

    @classmethod
    def from_dict(cls, raw: dict) -> RecipeConfig:
        reject_unknown_keys("", raw, [f.name for f in dataclasses.fields(cls)])
        for required in ("output_dir", "model", "data"):
            if required not in raw:
                raise UserError(f"config is missing the required key {required!r}")
        routing = raw.get("routing")
        lora = raw.get("lora")
        compare = raw.get("compare")
        return cls(
            output_dir=raw["output_dir"],
            model=section_from_dict(ModelSection, "model", raw["model"]),
            data=section_from_dict(DataSection, "data", raw["data"]),
            routing=None if routing is None else section_from_dict(RoutingConfig, "routing", routing),
            training=check_training(raw.get("training")),
            lora=None if lora is None else section_from_dict(LoraSection, "lora", lora),
            compare=None if compare is None else section_from_dict(CompareSection, "compare", compare),
            **{key: raw[key] for key in ("seed", "calibration_samples") if key in raw},
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["routing"] = None if self.routing is None else self.routing.to_dict()
        return out


# -- training: TrainingArguments -------------------------------------------------------------------------------


def _check_for_type(hint) -> Any:
    """The check of a TrainingArguments field type, or None where the type has no simple check."""
    if hint is bool:
        return Boolean()
    if hint is int:
        return Number(integer=True)
    if hint is float:
        return Number()
    if hint is str:
        return Text(allow_empty=True)
    if hint is dict or typing.get_origin(hint) is dict:
        return Mapping()
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return Choice(tuple(member.value for member in hint))
    if typing.get_origin(hint) is list:
        item = _check_for_type(typing.get_args(hint)[0])
        return None if item is None else ListOf(item)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        enums = [a for a in options if isinstance(a, type) and issubclass(a, enum.Enum)]
        checks = [_check_for_type(a) for a in (enums or options)]  # an enum's names are the strings it accepts
        if any(c is None for c in checks):
            return None
        check = checks[0] if len(checks) == 1 else AnyOf(tuple(checks))
        return Optional(check) if type(None) in typing.get_args(hint) else check
    return None


@functools.cache
def training_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


@functools.cache
def training_checks() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainingArguments)
    return {name: TRAINING_RANGES.get(name) or _check_for_type(hints[name]) for name in training_fields()}


def check_training(raw: dict | None) -> dict[str, Any]:
    """The ``training`` section, each key a TrainingArguments field with a value of its type."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigValueError("training", raw, "expected a section (key: value lines) of TrainingArguments")
    reject_unknown_keys("training", raw, list(training_fields()))
    checked = {}
    for key, value in raw.items():
        if key in RECIPE_TRAINING_KEYS:
            raise UserError(f"training.{key} is set by the recipe; {RECIPE_TRAINING_KEYS[key]}")
        check = training_checks()[key]
        checked[key] = value if check is None else check(f"training.{key}", value)
    return checked


def training_arguments(cfg: RecipeConfig) -> TrainingArguments:
    """``TrainingArguments`` of the recipe; an error it raises names the ``training`` key that causes it."""
    fixed = {"output_dir": cfg.output_dir, "seed": cfg.seed, "remove_unused_columns": False}
    try:
        return TrainingArguments(**fixed, **{**TRAINING_DEFAULTS, **cfg.training})
    except (ValueError, TypeError, ImportError) as err:
        for key, value in cfg.training.items():
            try:
                TrainingArguments(**fixed, **{**TRAINING_DEFAULTS, key: value})
            except (ValueError, TypeError, ImportError):
                raise UserError(f"training.{key}={value!r}: {err}") from err
        keys = ", ".join(f"training.{k}" for k in cfg.training)
        raise UserError(f"training: {err} (a combination of {keys or 'the recipe defaults'})") from err


def training_default(key: str):
    if key in TRAINING_DEFAULTS:
        return TRAINING_DEFAULTS[key]
    f = training_fields()[key]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# -- resuming -----------------------------------------------------------------------------------------------------


def _flatten(node, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_settings(recorded: dict, cfg: RecipeConfig) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, current value) of each setting that differs and may not change on resume.

    ``recorded`` is the run's saved ``to_dict()``; a TrainingArguments key missing on one side has its default.
    """
    current = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    before, after = _flatten(recorded), _flatten(current)
    for key in set(before) | set(after):
        if key.startswith("training.") and key.split(".", 2)[1] in training_fields():
            before.setdefault(key, training_default(key.split(".", 2)[1]))
            after.setdefault(key, training_default(key.split(".", 2)[1]))
    return [(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and key not in RESUME_SAFE_KEYS
            and key.split(".")[0] != "compare"]  # what is measured after training, not how it trains


# -- reading ------------------------------------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (dotted keys address sections) to a raw config dict."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value (e.g. routing.capacity=0.25)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise UserError(f"override {key!r}: {part!r} is not a section")
            node[part] = dict(child)
            node = node[part]
        try:
            node[parts[-1]] = parse_scalar(value)
        except yaml.YAMLError as err:
            raise UserError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from err
    return raw


def parse_scalar(text: str):
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


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def load_recipe_config(path: str, overrides: list[str] | None = None) -> RecipeConfig:
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise UserError(f"recipe config {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"recipe config {path!r} cannot be read ({err})") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({_yaml_problem(err)})") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe config must be a YAML mapping")
    return RecipeConfig.from_dict(apply_overrides(raw, overrides or []))
