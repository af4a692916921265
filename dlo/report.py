"""Efficiency report (DESIGN.md §4): where compute goes, what routing saves, what it costs in loss.

``build_report`` evaluates a model on data and times it; ``write_report`` stores the result.
``report.json`` (schema_version 1) holds:

- ``created`` (UTC ISO-8601), ``versions`` {dlo, torch, transformers, python}
- ``model``: path, architecture, num_layers, base_num_layers (before dlo's expansion), parameters,
  dtype, routed_layers (indices), granularity ("block" | "mlp" | null when nothing is routed)
- ``data``: path, sequences, tokens (non-padding), loss_tokens (predictions counted by the loss),
  mean_seq_len, batch_size, max_length
- ``device``: type ("cpu" | "cuda"), name, threads, load_average_1m (cpu: how busy the machine was
  when timing started; other processes distort wall-clock numbers)
- ``eval``: loss and perplexity of the model as deployed (causal thresholds), and
  dense_loss / dense_perplexity with every routed layer forced to run (null without routers)
- ``layers``: one entry per decoder layer: index, routed, target_capacity, capacity (realised share
  of tokens that ran; 1.0 for unrouted layers), mean_score, threshold (null for unrouted layers),
  similarity (mean cos(h_in, h_out) of the layer as it ran), flops_dense, flops_routed (per token)
- ``flops``: seq_len (the data's mean sequence length, at which attention-score FLOPs are taken),
  convention (see dlo.flops), per_token {dense_base, dense_expanded, routed}, each
  {num_layers, decoder, lm_head, total}; routed_vs_expanded and routed_vs_base (ratios of totals)
- ``timing``: batch_shape [B, T] (the first data batch), warmup, repeats; prefill and train_step
  (forward + backward of the task loss, no optimizer step), each {dense_s, routed_s, speedup}
  (median seconds; dense = every routed layer forced to run; routed at the causal thresholds for
  prefill and at the target capacities, top-k, for the train step; routed_s null without
  routers); train_step_similarity_s: the routed train step that also refreshes similarity labels
  (null for label='self'); peak_memory_bytes (cuda only, else null)
- ``plots``: file names of the PNGs written next to report.json
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

from dlo import flops as F
from dlo.batching import to_device
from dlo.evaluation import EvalResult, evaluate, perplexity
from dlo.modeling import decoder_layers, forced_routing, routed_layers, routing_state, stock_model_class

SCHEMA_VERSION = 1
FLOPS_CONVENTION = ("forward FLOPs per token, multiply-add = 2; attention scores causal, averaged over positions: "
                    "2*d_q*(T+1) dense, 2*d_q*c*(c*T+1) block-routed at capacity c; see dlo/flops.py")


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "threads": None, "load_average_1m": None}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # Other processes on the same cores distort wall-clock numbers: record how busy the machine was.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"type": device.type, "name": name, "threads": torch.get_num_threads(), "load_average_1m": load}


def versions() -> dict:
    import transformers

    import dlo

    return {"dlo": dlo.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


@contextmanager
def _routing_config(model, **changes):
    """Temporarily replace fields of the model's RoutingConfig (e.g. label='self': no similarity pass)."""
    previous = model.dlo_routing_config
    model.dlo_routing_config = dataclasses.replace(previous, **changes)
    try:
        yield
    finally:
        model.dlo_routing_config = previous


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_timing(model, batch: dict, warmup: int = 1, repeats: int = 3, progress: bool = True) -> dict:
    """Median wall-clock of prefill and of a training step, dense (all layers run) vs routed.

    Cases are interleaved round by round (after ``warmup`` untimed rounds), so drift and first-call
    costs do not favour whichever case would otherwise be timed last.
    """
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    routed = bool(routed_layers(model))

    def prefill():
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    def train_step():
        model(**batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    # (name, train mode, routing forced to, RoutingConfig changes); label='self' leaves out the similarity pass.
    cases = [("prefill", False, "run", {}), ("prefill", False, None, {}),
             ("train_step", True, "run", {"label": "self"}), ("train_step", True, None, {"label": "self"})]
    if routed and model.dlo_routing_config.label != "self":
        cases.append(("train_step_similarity", True, None, {"similarity_every": 1}))
    if not routed:
        cases = [c for c in cases if c[2] == "run"]
    times: dict = {(name, force): [] for name, _, force, _ in cases}
    was_training = model.training
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for round_ in tqdm(range(warmup + repeats), desc="timing", disable=not progress):
            for name, train, force, changes in cases:
                model.train(train)
                forcing = forced_routing(model, force) if routed else nullcontext()
                overriding = _routing_config(model, **changes) if routed and changes else nullcontext()
                with forcing, overriding:
                    _sync(device)
                    start = time.perf_counter()
                    (prefill if name == "prefill" else train_step)()
                    _sync(device)
                if round_ >= warmup:
                    times[(name, force)].append(time.perf_counter() - start)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        if routed:
            routing_state(model).discard_observations()  # timed steps take no optimizer step
    median = {key: statistics.median(values) for key, values in times.items()}

    def pair(name):
        dense, routed_s = median[(name, "run")], median.get((name, None))
        return {"dense_s": dense, "routed_s": routed_s, "speedup": dense / routed_s if routed_s else None}

    return {
        "batch_shape": list(batch["input_ids"].shape), "warmup": warmup, "repeats": repeats,
        "prefill": pair("prefill"), "train_step": pair("train_step"),
        "train_step_similarity_s": median.get(("train_step_similarity", None)),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def _flops_block(config, seq_len, num_layers, routed=None, granularity="block") -> dict:
    out = F.model_flops(config, seq_len, routed, granularity, num_layers=num_layers)
    return {"num_layers": num_layers, "decoder": out["decoder"], "lm_head": out["lm_head"], "total": out["total"],
            "layers": out["layers"]}


def build_report(model, batches: list[dict], *, model_path: str = "", data_path: str = "", batch_size: int = 0,
                 max_length: int = 0, num_examples: int = 4, warmup: int = 1, repeats: int = 3,
                 progress: bool = True) -> tuple[dict, EvalResult]:
    """The report dict (schema in the module docstring) and the evaluation behind it (for plots)."""
    config = model.config
    layers = decoder_layers(model)
    routed = {layer.layer_index: layer for layer in routed_layers(model)}
    granularity = model.dlo_routing_config.granularity if routed else None
    device = next(model.parameters()).device

    result = evaluate(model, batches, num_examples=num_examples, progress=progress)
    dense_loss = None
    if routed:
        with forced_routing(model, "run"):
            dense_loss = evaluate(model, batches, progress=progress, desc="evaluating (all layers run)").loss
    T = result.mean_seq_len
    n = len(layers)
    base = _flops_block(config, T, F.base_num_layers(config))
    expanded = _flops_block(config, T, n)
    routed_flops = _flops_block(config, T, n, result.capacity, granularity or "block")

    layer_rows = []
    for i in range(n):
        layer = routed.get(i)
        layer_rows.append({
            "index": i,
            "routed": layer is not None,
            "target_capacity": float(layer.target_capacity) if layer else 1.0,
            "capacity": result.capacity[i] if layer else 1.0,
            "mean_score": result.mean_score[i] if layer else None,
            "threshold": float(layer.threshold()) if layer else None,
            "similarity": result.similarity[i],
            "flops_dense": expanded["layers"][i]["total"],
            "flops_routed": routed_flops["layers"][i]["total"],
        })
    for block in (base, expanded, routed_flops):
        del block["layers"]

    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": {
            "path": model_path, "architecture": stock_model_class(model).__name__,
            "num_layers": n, "base_num_layers": F.base_num_layers(config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "routed_layers": sorted(routed), "granularity": granularity,
        },
        "data": {"path": data_path, "sequences": sum(b["input_ids"].shape[0] for b in batches),
                 "tokens": result.tokens, "loss_tokens": result.loss_tokens, "mean_seq_len": T,
                 "batch_size": batch_size, "max_length": max_length},
        "device": device_info(device),
        "eval": {"loss": result.loss, "perplexity": result.perplexity, "dense_loss": dense_loss,
                 "dense_perplexity": perplexity(dense_loss) if dense_loss is not None else None},
        "layers": layer_rows,
        "flops": {"seq_len": T, "convention": FLOPS_CONVENTION,
                  "per_token": {"dense_base": base, "dense_expanded": expanded, "routed": routed_flops},
                  "routed_vs_expanded": routed_flops["total"] / expanded["total"],
                  "routed_vs_base": routed_flops["total"] / base["total"]},
        "timing": measure_timing(model, batches[0], warmup=warmup, repeats=repeats, progress=progress),
        "plots": [],
    }
    return report, result


def format_summary(report: dict) -> str:
    """A terminal table: per-layer routing and FLOPs, then totals, timings and loss."""
    per = report["flops"]["per_token"]
    div, unit = F.flop_unit(max(row["flops_dense"] for row in report["layers"]))
    lines = [f"{'layer':>5} {'routed':>6} {'target':>6} {'ran':>6} {'score':>6} {'thresh':>6} {'sim':>6} "
             f"{unit + '/tok dense':>16} {'routed':>9}"]

    def num(x):
        return f"{x:6.3f}" if x is not None else f"{'-':>6}"

    for row in report["layers"]:
        lines.append(f"{row['index']:>5} {'yes' if row['routed'] else 'no':>6} {num(row['target_capacity'])} "
                     f"{num(row['capacity'])} {num(row['mean_score'])} {num(row['threshold'])} "
                     f"{num(row['similarity'])} {row['flops_dense'] / div:>16.3f} {row['flops_routed'] / div:>9.3f}")
    div, unit = F.flop_unit(per["dense_expanded"]["total"])
    lines.append("")
    lines.append(f"FLOPs per token at T={report['flops']['seq_len']:.1f}, decoder + lm_head = total ({unit}):")
    for key in ("dense_base", "dense_expanded", "routed"):
        b = per[key]
        lines.append(f"  {key:<15} {b['num_layers']:>3} layers  {b['decoder'] / div:10.3f} + {b['lm_head'] / div:8.3f}"
                     f" = {b['total'] / div:10.3f}")
    lines.append(f"  routed / expanded = {report['flops']['routed_vs_expanded']:.3f}, "
                 f"routed / base = {report['flops']['routed_vs_base']:.3f}")
    t, dev = report["timing"], report["device"]
    lines.append("")
    load = f", load average {dev['load_average_1m']:.1f}" if dev.get("load_average_1m") is not None else ""
    lines.append(f"Wall-clock on {dev['name']} ({dev['type']}, {dev['threads'] or 'all'} threads{load}), "
                 f"batch {t['batch_shape']}, median of {t['repeats']}:")
    for key in ("prefill", "train_step"):
        p = t[key]
        routed_s = f"{p['routed_s'] * 1e3:9.2f} ms  speedup {p['speedup']:.2f}x" if p["routed_s"] else "  (no routers)"
        lines.append(f"  {key:<11} dense {p['dense_s'] * 1e3:9.2f} ms  routed {routed_s}")
    if t["train_step_similarity_s"] is not None:
        lines.append(f"  train_step with similarity refresh: {t['train_step_similarity_s'] * 1e3:.2f} ms")
    e = report["eval"]
    lines.append("")
    dense = ""
    if e["dense_loss"] is not None:
        dense = f"; all layers run: loss {e['dense_loss']:.4f}, ppl {e['dense_perplexity']:.2f}"
    lines.append(f"Eval on {report['data']['loss_tokens']} predicted tokens: loss {e['loss']:.4f}, "
                 f"ppl {e['perplexity']:.2f}{dense}")
    return "\n".join(lines)


def write_report(report: dict, result: EvalResult, output: str, tokenizer=None) -> list[str]:
    """report.json, PNG plots and tensorboard scalars (``output/tb``). Returns the written plot names."""
    from dlo.report_plots import write_plots

    os.makedirs(output, exist_ok=True)
    report["plots"] = write_plots(report, result, output, tokenizer)
    with open(os.path.join(output, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    write_tensorboard(report, result, os.path.join(output, "tb"))
    return report["plots"]


def write_tensorboard(report: dict, result: EvalResult, logdir: str):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    try:
        writer.add_scalar("eval/loss", report["eval"]["loss"], 0)
        writer.add_scalar("eval/perplexity", report["eval"]["perplexity"], 0)
        if report["eval"]["dense_loss"] is not None:
            writer.add_scalar("eval/dense_loss", report["eval"]["dense_loss"], 0)
        for key, block in report["flops"]["per_token"].items():
            writer.add_scalar(f"flops_per_token/{key}", block["total"], 0)
        for key in ("prefill", "train_step"):
            for kind in ("dense_s", "routed_s"):
                if report["timing"][key][kind] is not None:
                    writer.add_scalar(f"timing/{key}_{kind}", report["timing"][key][kind], 0)
        # Per-layer quantities: the layer index is the step, so each reads as a curve over depth.
        for row in report["layers"]:
            writer.add_scalar("layer/capacity", row["capacity"], row["index"])
            writer.add_scalar("layer/flops_routed", row["flops_routed"], row["index"])
            writer.add_scalar("layer/similarity", row["similarity"], row["index"])
        for i, scores in result.scores.items():
            if scores.numel():
                writer.add_histogram(f"router_scores/layer_{i}", scores, 0)
    finally:
        writer.close()
