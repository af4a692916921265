"""Efficiency study: quality vs compute of base, dense-expanded, DLO at several capacities and their exports.

    python recipes/study.py --config recipes/configs/study_tiny.yaml [key=value ...]

Every arm is an ordinary recipes/sft.py run of the shared recipe in the config (same data, steps,
seed) with the arm's own overrides, written as ``<study_dir>/configs/<arm>.yaml`` and trained in a
subprocess into ``<study_dir>/arms/<arm>``. Every routed arm is also exported statically
(``dlo.export_static``, ``export.min_capacity``). Every model is measured on the same eval data:
loss/perplexity, greedy exact-match accuracy, analytic FLOPs per token at the realised capacities,
wall-clock prefill and training step, parameters. Outputs: ``study.md``, ``study.json``,
``study.png`` and tensorboard (``<study_dir>/tb``).

The study resumes: an arm with ``final/summary.json`` is not retrained, an arm with checkpoints
continues from the last one, and measurements are cached in ``arms/<arm>/results.json``.
Overrides: ``study_dir=runs/x``, ``training.max_steps=300``, ``eval.accuracy_samples=50``, or a new
arm: ``"arms.dlo-c050-lam1=[routing.capacity=0.5, routing.router_loss_weight=1.0]"``.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

import dlo
from dlo.checkpoints import read_config, resolve_model_dir
from dlo.evaluation import evaluate, load_batches, read_eval_records
from dlo.export import export_static, save_export
from dlo.flops import flop_unit, model_flops
from dlo.modeling import routed_layers
from dlo.recipe_config import RecipeConfig, apply_overrides, reject_unknown_keys, section_from_dict
from dlo.report import device_info, measure_timing, versions

SFT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft.py")
RECIPE_KEYS = ("seed", "calibration_samples", "model", "routing", "data", "training", "lora")
STUDY_KEYS = ("study_dir", "arms", "eval", "timing", "export")
# Arms may differ only in depth and routing: data, steps, seed and optimiser stay shared (equal budget).
ARM_OVERRIDABLE = ("model.expansion", "routing")
ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Generation may run this many tokens past the longest reference answer, so a model that does not
# stop after the answer is cut off with extra text (a miss), not at exactly the answer (a false hit).
ANSWER_MARGIN_TOKENS = 8


@dataclass
class EvalSection:
    max_samples: int = 128  # eval-loss sequences: the first N records of data.eval_file
    batch_size: int = 32
    accuracy_samples: int = 100  # exact-match prompts: the first N records of data.eval_file

    def __post_init__(self):
        for name in ("max_samples", "batch_size", "accuracy_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)}: must be >= 1")


@dataclass
class TimingSection:
    batch_size: int = 16  # the first N eval sequences, one batch
    warmup: int = 1
    repeats: int = 5

    def __post_init__(self):
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"timing={dataclasses.asdict(self)}: batch_size and repeats must be >= 1, warmup >= 0")


@dataclass
class ExportSection:
    min_capacity: float = 0.3  # routed layers whose realised capacity is below this are dropped

    def __post_init__(self):
        if not 0.0 < self.min_capacity <= 1.0:
            raise ValueError(f"export.min_capacity={self.min_capacity}: must be in (0, 1]")


@dataclass
class Arm:
    name: str
    overrides: list[str]
    recipe: dict  # the sft.py config of this arm (raw, validated)

    @property
    def kind(self) -> str:
        if self.recipe.get("routing") is not None:
            return "dlo"
        return "dense" if self.recipe["model"].get("expansion") else "base"


@dataclass
class StudyConfig:
    study_dir: str
    arms: list[Arm]
    eval: EvalSection
    timing: TimingSection
    export: ExportSection
    recipe: dict

    def arm_dir(self, arm: Arm) -> str:
        return os.path.join(self.study_dir, "arms", arm.name)


def load_study_config(path: str, overrides: list[str]) -> StudyConfig:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a study config must be a YAML mapping")
    raw = apply_overrides(raw, overrides)
    reject_unknown_keys("", raw, [*RECIPE_KEYS, *STUDY_KEYS])
    for required in ("study_dir", "arms", "model", "data"):
        if not raw.get(required):
            raise ValueError(f"{path}: the study config needs {required!r}")
    recipe = {k: raw[k] for k in RECIPE_KEYS if k in raw}
    if not (recipe["data"] or {}).get("eval_file"):
        raise ValueError("data.eval_file is required: every arm is measured on it")
    study_dir = str(raw["study_dir"])
    if not isinstance(raw["arms"], dict):
        raise ValueError("arms must map an arm name to its list of key=value overrides")
    arms = [_make_arm(name, overrides, recipe, study_dir) for name, overrides in raw["arms"].items()]
    return StudyConfig(study_dir=study_dir, arms=arms, recipe=recipe,
                       eval=section_from_dict(EvalSection, "eval", raw.get("eval")),
                       timing=section_from_dict(TimingSection, "timing", raw.get("timing")),
                       export=section_from_dict(ExportSection, "export", raw.get("export")))


def _make_arm(name, overrides, recipe: dict, study_dir: str) -> Arm:
    if not ARM_NAME.match(str(name)):
        raise ValueError(f"arm name {name!r}: use letters, digits, '-' and '_' only (it names a directory)")
    overrides = overrides or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"arm {name!r}: overrides must be a list of 'key=value' strings, got {overrides!r}")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(ARM_OVERRIDABLE):
            raise ValueError(f"arm {name!r}: override {key!r} is not allowed; arms may only change "
                             f"{' or '.join(ARM_OVERRIDABLE)} (everything else is shared, so budgets stay equal)")
    arm_recipe = apply_overrides(recipe, [*overrides, f"output_dir={os.path.join(study_dir, 'arms', name)}"])
    try:
        RecipeConfig.from_dict(arm_recipe)
    except (ValueError, TypeError) as err:
        raise ValueError(f"arm {name!r}: {err}") from err
    return Arm(str(name), overrides, arm_recipe)


# -- training ---------------------------------------------------------------------------------------------------


def train_arm(cfg: StudyConfig, arm: Arm, config_path: str) -> bool:
    """Train ``arm`` unless its final model exists; True when it trained now."""
    out = cfg.arm_dir(arm)
    if os.path.isfile(os.path.join(out, "final", "summary.json")):
        _check_recorded_config(arm, out)
        return False
    resume = os.path.isdir(out) and get_last_checkpoint(out) is not None
    if resume:
        _check_recorded_config(arm, out)
    elif os.path.isdir(out):
        # A run that died before its first checkpoint left nothing to resume from.
        shutil.rmtree(out)
    # The log lives outside the arm directory: sft.py refuses to start in a non-empty one.
    log_path = os.path.join(cfg.study_dir, "logs", f"{arm.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [sys.executable, SFT, "--config", config_path, *(["resume=true"] if resume else [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TENSORBOARD_LOGGING_DIR", None)  # else every arm would log into the same directory
    print(f"  training{' (resuming from ' + os.path.basename(get_last_checkpoint(out)) + ')' if resume else ''}; "
          f"log: {log_path}", flush=True)
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not os.path.isfile(os.path.join(out, "final", "summary.json")):
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"arm {arm.name!r}: training failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    return True


def _check_recorded_config(arm: Arm, out: str):
    """An arm trained under other settings must not enter this study's table silently."""
    with open(os.path.join(out, "recipe_config.yaml")) as fh:
        recorded = yaml.safe_load(fh)
    expected = yaml.safe_load(yaml.safe_dump(RecipeConfig.from_dict(arm.recipe).to_dict(), sort_keys=False))
    differ = sorted(k for k in set(expected) | set(recorded)
                    if k != "output_dir" and expected.get(k) != recorded.get(k))
    if differ:
        raise ValueError(f"arm {arm.name!r} in {out} was trained with other settings (sections {differ} differ); "
                         "use another study_dir or delete that arm's directory to retrain it")


