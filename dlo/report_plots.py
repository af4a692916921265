"""PNG plots of a report. Uses matplotlib's object API (Figure + Agg canvas): no pyplot, so no
global backend is switched and nothing needs a display."""

from __future__ import annotations

import math
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from dlo.flops import flop_unit

DENSE, ROUTED, TARGET = "#9aa5b1", "#1f6fb2", "#d1495b"
TOKEN_LABEL_CHARS = 12  # longer token texts are cut, so one label cannot crowd the panel below
TOKEN_LABEL_INCHES = 0.13  # per token: room for a 6-point label
MAX_HEATMAP_INCHES = 60.0  # beyond this, every k-th token is labelled


def _save(fig: Figure, path: str):
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_capacity(report: dict, path: str):
    rows = report["layers"]
    fig = Figure(figsize=(max(5, 0.45 * len(rows) + 2), 3.4))
    ax = fig.add_subplot()
    idx = [r["index"] for r in rows]
    ax.bar(idx, [r["capacity"] for r in rows], color=[ROUTED if r["routed"] else DENSE for r in rows])
    routed = [r for r in rows if r["routed"]]
    ax.scatter([r["index"] for r in routed], [r["target_capacity"] for r in routed], marker="_", s=300,
               color=TARGET, label="target", zorder=3)
    ax.set(xlabel="layer", ylabel="share of tokens that ran", ylim=(0, 1.05),
           title="Realised capacity per layer (blue: routed, grey: dense)")
    ax.set_xticks(idx)
    if routed:
        ax.legend(loc="lower right")
    _save(fig, path)


def plot_flops(report: dict, path: str):
    rows = report["layers"]
    per = report["flops"]["per_token"]
    fig = Figure(figsize=(max(8, 0.45 * len(rows) + 5), 3.6))
    ax, tot = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    idx = [r["index"] for r in rows]
    div, unit = flop_unit(max(r["flops_dense"] for r in rows))
    ax.bar([i - 0.2 for i in idx], [r["flops_dense"] / div for r in rows], width=0.4, color=DENSE, label="dense")
    ax.bar([i + 0.2 for i in idx], [r["flops_routed"] / div for r in rows], width=0.4, color=ROUTED,
           label="routed (realised)")
    ax.set(xlabel="layer", ylabel=f"{unit} per token", title=f"Per layer (T = {report['flops']['seq_len']:.0f})")
    ax.set_xticks(idx)
    ax.legend(fontsize=8, loc="lower left")
    names = ["dense_base", "dense_expanded", "routed"]
    labels = [f"base\n{per['dense_base']['num_layers']} L", f"expanded\n{per['dense_expanded']['num_layers']} L",
              "routed"]
    div, unit = flop_unit(per["dense_expanded"]["total"])
    decoder = [per[n]["decoder"] / div for n in names]
    tot.bar(labels, decoder, color=[DENSE, DENSE, ROUTED], label="decoder")
    tot.bar(labels, [per[n]["lm_head"] / div for n in names], bottom=decoder, color="#f0c05a", label="lm_head")
    tot.set(ylabel=f"{unit} per token", title="Whole model")
    tot.legend(fontsize=8, loc="lower left")
    _save(fig, path)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, decoded on its own, as a tick label: spaces shown as ␣, other invisible characters
    escaped (\\n, \\t, ...), ``$`` escaped (matplotlib would start math mode), cut to TOKEN_LABEL_CHARS."""
    labels = []
    for token_id in ids:
        text = tokenizer.decode([token_id])
        text = "".join("␣" if c == " " else c if c.isprintable() else c.encode("unicode_escape").decode()
                       for c in text)
        if len(text) > TOKEN_LABEL_CHARS:
            text = text[:TOKEN_LABEL_CHARS - 1] + "…"
        labels.append(text.replace("$", r"\$") or "∅")
    return labels


def plot_heatmap(examples: list[dict], path: str, tokenizer=None) -> Figure:
    """Run/skip per token and layer, one panel per example, the x axis labelled with the tokens' text when a
    tokenizer is given. Returns the figure (its tick labels are what a reader sees)."""
    n = len(examples)
    longest = max(ex["run"].shape[1] for ex in examples)
    # One tick label per token: the figure widens with the sequence so the labels do not overlap.
    width = min(max(10.0, TOKEN_LABEL_INCHES * longest + 1.5), MAX_HEATMAP_INCHES)
    fig = Figure(figsize=(width, 1.2 + (2.2 if tokenizer is not None else 1.6) * n))
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    cmap = ListedColormap(["#f3f4f6", ROUTED])
    for k, (ax, ex) in enumerate(zip(axes, examples)):
        run = ex["run"].float().numpy()
        ax.imshow(run, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel("layer")
        if run.shape[0] <= 40:
            ax.set_yticks(range(run.shape[0]))
        ax.set_title(f"example {k}: run (blue) / skip (light) per token and layer", fontsize=9)
        if tokenizer is not None:
            every = math.ceil(run.shape[1] * TOKEN_LABEL_INCHES / (MAX_HEATMAP_INCHES - 1.5))
            positions = list(range(0, run.shape[1], every))
            labels = token_labels(tokenizer, [ex["input_ids"][i] for i in positions])
            ax.set_xticks(positions, labels, rotation=90, fontsize=6)
        else:
            ax.set_xlabel("token position")
    _save(fig, path)
    return fig


def plot_scores(report: dict, scores: dict, path: str):
    rows = [r for r in report["layers"] if r["routed"]]
    cols = min(4, len(rows))
    grid_rows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * grid_rows))
    axes = fig.subplots(grid_rows, cols, squeeze=False).ravel()
    for ax, row in zip(axes, rows):
        ax.hist(scores[row["index"]].numpy(), bins=40, range=(0, 1), color=ROUTED)
        ax.axvline(row["threshold"], color=TARGET, label="threshold")
        ax.set_title(f"layer {row['index']}: ran {row['capacity']:.2f}", fontsize=9)
        ax.set_xlabel("router score")
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def plot_timing(report: dict, path: str):
    t, dev = report["timing"], report["device"]
    keys = ["prefill", "train_step"]
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.add_subplot()
    ax.bar([i - 0.2 for i in range(2)], [t[k]["dense_s"] * 1e3 for k in keys], width=0.4, color=DENSE,
           label="dense (all run)")
    if t["prefill"]["routed_s"] is not None:
        ax.bar([i + 0.2 for i in range(2)], [t[k]["routed_s"] * 1e3 for k in keys], width=0.4, color=ROUTED,
               label="routed")
    ax.set_xticks(range(2))
    ax.set_xticklabels(["prefill", "train step (fwd+bwd)"])
    ax.set(ylabel="ms (median)", title=f"{dev['name']} ({dev['type']}), batch {t['batch_shape']}")
    ax.title.set_fontsize(8)
    ax.legend()
    _save(fig, path)


def write_plots(report: dict, result, output: str, tokenizer=None) -> list[str]:
    """Write every plot that has data into ``output``; returns the file names."""
    plots = {"capacity.png": lambda p: plot_capacity(report, p), "flops.png": lambda p: plot_flops(report, p),
             "timing.png": lambda p: plot_timing(report, p)}
    if report["model"]["routed_layers"]:
        plots["scores.png"] = lambda p: plot_scores(report, result.scores, p)
        if result.examples:
            plots["routing_heatmap.png"] = lambda p: plot_heatmap(result.examples, p, tokenizer)
    for name, draw in plots.items():
        draw(os.path.join(output, name))
    return list(plots)
