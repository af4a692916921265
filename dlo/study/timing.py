"""Wall-clock timing of the measured models: prefill, training step and decode, in interleaved rounds."""

from __future__ import annotations

import statistics
import time

import torch

from dlo.modeling import routed_layers
from dlo.report import device_info, measure_timing
from dlo.study.config import TimingSection
from dlo.study.measurement import EvalData, load_trained


def decode_seconds(model, prompts: dict, new_tokens: int) -> float:
    """Seconds per decoded token: generate(new_tokens) minus generate(1), over new_tokens - 1 steps."""
    def generate_seconds(n: int) -> float:
        start = time.perf_counter()
        model.generate(**prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                       pad_token_id=model.generation_config.pad_token_id)
        return time.perf_counter() - start

    with torch.no_grad():
        return (generate_seconds(new_tokens) - generate_seconds(1)) / (new_tokens - 1)


def _timed_round(model, batch: dict, prompts: dict, decode_tokens: int) -> tuple[float, float, float]:
    """One (prefill, train step, decode per token) timing, as deployed / as trained (similarity amortised)."""
    t = measure_timing(model, batch, warmup=0, repeats=1, progress=False)
    decode = decode_seconds(model, prompts, decode_tokens)
    if not routed_layers(model):
        return t["prefill"]["dense_s"], t["train_step"]["dense_s"], decode
    routing = model.dlo_routing_config
    train = t["train_step"]["routed_s"]
    if routing.label != "self":
        every = routing.similarity_every
        train = (t["train_step_similarity_s"] + (every - 1) * train) / every
    return t["prefill"]["routed_s"], train, decode


def time_rows(rows: list[dict], data: EvalData, timing: TimingSection, attn: str):
    """Median prefill, train-step and decode seconds of every row, in rounds that visit every model in turn.

    Interleaving spreads the load of other processes on this machine over all models alike, instead
    of penalising whichever model happened to be timed during a busy minute.
    """
    models = {row["name"] + f"@{row['seed']}": load_trained(row["model_dir"], attn) for row in rows}
    device = device_info(torch.device("cpu"))  # cached with the numbers: a later run may time on another machine
    samples = {key: ([], [], []) for key in models}
    for round_ in range(timing.warmup + timing.repeats):
        for key, model in models.items():
            measured = _timed_round(model, data.timing_batch, data.prompt_batch, timing.decode_tokens)
            if round_ >= timing.warmup:
                for values, value in zip(samples[key], measured):
                    values.append(value)
    for row in rows:
        prefill, train, decode = samples[row["name"] + f"@{row['seed']}"]
        row["prefill_s"], row["train_step_s"], row["decode_s"] = map(statistics.median, (prefill, train, decode))
        row["timed_on"] = device
