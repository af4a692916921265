"""The study's markdown tables."""

from __future__ import annotations

import math

from dlo.flops import flop_unit


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
        group_values = " | ".join(f"{pm(e['accuracy_' + g])} | {pm(e['loss_' + g])}" for g in groups[1:])
        name = e["name"] + (f" (seeds {e['seeds']})" if len(e["seeds"]) < most else "")
        lines.append(f"| {name} | {kind} | {e['num_layers']} | {_capacity_text(e)} | {pm(e['eval_loss'])} "
                     f"| {group_values} | {pm(e['exact_match'])} | {pm(e['flops_per_token'], 1 / divisor)} "
                     f"| {pm(e['gain_share'], 100, 1)}% | {pm(e['compute_share'], 100, 1)}% "
                     f"| {pm(e['gain_per_compute'], 1, 2)} "
                     f"| {pm(e['prefill_s'], 1e3, 2)} | {pm(e['decode_s'], 1e3, 3)} "
                     f"| {pm(e['train_step_s'], 1e3, 1)} |")
    capacity = ["| model | layer | " + " | ".join(f"ran: {g}" for g in groups) + " |",
                "|---|---|" + "---|" * len(groups)]
    for e in summary:
        for layer, shares in e["capacity_by_group"].items():
            capacity.append(f"| {e['name']} | {layer} | " + " | ".join(pm(shares[g]) for g in groups) + " |")
    paired = [f"| a | b | Δ eval loss | {' | '.join(f'Δ {g} acc' for g in groups[1:])} | Δ {unit}/token |",
              "|---|---|---|" + "---|" * (len(groups) - 1) + "---|"]
    for p in pairs:
        accs = " | ".join(pm(p[f"accuracy_{g}"]) for g in groups[1:])
        paired.append(f"| {p['a']} | {p['b']} | {pm(p['eval_loss'])} | {accs} "
                      f"| {pm(p['flops_per_token'], 1 / divisor)} |")
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
