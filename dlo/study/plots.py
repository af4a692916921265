"""The study's figures."""

from __future__ import annotations

import math
import os

from dlo.flops import flop_unit

STYLE = {"base": ("*", "#6b7280"), "dense": ("D", "#111827"), "shortgpt": ("v", "#9333ea"),
         "usage-export": ("s", "#d97706"), "cos-global": ("o", "#1f6fb2"), "cos-global/dense": ("o", "#60a5fa"),
         "cos": ("o", "#2a9d8f"), "cos/dense": ("o", "#5eead4"),
         "self": ("o", "#e76f51")}


def _style(entry: dict) -> tuple[str, str, bool]:
    """Marker, colour, hollow: DLO by label, exports hollow in their label's colour, static kinds their own."""
    if entry["kind"] == "dlo":
        return (*STYLE[entry["label"]], False)
    if entry["kind"] == "usage-export":
        return "s", STYLE[entry["label"]][1], True
    return (*STYLE[entry["kind"]], entry["kind"] == "shortgpt")


def _figure(cols: int, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * cols, 4.6 * rows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _scatter(ax, summary: list[dict], xkey: str, ykey: str, references: tuple[str, str], xscale: float = 1.0,
             yscale: float = 1.0, ylim: tuple[float, float] | None = None):
    """Means with 95% intervals; a mean outside ``ylim`` is drawn as an arrow at the edge, its value written.
    The ``references`` (the study's base and dense models) also get a horizontal line."""
    for e in summary:
        if e[xkey] is None or e[ykey] is None:
            continue
        marker, color, hollow = _style(e)
        x, y = e[xkey]["mean"] * xscale, e[ykey]["mean"] * yscale
        if ylim is not None and not ylim[0] <= y <= ylim[1]:
            edge = min(max(y, ylim[0]), ylim[1])
            ax.plot(x, edge, marker="^" if y > ylim[1] else "v", ms=8, color=color, ls="none", zorder=3)
            ax.annotate(f"{e['name']} ({y:.3g}, off scale)", (x, edge), fontsize=7, xytext=(4, -10 if y < edge else 3),
                        textcoords="offset points")
            continue
        xerr, yerr = (abs(e[k]["ci95"] * s) if math.isfinite(e[k]["ci95"]) else 0.0
                      for k, s in ((xkey, xscale), (ykey, yscale)))
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, ms=7, color=color, mfc="none" if hollow else color,
                    capsize=3, lw=1, zorder=3)
        ax.annotate(e["name"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if e["name"] in references:
            ax.axhline(y, color=color, lw=0.8, ls="--" if e["name"] == references[0] else ":")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)


def plot_study(summary: list[dict], groups: list[str], out_dir: str, timing_shape: list[int],
               references: tuple[str, str]) -> dict[str, object]:
    """The study's figures, saved as ``study_<key>.png`` in ``out_dir``; ``references``: (base, dense) names."""
    divisor, unit = flop_unit(max(e["flops_per_token"]["mean"] for e in summary))
    hard = groups[-1]
    figures = {}
    # Scales that keep the informative range readable: accuracies in [0, 1], eval loss up to 1.5 x the worst
    # unexpanded base (a model far worse than that is shown off scale), gain kept from -60% to 130%.
    worst_base = max((e["eval_loss"]["mean"] for e in summary if e["kind"] == "base"),
                     default=max(e["eval_loss"]["mean"] for e in summary))
    accuracy = (-0.05, 1.05)
    fig, axes = _figure(3)
    # Free-form replies (no exact match measured) get the held-out text loss, when measured, in that panel.
    third = ("exact_match", "exact-match accuracy", accuracy)
    if all(e["exact_match"] is None for e in summary) and any(e["text_loss"] is not None for e in summary):
        third = ("text_loss", "held-out text loss (lower is better)", None)
    for ax, (ykey, label, ylim) in zip(axes[0], (("eval_loss", "eval loss (lower is better)", (-0.1, 1.5 * worst_base)),
                                                 (f"accuracy_{hard}", f"{hard}-token accuracy", accuracy), third)):
        _scatter(ax, summary, "flops_per_token", ykey, references, 1 / divisor, ylim=ylim)
        ax.set(xlabel=f"forward {unit}s per token (analytic, realised capacities)", ylabel=label)
    fig.suptitle("Quality vs compute, mean and 95% interval over seeds (filled circles: DLO by label; hollow "
                 "squares: usage exports; triangles: block-influence pruning; dashed: base, dotted: dense)")
    figures["quality_flops"] = fig
    fig, axes = _figure(3)
    for ax, (xkey, scale, label) in zip(axes[0], (("prefill_s", 1e3, f"prefill ms, batch {timing_shape}"),
                                                  ("decode_s", 1e3, "decode ms per token (same batch)"),
                                                  ("train_step_s", 1e3, "training step ms (same batch)"))):
        _scatter(ax, summary, xkey, f"accuracy_{hard}", references, scale, ylim=accuracy)
        ax.set(xlabel=f"{label}, measured", ylabel=f"{hard}-token accuracy")
    fig.suptitle("Quality vs wall-clock (CPU), timed models only")
    figures["quality_time"] = fig
    fig, axes = _figure(1)
    ax = axes[0][0]
    _scatter(ax, summary, "compute_share", "gain_share", references, 100, 100, ylim=(-60, 130))
    ax.plot([0, 100], [0, 100], color="0.6", lw=0.8, ls="-.")
    ax.axhline(80, color="#16a34a", lw=0.8)
    ax.axvline(60, color="#16a34a", lw=0.8)
    ax.set(xlabel="share of the dense expansion's added FLOPs spent (%)",
           ylabel="share of the dense expansion's eval-loss gain kept (%)")
    ax.set_title("Gain kept vs added compute (dash-dot: proportional; green: 80% at 60%)", fontsize=9)
    figures["gain"] = fig
    routed = [e for e in summary if e["capacity_by_group"]]
    if routed:
        fig, axes = _figure(min(3, len(routed)), math.ceil(len(routed) / 3))
        for ax in axes.flat[len(routed):]:
            ax.set_visible(False)
        for ax, e in zip(axes.flat, routed):
            layers = list(e["capacity_by_group"])
            width = 0.8 / len(groups)
            for g, name in enumerate(groups):
                shares = [e["capacity_by_group"][i][name] for i in layers]
                ax.bar([k + g * width for k in range(len(layers))], [s["mean"] for s in shares], width,
                       yerr=[s["ci95"] if math.isfinite(s["ci95"]) else 0 for s in shares], capsize=2, label=name)
            ax.set_xticks([k + width * (len(groups) - 1) / 2 for k in range(len(layers))],
                          [f"layer {i}" for i in layers])
            ax.set(ylim=(0, 1.05), ylabel="share of positions that ran", title=e["name"])
            ax.legend(fontsize=7)
        fig.suptitle("Where each routed layer spends its capacity, by the group of the token a position predicts")
        figures["capacity"] = fig
    for key, figure in figures.items():
        figure.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle above the top row's titles
        figure.savefig(os.path.join(out_dir, f"study_{key}.png"), dpi=100)
    return figures


def plot_curves(runs: list[dict], path: str) -> str:
    """One arm's training curves (dlo.study.diagnostics), saved at ``path``: a panel per quantity, a colour per
    seed (named with its eval loss), a line style per routed layer."""
    from matplotlib import colormaps

    routed = "layers" in runs[0]
    panels = [("task_loss", "task loss (log scale)")]
    if routed:
        panels += [("router_loss", "router loss"), ("capacity", "realised capacity (thin dotted: target)"),
                   ("label_agreement", "share of tokens whose selection matches the label"),
                   ("score_std", "std of router scores")]
    styles = ("-", "--", "-.", ":")
    fig, axes = _figure(len(panels))
    for ax, (key, title) in zip(axes[0], panels):
        for n, run in enumerate(runs):
            colour = colormaps["tab10"](n % 10)
            if key in run:  # a per-run quantity
                ax.plot(run["steps"], run[key], color=colour, lw=1,
                        label=f"seed {run['seed']} (eval loss {run['eval_loss']:.3f})")
                continue
            for style, curves in zip(styles, run["layers"].values()):
                ax.plot(run["steps"], curves[key], color=colour, lw=1, ls=style)
                if key == "capacity":
                    ax.plot(run["steps"], curves["target_capacity"], color=colour, lw=0.6, ls=":")
        ax.set(xlabel="training step", title=title, yscale="log" if key == "task_loss" else "linear")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    layers = "; routed layers: " + ", ".join(f"{i} '{s}'" for s, i in zip(styles, runs[0]["layers"])) if routed else ""
    fig.suptitle(f"{runs[0]['arm']}: training curves per seed{layers}")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    return path
