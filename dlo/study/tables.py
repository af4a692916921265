"""The study's markdown tables."""

from __future__ import annotations

import math

from dlo.flops import flop_unit
from dlo.study.stats import main_metric


def pm(value: dict | None, scale: float = 1.0, digits: int = 3) -> str:
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


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _lm_eval_columns(summary: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval task the models were scored on: the main metric of each."""
    first = next((e["lm_eval"] for e in summary if e["lm_eval"]), {})
    return [(task, main_metric(metrics)) for task, metrics in first.items()]


def markdown_tables(summary: list[dict], pairs: list[dict], groups: list[str]) -> str:
    divisor, unit = flop_unit(max(e["flops_per_token"]["mean"] for e in summary))
    most = max(len(e["seeds"]) for e in summary)
    # Held-out text loss and lm-eval columns only where the study measured them (eval.text_file, lm_eval_tasks).
    text = any(e["text_loss"] is not None for e in summary)
    tasks = _lm_eval_columns(summary)
    header = ["model", "kind", "layers", "realised capacity / dropped", "eval loss",
              *[f"{g} {what}" for g in groups[1:] for what in ("acc", "loss")], "exact match",
              *(["text loss"] if text else []), *[f"{task} {metric}" for task, metric in tasks],
              f"{unit}/token", "gain kept", "added compute", "gain kept / added compute", "prefill ms",
              "decode ms/token", "train step ms"]
    lines = [_row(header), "|---" * len(header) + "|"]
    for e in summary:
        kind = e["kind"] + (f" ({e['label']})" if e["label"] else "")
        name = e["name"] + (f" (seeds {e['seeds']})" if len(e["seeds"]) < most else "")
        lines.append(_row([
            name, kind, str(e["num_layers"]), _capacity_text(e), pm(e["eval_loss"]),
            *[pm(e[f"{what}_{g}"]) for g in groups[1:] for what in ("accuracy", "loss")], pm(e["exact_match"]),
            *([pm(e["text_loss"])] if text else []),
            *[pm(e["lm_eval"].get(task, {}).get(metric)) for task, metric in tasks],
            pm(e["flops_per_token"], 1 / divisor), f"{pm(e['gain_share'], 100, 1)}%",
            f"{pm(e['compute_share'], 100, 1)}%", pm(e["gain_per_compute"], 1, 2), pm(e["prefill_s"], 1e3, 2),
            pm(e["decode_s"], 1e3, 3), pm(e["train_step_s"], 1e3, 1)]))
    capacity = ["| model | layer | " + " | ".join(f"ran: {g}" for g in groups) + " |",
                "|---|---|" + "---|" * len(groups)]
    for e in summary:
        for layer, shares in e["capacity_by_group"].items():
            capacity.append(f"| {e['name']} | {layer} | " + " | ".join(pm(shares[g]) for g in groups) + " |")
    paired_header = ["a", "b", "Δ eval loss", *[f"Δ {g} acc" for g in groups[1:]],
                     *(["Δ text loss"] if text else []), *[f"Δ {task} {metric}" for task, metric in tasks],
                     f"Δ {unit}/token"]
    paired = [_row(paired_header), "|---" * len(paired_header) + "|"]
    for p in pairs:
        paired.append(_row([p["a"], p["b"], pm(p["eval_loss"]), *[pm(p[f"accuracy_{g}"]) for g in groups[1:]],
                            *([pm(p["text_loss"])] if text else []), *[pm(p["lm_eval"].get(task)) for task, _ in tasks],
                            pm(p["flops_per_token"], 1 / divisor)]))
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
