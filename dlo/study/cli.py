"""Efficiency study: how much of what extra depth buys does dynamic depth keep, per unit of compute?

    python recipes/study.py --config recipes/configs/study_depth.yaml [key=value ...]

The study builds its testbed (``testbed:``, dlo/tiny/depth_tasks.py: data and a pretrained base model,
cached in ``<study_dir>/testbed``), then trains every arm once per seed as an ordinary recipes/sft.py run of
the shared recipe plus the arm's overrides (same data, steps and optimiser; an arm with ``train_flops_of``
gets the steps that give it the training compute of that arm). From the trained models it derives the
static alternatives (``static:``): block-influence pruning of the dense expanded model (layers with the
highest cos(input, output) on training text are dropped) and dlo's export of every routed model by measured
router usage, at the depths in ``static.num_layers``.

Every model is measured on the same eval records: loss, teacher-forced accuracy and loss of each token-class
group (``eval.groups``; none: one group of every answer token), greedy exact match (unless
``eval.accuracy_samples`` is 0), analytic forward FLOPs per token at the realised capacities, and, for routed
layers, the share of each group's positions that ran them; optionally the loss of held-out plain text
(``eval.text_file``) and lm-eval tasks (``eval.lm_eval_tasks``). The models of the first ``timing.seeds`` seeds
(0: none) are timed in interleaved rounds: prefill, training step, decode. Each figure is
aggregated over seeds (mean and 95% t-interval); the gain share ((base - model) / (base - dense) in eval
loss, per seed) and the added-compute share ((model - base) / (dense - base) in FLOPs) give the headline.
Outputs: ``study.md``, ``study.json``, plots ``study_*.png``, tensorboard (``<study_dir>/tb``) and the training
curves of every run (``<study_dir>/diagnostics``: a JSON per run, a figure per arm). ``--arms`` runs some arms only.

Training runs ``workers`` at a time (one-process sft.py runs; 2 fill a 2-core CPU), then every run is measured.
The study resumes: a run with ``final/summary.json`` is not retrained, a run with checkpoints continues from
the last one, and measurements and timings are cached in ``arms/<arm>/seed<k>/results.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import os
import sys

from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from dlo.checkpoints import resolve_model_dir
from dlo.study.arms import match_training_flops
from dlo.study.config import load_study_config, select_arms
from dlo.study.jsonfiles import read_json, write_json
from dlo.study.measurement import EvalData, measure_run
from dlo.study.report import write_outputs
from dlo.study.runs import finished, train_run, write_run_config
from dlo.study.stats import add_shares, with_references
from dlo.study.testbed import ensure_testbed
from dlo.study.timing import time_rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="study YAML (see recipes/configs/study_depth.yaml)")
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: measure and report the runs that have finished (e.g. while another "
                             "process trains the rest); unfinished runs are left out of every table")
    parser.add_argument("--arms", type=lambda text: [n for n in text.split(",") if n],
                        help="comma-separated arms to run, e.g. dlo-c050-cos; the static base and dense arms and "
                             "the arms whose training FLOPs they match are added (default: every arm)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys into sections")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_study_config(args.config, args.overrides)
    if args.arms:
        select_arms(cfg, args.arms)
    hf_logging.disable_progress_bar()  # dozens of models load; their bars would bury the progress lines
    os.makedirs(cfg.study_dir, exist_ok=True)
    ensure_testbed(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg.recipe["model"]["path"]))
    data = EvalData.load(cfg, tokenizer)
    seq_len = float(data.timing_batch["attention_mask"].sum(1).float().mean())
    match_training_flops(cfg, seq_len)
    # What the cached measurements depend on besides the trained weights.
    settings = {"eval_file": cfg.recipe["data"]["eval_file"], "max_length": cfg.recipe["data"].get("max_length"),
                "eval": dataclasses.asdict(cfg.eval), "static": dataclasses.asdict(cfg.static)}
    timing_settings = dataclasses.asdict(cfg.timing)
    timed_seeds = cfg.seeds[:cfg.timing.seeds]
    runs = [(arm, seed) for arm in cfg.arms for seed in cfg.seeds]
    if args.no_train:
        runs = [(arm, seed) for arm, seed in runs if finished(cfg, arm, seed)]
        trained = [False] * len(runs)
        print(f"[study] --no-train: measuring the {len(runs)} finished runs", flush=True)
    else:
        configs = [write_run_config(cfg, arm, seed, args.config) for arm, seed in runs]
        print(f"[study] {len(runs)} runs of {len(cfg.arms)} arms, {cfg.workers} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(cfg.workers) as pool:  # each thread waits on one sft.py process
            trained = list(pool.map(lambda run, path: train_run(cfg, *run, path), runs, configs))
    rows, untimed, caches = [], [], {}
    for (arm, seed), fresh in zip(runs, trained):
        cache_path = os.path.join(cfg.run_dir(arm, seed), "results.json")
        cache = read_json(cache_path)
        if fresh or cache is None or cache["settings"] != settings:
            print(f"  {arm.name} seed {seed}: measuring", flush=True)
            cache = {"settings": settings, "timing_settings": None,
                     "rows": measure_run(cfg, arm, seed, tokenizer, data)}
            write_json(cache_path, cache)
        else:
            print(f"  {arm.name} seed {seed}: trained and measured before: cached", flush=True)
        caches[cache_path] = cache
        rows += cache["rows"]
        if seed in timed_seeds and cache["timing_settings"] != timing_settings:
            untimed += cache["rows"]
    if untimed:
        print(f"[study] timing {len(untimed)} models, {cfg.timing.warmup}+{cfg.timing.repeats} rounds", flush=True)
        time_rows(untimed, data, cfg.timing, cfg.recipe["model"].get("attn_implementation", "sdpa"))
        for path, cache in caches.items():
            if cache["rows"][0]["seed"] in timed_seeds:
                cache["timing_settings"] = timing_settings
                write_json(path, cache)
    rows = with_references(rows, cfg)
    add_shares(rows, cfg)
    # exact_match and text_loss are None where not measured (eval.accuracy_samples 0, no eval.text_file).
    bad = [(r["name"], r["seed"], k) for r in rows for k in ("eval_loss", "exact_match", "text_loss", "flops_per_token")
           if r[k] is not None and not math.isfinite(r[k])]
    if bad:
        raise RuntimeError(f"non-finite measurements: {bad}")
    tables = write_outputs(cfg, rows, data, args.config)
    print(f"\n== dlo efficiency study: {cfg.study_dir}/study.md ==\n{tables}")
    return 0
