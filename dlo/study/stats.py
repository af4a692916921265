"""Aggregation over seeds: intervals, shares of the dense expansion's gain and compute, paired differences."""

from __future__ import annotations

import math
import statistics

from dlo.study.config import StudyConfig, model_names
from dlo.study.measurement import EvalData

# Two-sided 95% quantiles of Student's t by degrees of freedom; beyond the table a Cornish-Fisher expansion.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
METRICS = ("eval_loss", "exact_match", "text_loss", "flops_per_token", "gain_share", "compute_share",
           "gain_per_compute", "prefill_s", "decode_s", "train_step_s")
LM_EVAL_MAIN_METRIC = "acc"  # the metric tables show of an lm-eval task that has it


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


def main_metric(metrics: dict) -> str:
    """The metric shown of an lm-eval task: LM_EVAL_MAIN_METRIC where the task has it, else its first."""
    return LM_EVAL_MAIN_METRIC if LM_EVAL_MAIN_METRIC in metrics else next(iter(metrics))


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
        entry["lm_eval"] = {task: {metric: interval([r["lm_eval"][task][metric] for r in mine]) for metric in metrics}
                            for task, metrics in first["lm_eval"].items()}
        entry["dropped"] = sorted({tuple(r["dropped"]) for r in mine}) if "dropped" in first else None
        summary.append(entry)
    return summary


def paired_differences(rows: list[dict], cfg: StudyConfig, data: EvalData) -> list[dict]:
    """For each ``compare`` pair [a, b]: a - b per seed, as intervals (eval loss, group accuracies, held-out text
    loss where measured, FLOPs; under "lm_eval" the main metric of each task)."""
    keys = ["eval_loss", *[f"accuracy_{g}" for g in data.groups[1:]], *(["text_loss"] if data.texts else []),
            "flops_per_token"]
    by = {(r["name"], r["seed"]): r for r in rows}
    out = []
    for a, b in cfg.compare:
        seeds = [s for s in cfg.seeds if (a, s) in by and (b, s) in by]
        if not seeds:
            continue
        pair = {"a": a, "b": b, **{k: interval([by[(a, s)][k] - by[(b, s)][k] for s in seeds]) for k in keys}}
        pair["lm_eval"] = {}
        for task, metrics in by[(a, seeds[0])]["lm_eval"].items():
            metric = main_metric(metrics)
            pair["lm_eval"][task] = interval([by[(a, s)]["lm_eval"][task][metric] - by[(b, s)]["lm_eval"][task][metric]
                                              for s in seeds])
        out.append(pair)
    return out