def write_arm_config(cfg: StudyConfig, arm: Arm, source: str) -> str:
    path = os.path.join(cfg.study_dir, "configs", f"{arm.name}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"# Arm {arm.name!r} of the study {source}, written by recipes/study.py.\n"
                 f"# Arm overrides: {arm.overrides or 'none'}\n#\n#   python recipes/sft.py --config {path}\n\n")
        yaml.safe_dump(arm.recipe, fh, sort_keys=False)
    return path


# -- measurement ------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    batches: list[dict]  # eval-loss batches
    records: list[dict]  # exact-match records
    max_new_tokens: int
    timing_batch: dict

    @classmethod
    def load(cls, cfg: StudyConfig, tokenizer) -> EvalData:
        data = cfg.recipe["data"]
        path, max_length = data["eval_file"], data.get("max_length", 512)
        records = read_eval_records(path, cfg.eval.accuracy_samples)
        for i, record in enumerate(records, 1):
            messages = record.get("messages") or []
            if "answer" not in record or not messages or messages[-1].get("role") != "assistant":
                raise ValueError(f"{path}: record {i} needs 'messages' ending with the assistant turn and an "
                                 "'answer' (the exact reply) for exact-match accuracy")
        longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in records)
        timing = load_batches(path, tokenizer, cfg.timing.batch_size, max_length, cfg.timing.batch_size)[0]
        return cls(batches=load_batches(path, tokenizer, cfg.eval.batch_size, max_length, cfg.eval.max_samples),
                   records=records, max_new_tokens=longest + ANSWER_MARGIN_TOKENS, timing_batch=timing)


