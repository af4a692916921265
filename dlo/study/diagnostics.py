"""Training curves of every run: what the trainer logged (dlo.trainer's routing terms), step by step.

recipes/sft.py writes the Trainer's log history into ``final/log_history.json``; this module turns it into one
JSON of curves per run (``<study_dir>/diagnostics/<arm>/seed<k>.json``) and one figure per arm with the seeds as
lines (``<study_dir>/diagnostics/<arm>.png``): the evidence for docs/STUDY.md's "Why routed runs collapse".
"""

from __future__ import annotations

import json
import os

from dlo.study.config import StudyConfig
from dlo.study.jsonfiles import write_json
from dlo.study.plots import plot_curves

LOG_HISTORY = "log_history.json"  # recipes/sft.py's LOG_HISTORY_FILE, in the run's final/
# Per routed layer, as dlo.trainer logs them (``routing/<key>/layer_<i>``).
LAYER_KEYS = ("capacity", "target_capacity", "label_agreement", "label_run_share", "agreement", "score",
              "score_std", "threshold")


def run_curves(log_history: list[dict]) -> dict:
    """Curves of one run from its Trainer log history: ``steps`` and, aligned with it, ``loss`` (what trained),
    ``task_loss``, ``router_loss`` (routed runs) and ``layers[<index>][<LAYER_KEYS>]``."""
    logs = [e for e in log_history if "loss" in e]  # training logs; the last entry is the run's summary
    routed = bool(logs) and "router_loss" in logs[0]
    # Without routers the trained loss is the task loss.
    curves = {"steps": [e["step"] for e in logs], "loss": [e["loss"] for e in logs],
              "task_loss": [e["task_loss" if routed else "loss"] for e in logs]}
    if routed:
        curves["router_loss"] = [e["router_loss"] for e in logs]
        layers = sorted({k.rsplit("_", 1)[1] for k in logs[0] if k.startswith("routing/capacity/layer_")}, key=int)
        curves["layers"] = {i: {key: [e.get(f"routing/{key}/layer_{i}") for e in logs] for key in LAYER_KEYS}
                            for i in layers}
    return curves


def write_diagnostics(cfg: StudyConfig, rows: list[dict]) -> list[str]:
    """The curves JSON of every trained run among ``rows`` and a figure per arm; returns the figures' paths.

    A run saved before recipes/sft.py kept its log history has no curves and is left out."""
    out_dir = os.path.join(cfg.study_dir, "diagnostics")
    figures = []
    for arm in cfg.arms:
        runs = []
        for row in sorted((r for r in rows if r["name"] == arm.name and r["train_steps"] > 0), key=lambda r: r["seed"]):
            path = os.path.join(row["model_dir"], LOG_HISTORY)
            if not os.path.isfile(path):
                continue
            with open(path) as fh:
                curves = run_curves(json.load(fh))
            run = {"arm": arm.name, "seed": row["seed"], "label": row["label"], "eval_loss": row["eval_loss"],
                   **curves}
            os.makedirs(os.path.join(out_dir, arm.name), exist_ok=True)
            write_json(os.path.join(out_dir, arm.name, f"seed{row['seed']}.json"), run)
            runs.append(run)
        if runs:
            figures.append(plot_curves(runs, os.path.join(out_dir, f"{arm.name}.png")))
    return figures
