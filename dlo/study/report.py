"""The study's outputs: study.md, study.json, the plots, tensorboard and the training curves."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil

from dlo.report import versions
from dlo.study.config import StudyConfig
from dlo.study.diagnostics import write_diagnostics
from dlo.study.measurement import EvalData
from dlo.study.plots import plot_study
from dlo.study.preregistered import preregistered, preregistered_text
from dlo.study.stats import METRICS, paired_differences, summarise
from dlo.study.tables import markdown_tables


def write_tensorboard(summary: list[dict], text: str, figures: dict, logdir: str):
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(logdir, ignore_errors=True)  # derived from the cached results; rewrite rather than append
    for e in summary:
        with SummaryWriter(os.path.join(logdir, e["name"].replace("/", "_"))) as writer:
            for key in METRICS:
                if e[key] is not None:
                    writer.add_scalar(f"study/{key}", e[key]["mean"], 0)
    with SummaryWriter(logdir) as writer:
        writer.add_text("study/tables", text, 0)
        for key, figure in figures.items():
            writer.add_figure(f"study/{key}", figure, 0)


def _timing_conditions(rows: list[dict]) -> str:
    conditions = {(d["name"], d["threads"], d["load_average_1m"]) for d in (r["timed_on"] for r in rows)}
    return "; ".join(f"{name} ({threads} threads, load average {'?' if load is None else f'{load:.2f}'} at start)"
                     for name, threads, load in sorted(conditions, key=str))


def _optional_measures(cfg: StudyConfig, data: EvalData) -> str:
    """The sentences on exact match, held-out text loss and lm-eval: what was measured, on what."""
    text = (f"exact match: greedy generation on {len(data.records)} prompts." if data.records else
            "exact match: not measured (eval.accuracy_samples 0).")
    if data.texts:
        records = sum(b["input_ids"].shape[0] for b in data.texts)
        text += (f" Text loss: mean next-token loss on {records} records of {cfg.eval.text_file} (each cut to "
                 f"data.max_length tokens).")
    if cfg.eval.lm_eval_tasks:
        limit = "every" if cfg.eval.lm_eval_limit is None else f"the first {cfg.eval.lm_eval_limit}"
        text += (f" lm-eval: {', '.join(cfg.eval.lm_eval_tasks)} on {limit} documents of each task (the tables "
                 "show each task's acc, study.json every metric).")
    return text


def write_outputs(cfg: StudyConfig, rows: list[dict], data: EvalData, config_path: str) -> str:
    summary = summarise(rows, cfg, data)
    pairs = paired_differences(rows, cfg, data)
    verdict = preregistered(rows, cfg, data.groups)
    tables = markdown_tables(summary, pairs, data.groups) + "\n\n" + preregistered_text(verdict)
    shape = list(data.timing_batch["input_ids"].shape)
    figures = plot_study(summary, data.groups, cfg.study_dir, shape, (cfg.static.base, cfg.static.dense))
    timed = [r for r in rows if "timed_on" in r]
    sequences = sum(b["input_ids"].shape[0] for b in data.batches)
    setup = (f"Seeds {cfg.seeds}; every figure is the mean ± the 95% t-interval half width over seeds. Eval: "
             f"{sequences} records of {cfg.recipe['data']['eval_file']} (mean length {rows[0]['mean_seq_len']:.1f} "
             f"tokens); {_optional_measures(cfg, data)} Gain kept: (base - model) / "
             f"(base - {cfg.static.dense}) in eval loss; added compute: (model - base) / ({cfg.static.dense} - base) "
             f"in FLOPs per token. ")
    setup += (f"Timing: median of {cfg.timing.repeats} rounds over every model of the first {cfg.timing.seeds} "
              f"seed(s) in turn, batch {shape}, on {_timing_conditions(timed)}." if timed else
              f"Timing: none of these models was timed (timing.seeds {cfg.timing.seeds}).")
    with open(os.path.join(cfg.study_dir, "study.md"), "w") as fh:
        fh.write(f"# dlo efficiency study\n\nConfig: `{config_path}`. {setup}\n\n{tables}\n\n"
                 + "".join(f"![{key}](study_{key}.png)\n" for key in figures))
    study = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "versions": versions(), "config": config_path, "seeds": cfg.seeds,
             "eval": dataclasses.asdict(cfg.eval), "static": dataclasses.asdict(cfg.static),
             "timing": {**dataclasses.asdict(cfg.timing), "batch_shape": shape},
             "summary": summary, "paired": pairs, "preregistered": verdict, "rows": rows}
    with open(os.path.join(cfg.study_dir, "study.json"), "w") as fh:
        json.dump(study, fh, indent=2)
    write_tensorboard(summary, tables, figures, os.path.join(cfg.study_dir, "tb"))
    write_diagnostics(cfg, rows)
    return tables