def stop_token_ids(model, tokenizer) -> list[int]:
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops] if stops is not None else [])
    stops.add(tokenizer.eos_token_id)
    end = tokenizer.convert_tokens_to_ids("<|end|>")  # the tiny chat template's end of turn
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        stops.add(end)
    return sorted(s for s in stops if s is not None)


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int) -> float:
    """Share of records whose greedy reply (prompt = messages minus the final assistant turn) is the answer."""
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model.eval()
    hits = 0
    for record in records:
        prompt = tokenizer.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=pad, use_cache=True)
        reply = out[0, ids.shape[1]:].tolist()
        reply = reply[:next((i for i, t in enumerate(reply) if t in stops), len(reply))]
        hits += tokenizer.decode(reply, skip_special_tokens=True).strip() == str(record["answer"]).strip()
    return hits / len(records)


def measure_quality(model, tokenizer, data: EvalData) -> dict:
    result = evaluate(model, data.batches, progress=False)
    routed = routed_layers(model)
    granularity = model.dlo_routing_config.granularity if routed else "block"
    flops = model_flops(model.config, result.mean_seq_len, result.capacity, granularity)
    return {
        "num_layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval_loss": result.loss,
        "eval_perplexity": result.perplexity,
        "accuracy": exact_match(model, tokenizer, data.records, data.max_new_tokens),
        "target_capacity": {str(layer.layer_index): float(layer.target_capacity) for layer in routed},
        "realised_capacity": {str(i): c for i, c in result.capacity.items()},
        "flops_per_token": flops["total"],
        "mean_seq_len": result.mean_seq_len,
    }, result


def load_trained(path: str, attn_implementation: str):
    routed = "dlo_routing" in read_config(path)
    loader = dlo.load_model if routed else AutoModelForCausalLM.from_pretrained
    return loader(path, dtype=torch.float32, attn_implementation=attn_implementation).eval()


def measure_arm(cfg: StudyConfig, arm: Arm, tokenizer, data: EvalData) -> list[dict]:
    """The arm's row and, for a routed arm, its export's row."""
    out = cfg.arm_dir(arm)
    attn = cfg.recipe["model"].get("attn_implementation", "sdpa")
    model = load_trained(os.path.join(out, "final"), attn)
    with open(os.path.join(out, "final", "summary.json")) as fh:
        train_seconds = json.load(fh)["train_seconds"]
    quality, result = measure_quality(model, tokenizer, data)
    row = {"name": arm.name, "kind": arm.kind, "model_dir": os.path.join(out, "final"), "overrides": arm.overrides,
           "label": model.dlo_routing_config.label if arm.kind == "dlo" else None,
           "train_seconds": train_seconds, **quality}
    rows = [row]
    if arm.kind == "dlo":
        exported = export_static(model, min_capacity=cfg.export.min_capacity, capacities=result.capacity,
                                 similarity=result.similarity)
        info = exported.config.dlo_export
        export_dir = save_export(exported, os.path.join(out, "export"), tokenizer, dict(info), force=True)
        # Measure what users get: the saved checkpoint, loaded by stock transformers.
        reloaded = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32,
                                                        attn_implementation=attn).eval()
        note = f"dropped layers {info['dropped']}" if info["dropped"] else "nothing dropped: the dense-forced model"
        rows.append({"name": f"{arm.name}/export", "kind": "export", "model_dir": export_dir, "source": arm.name,
                     "label": row["label"], "train_seconds": train_seconds, "kept": info["kept"],
                     "dropped": info["dropped"], "note": note,
                     **measure_quality(reloaded, tokenizer, data)[0]})
    return rows


def _timed_step(model, batch) -> tuple[float, float]:
    """One (prefill, train step) timing as deployed / as trained (similarity refresh amortised)."""
    t = measure_timing(model, batch, warmup=0, repeats=1, progress=False)
    if not routed_layers(model):
        return t["prefill"]["dense_s"], t["train_step"]["dense_s"]
    routing = model.dlo_routing_config
    train = t["train_step"]["routed_s"]
    if routing.label != "self":
        every = routing.similarity_every
        train = (t["train_step_similarity_s"] + (every - 1) * train) / every
    return t["prefill"]["routed_s"], train


def time_rows(rows: list[dict], batch: dict, timing: TimingSection, attn: str):
    """Median prefill and train-step seconds of every row, in rounds that visit every model in turn.

    Interleaving spreads the load of other processes on this machine over all models alike, instead
    of penalising whichever arm happened to be timed during a busy minute.
    """
    models = {row["name"]: load_trained(row["model_dir"], attn) for row in rows}
    device = device_info(torch.device("cpu"))  # cached with the numbers: a later run may time on another machine
    samples = {name: ([], []) for name in models}
    for round_ in range(timing.warmup + timing.repeats):
        for name, model in models.items():
            prefill, train = _timed_step(model, batch)
            if round_ >= timing.warmup:
                samples[name][0].append(prefill)
                samples[name][1].append(train)
    for row in rows:
        prefill, train = samples[row["name"]]
        row["prefill_s"], row["train_step_s"] = statistics.median(prefill), statistics.median(train)
        row["timed_on"] = device


# -- outputs ----------------------------------------------------------------------------------------------------


def _fmt_capacity(row: dict) -> str:
    if row["kind"] == "export":
        return row["note"]
    if not row["realised_capacity"]:
        return "-"
    target = "/".join(f"{c:.2f}" for c in row["target_capacity"].values())
    realised = "/".join(f"{c:.2f}" for c in row["realised_capacity"].values())
    return f"{target} → {realised}"


def markdown_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["kind"] == "base"), None)
    divisor, unit = flop_unit(max(r["flops_per_token"] for r in rows))
    lines = ["| model | kind | layers | params | capacity per routed layer: target → realised | eval loss | ppl "
             f"| accuracy | {unit}s/token | vs base | prefill ms | train step ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['flops_per_token'] / base['flops_per_token']:.3f}" if base else "-"
        lines.append(f"| {r['name']} | {r['kind']}{' (' + r['label'] + ')' if r['label'] else ''} "
                     f"| {r['num_layers']} | {r['parameters']:,} | {_fmt_capacity(r)} | {r['eval_loss']:.4f} "
                     f"| {r['eval_perplexity']:.2f} | {r['accuracy']:.3f} | {r['flops_per_token'] / divisor:.3f} "
                     f"| {ratio} | {r['prefill_s'] * 1e3:.1f} | {r['train_step_s'] * 1e3:.1f} |")
    return "\n".join(lines)


STYLE = {"base": ("*", "#6b7280"), "dense": ("D", "#111827"), "cos-global": ("o", "#1f6fb2"),
         "cos": ("o", "#2a9d8f"), "self": ("o", "#e76f51")}


def plot_study(rows: list[dict], path: str, timing_shape: list[int]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    divisor, unit = flop_unit(max(r["flops_per_token"] for r in rows))
    xs = [("flops_per_token", 1 / divisor, f"forward {unit}s per token (analytic, realised capacities)"),
          ("prefill_s", 1e3, f"prefill ms, batch {timing_shape} (measured)"),
          ("train_step_s", 1e3, f"training step ms, batch {timing_shape} (measured)")]
    ys = [("eval_loss", "eval loss (lower is better)"), ("accuracy", "exact-match accuracy (higher is better)")]
    fig = Figure(figsize=(17, 9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ys), len(xs))
    for (ykey, ylabel), ax_row in zip(ys, axes):
        for (xkey, scale, xlabel), ax in zip(xs, ax_row):
            for r in rows:
                marker, color = STYLE[r["kind"] if r["kind"] in ("base", "dense") else r["label"]]
                hollow = r["kind"] == "export"
                ax.scatter(r[xkey] * scale, r[ykey], marker="s" if hollow else marker, s=60, zorder=3,
                           facecolors="none" if hollow else color, edgecolors=color)
                ax.annotate(r["name"], (r[xkey] * scale, r[ykey]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
                if r["kind"] in ("base", "dense"):  # reference quality levels
                    ax.axhline(r[ykey], color=color, lw=0.8, ls="--" if r["kind"] == "base" else ":")
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.grid(alpha=0.3)
    fig.suptitle("Quality vs compute (filled circles: DLO by label type, hollow squares: static exports; "
                 "dashed: base, dotted: dense expanded)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def write_tensorboard(rows: list[dict], table: str, fig, logdir: str):
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(logdir, ignore_errors=True)  # derived from results.json; rewrite rather than append duplicates
    for r in rows:
        with SummaryWriter(os.path.join(logdir, r["name"])) as writer:
            for key in ("eval_loss", "eval_perplexity", "accuracy", "flops_per_token", "prefill_s", "train_step_s",
                        "parameters"):
                writer.add_scalar(f"study/{key}", r[key], 0)
    with SummaryWriter(logdir) as writer:
        writer.add_text("study/table", table, 0)
        writer.add_figure("study/quality_vs_compute", fig, 0)


def _timing_conditions(rows: list[dict]) -> str:
    conditions = {(d["name"], d["threads"], d["load_average_1m"]) for d in (r["timed_on"] for r in rows)}
    return "; ".join(f"{name} ({threads} threads, load average {'?' if load is None else f'{load:.2f}'} at start)"
                     for name, threads, load in sorted(conditions, key=str))


def write_outputs(cfg: StudyConfig, rows: list[dict], data: EvalData, config_path: str) -> str:
    table = markdown_table(rows)
    shape = list(data.timing_batch["input_ids"].shape)
    fig = plot_study(rows, os.path.join(cfg.study_dir, "study.png"), shape)
    sequences = sum(b["input_ids"].shape[0] for b in data.batches)
    setup = (f"Eval: {sequences} sequences of {cfg.recipe['data']['eval_file']} (mean length "
             f"{rows[0]['mean_seq_len']:.1f} tokens); accuracy: greedy exact match on {len(data.records)} prompts. "
             f"Timing: median of {cfg.timing.repeats} rounds over every model in turn, batch {shape}, on "
             f"{_timing_conditions(rows)}.")
    with open(os.path.join(cfg.study_dir, "study.md"), "w") as fh:
        fh.write(f"# dlo efficiency study\n\nConfig: `{config_path}`. {setup}\n\n{table}\n\n![quality vs compute]"
                 "(study.png)\n")
    study = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "versions": versions(), "config": config_path, "eval": dataclasses.asdict(cfg.eval),
             "timing": {**dataclasses.asdict(cfg.timing), "batch_shape": shape},
             "export": dataclasses.asdict(cfg.export), "rows": rows}
    with open(os.path.join(cfg.study_dir, "study.json"), "w") as fh:
        json.dump(study, fh, indent=2)
    write_tensorboard(rows, table, fig, os.path.join(cfg.study_dir, "tb"))
    return table


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
    parser.add_argument("--config", required=True, help="study YAML (see recipes/configs/study_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys into sections")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_study_config(args.config, args.overrides)
    hf_logging.disable_progress_bar()  # a dozen models load; their bars would bury the progress lines
    os.makedirs(cfg.study_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg.recipe["model"]["path"]))
    data = EvalData.load(cfg, tokenizer)
    # What the cached measurements depend on besides the trained weights.
    settings = {"eval_file": cfg.recipe["data"]["eval_file"], "max_length": cfg.recipe["data"].get("max_length"),
                "eval": dataclasses.asdict(cfg.eval), "export": dataclasses.asdict(cfg.export)}
    timing_settings = dataclasses.asdict(cfg.timing)
    rows, untimed, caches = [], [], {}
    for n, arm in enumerate(cfg.arms, 1):
        print(f"[study {n}/{len(cfg.arms)}] {arm.name} ({arm.kind}; overrides: {arm.overrides or 'none'})", flush=True)
        trained = train_arm(cfg, arm, write_arm_config(cfg, arm, args.config))
        cache_path = os.path.join(cfg.arm_dir(arm), "results.json")
        cache = _read_json(cache_path)
        if trained or cache is None or cache["settings"] != settings:
            print("  measuring loss, accuracy, FLOPs" + (" and exporting" if arm.kind == "dlo" else ""), flush=True)
            cache = {"settings": settings, "timing_settings": None, "rows": measure_arm(cfg, arm, tokenizer, data)}
            _write_json(cache_path, cache)
        else:
            print("  trained and measured before: cached", flush=True)
        caches[cache_path] = cache
        rows += cache["rows"]
        if cache["timing_settings"] != timing_settings:
            untimed += cache["rows"]
    if untimed:
        print(f"[study] timing {len(untimed)} models, {cfg.timing.warmup}+{cfg.timing.repeats} rounds", flush=True)
        time_rows(untimed, data.timing_batch, cfg.timing, cfg.recipe["model"].get("attn_implementation", "sdpa"))
        for path, cache in caches.items():
            cache["timing_settings"] = timing_settings
            _write_json(path, cache)
    bad = [(r["name"], k) for r in rows for k in ("eval_loss", "accuracy", "flops_per_token", "prefill_s",
                                                  "train_step_s") if not math.isfinite(r[k])]
    if bad:
        raise RuntimeError(f"non-finite measurements: {bad}")
    table = write_outputs(cfg, rows, data, args.config)
    print(f"\n== dlo efficiency study: {cfg.study_dir}/study.md ==\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
