"""Measurement of one model on the eval records, and of the static models derived from a trained run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import dlo
from dlo.batching import IGNORE_INDEX, pad_token_id
from dlo.batching import batches as make_batches
from dlo.checkpoints import read_config, weight_files
from dlo.evaluation import encode, evaluate, load_batches, read_eval_records
from dlo.export import export_static, save_export
from dlo.flops import model_flops
from dlo.modeling import routed_layers
from dlo.study.arms import Arm
from dlo.study.config import PROMPT, EvalSection, StudyConfig

# Generation may run this many tokens past the longest reference answer, so a model that does not
# stop after the answer is cut off with extra text (a miss), not at exactly the answer (a false hit).
ANSWER_MARGIN_TOKENS = 8


@dataclass
class EvalData:
    batches: list[dict]  # eval-loss batches, each with "group" (B, T): the group index each position predicts
    groups: list[str]  # group names by index; index 0 is PROMPT
    records: list[dict]  # exact-match records (none: exact match is not measured)
    max_new_tokens: int
    timing_batch: dict
    prompt_batch: dict  # left-padded generation prompts of the timing records
    calibration: list[dict]  # training-text batches for similarity and router usage
    texts: list[dict] | None  # held-out plain-text batches for text_loss (None: no eval.text_file)

    @classmethod
    def load(cls, cfg: StudyConfig, tokenizer) -> EvalData:
        data = cfg.recipe["data"]
        path, max_length = data["eval_file"], data.get("max_length", 512)
        groups = [PROMPT, *cfg.eval.group_names]
        # Without configured groups every answer token is in the one group ANSWER (index 1).
        group_of = {c: groups.index(g) for g, classes in cfg.eval.groups.items() for c in classes} or None
        records = read_eval_records(path, cfg.eval.max_samples)
        encoded = [dict(zip(("input_ids", "labels"), encode(r, tokenizer, max_length))) for r in records]
        pad = pad_token_id(tokenizer)
        batches = make_batches(encoded, cfg.eval.batch_size, pad)
        for n, batch in enumerate(batches):
            chunk = records[n * cfg.eval.batch_size:(n + 1) * cfg.eval.batch_size]
            batch["group"] = _position_groups(batch["labels"], chunk, group_of, path)
        accuracy = records[:cfg.eval.accuracy_samples]
        longest = max((len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in accuracy),
                      default=0)
        timed = records[:cfg.timing.batch_size]
        timing = make_batches(encoded[:cfg.timing.batch_size], cfg.timing.batch_size, pad)[0]
        calibration = load_batches(data["train_file"], tokenizer, cfg.eval.batch_size, max_length,
                                   cfg.static.calibration_samples)
        texts = None if cfg.eval.text_file is None else load_batches(
            cfg.eval.text_file, tokenizer, cfg.eval.batch_size, max_length, cfg.eval.max_text_samples)
        return cls(batches=batches, groups=groups, records=accuracy, max_new_tokens=longest + ANSWER_MARGIN_TOKENS,
                   timing_batch=timing, prompt_batch=_prompts(tokenizer, timed), calibration=calibration, texts=texts)


def _position_groups(labels: torch.Tensor, records: list[dict], group_of: dict[str, int] | None,
                     path: str) -> torch.Tensor:
    """(B, T) group index of the answer token each position predicts (0: none), -1 on the last position.

    ``group_of`` maps token classes to groups; None puts every answer token in group 1 (no token classes)."""
    groups = torch.zeros_like(labels)
    groups[:, -1] = -1
    if group_of is None:
        groups[:, :-1][labels[:, 1:] != IGNORE_INDEX] = 1
        return groups
    for row, record in enumerate(records):
        classes = record.get("token_classes")
        answer = (labels[row, 1:] != IGNORE_INDEX).nonzero().flatten().tolist()
        if classes is None or len(classes) != len(answer):
            raise ValueError(f"{path}: record {record.get('answer')!r} needs 'token_classes' with one class per "
                             f"answer token ({len(answer)} here, the end-of-turn marker included)")
        unknown = sorted(set(classes) - set(group_of))
        if unknown:
            raise ValueError(f"{path}: token classes {unknown} are in no eval.groups group")
        for position, name in zip(answer, classes):
            groups[row, position] = group_of[name]
    return groups


def _prompts(tokenizer, records: list[dict]) -> dict:
    texts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
             for r in records]
    return dict(tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left"))


def stop_token_ids(model, tokenizer) -> list[int]:
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops] if stops is not None else [])
    stops.add(tokenizer.eos_token_id)
    end = tokenizer.convert_tokens_to_ids("<|end|>")  # the tiny chat template's end of turn
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        stops.add(end)
    return sorted(s for s in stops if s is not None)


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 64) -> float:
    """Share of records whose greedy reply (prompt = messages minus the final assistant turn) is the answer."""
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model.eval()
    hits = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = _prompts(tokenizer, chunk)
        out = model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad, use_cache=True)
        for row, record in enumerate(chunk):
            reply = out[row, prompts["input_ids"].shape[1]:].tolist()
            reply = reply[:next((i for i, t in enumerate(reply) if t in stops), len(reply))]
            hits += tokenizer.decode(reply, skip_special_tokens=True).strip() == str(record["answer"]).strip()
    return hits / len(records)


@torch.no_grad()
def token_pass(model, data: EvalData) -> dict:
    """Loss and accuracy per group, per-token loss quantiles, realised capacity and, per routed layer, the
    share of each group's positions that ran it. A position belongs to the group of the token it predicts."""
    routed = routed_layers(model)
    n_groups = len(data.groups)
    nll_sum, hits, count = torch.zeros(n_groups), torch.zeros(n_groups), torch.zeros(n_groups)
    ran = {layer.layer_index: torch.zeros(n_groups) for layer in routed}
    positions = torch.zeros(n_groups)
    answer_nll, valid_tokens = [], 0
    model.eval()
    for batch in data.batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    **({"output_router_logits": True} if routed else {}))
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        correct = (logits.argmax(-1) == labels).float()
        group = batch["group"][:, :-1]
        answer = labels != IGNORE_INDEX
        for g in range(1, n_groups):
            mask = answer & (group == g)
            nll_sum[g] += nll[mask].sum()
            hits[g] += correct[mask].sum()
            count[g] += mask.sum()
        answer_nll.append(nll[answer])
        valid = batch["attention_mask"].bool()
        valid_tokens += int(valid.sum())
        position_group = batch["group"].clamp(min=0)  # the last position predicts nothing: a prompt position
        for g in range(n_groups):
            positions[g] += (valid & (position_group == g)).sum()
        for layer, record in zip(routed, out.routing if routed else ()):
            selected = record.selected & valid
            for g in range(n_groups):
                ran[layer.layer_index][g] += (selected & (position_group == g)).sum()
    answer_nll = torch.cat(answer_nll)
    quantiles = torch.quantile(answer_nll, torch.tensor([0.1, 0.5, 0.9])).tolist()
    result = {"eval_loss": float(answer_nll.mean()), "token_nll_p10_p50_p90": quantiles,
              "realised_capacity": {str(i): float(r.sum() / valid_tokens) for i, r in ran.items()},
              "capacity_by_group": {str(i): {name: float(r[g] / positions[g]) for g, name in enumerate(data.groups)}
                                    for i, r in ran.items()}}
    for g, name in enumerate(data.groups[1:], 1):
        result[f"loss_{name}"] = float(nll_sum[g] / count[g])
        result[f"accuracy_{name}"] = float(hits[g] / count[g])
    result["mean_seq_len"] = valid_tokens / sum(int(b["input_ids"].shape[0]) for b in data.batches)
    return result


def lm_eval_scores(model, tokenizer, settings: EvalSection) -> dict[str, dict[str, float]]:
    """lm-eval's scores of ``model`` on ``settings.lm_eval_tasks``: {task: {metric: value}}, stderrs left out.

    As recipes/lm_eval/evaluate.py does: the loaded model goes to lm-eval's HFLM as an object (routed models keep
    their thresholds), the task definitions come from ``settings.lm_eval_include`` (their data paths are relative
    to the working directory: the repository root)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include = settings.lm_eval_include
    tasks = TaskManager(include_path=include, include_defaults=False) if include else TaskManager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=settings.lm_eval_tasks, limit=settings.lm_eval_limit,
                                      bootstrap_iters=0, task_manager=tasks, verbosity="ERROR")["results"]
    # lm-eval names a metric "<metric>,<filter>" (the filter "none" for these tasks) and adds an "alias".
    return {task: {key.split(",")[0]: float(value) for key, value in results[task].items()
                   if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
            for task in settings.lm_eval_tasks}


def measure(model, tokenizer, data: EvalData, settings: EvalSection) -> dict:
    measured = token_pass(model, data)
    routed = {int(i): c for i, c in measured["realised_capacity"].items()}
    granularity = model.dlo_routing_config.granularity if routed else "block"
    return {
        "num_layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "exact_match": exact_match(model, tokenizer, data.records, data.max_new_tokens) if data.records else None,
        "text_loss": evaluate(model, data.texts, progress=False).loss if data.texts else None,
        "lm_eval": lm_eval_scores(model, tokenizer, settings) if settings.lm_eval_tasks else {},
        "flops_per_token": model_flops(model.config, measured["mean_seq_len"], routed, granularity)["total"],
        "target_capacity": {str(layer.layer_index): float(layer.target_capacity) for layer in routed_layers(model)},
        **measured,
    }


def load_trained(path: str, attn_implementation: str):
    config = read_config(path)
    dlo_model = "dlo_routing" in config or "dlo_repetitions" in config  # routers or shared repetitions
    loader = dlo.load_model if dlo_model else AutoModelForCausalLM.from_pretrained
    return loader(path, dtype=torch.float32, attn_implementation=attn_implementation).eval()


def _static_model(model, tokenizer, out: str, attn: str, **selection):
    """Export ``model`` with the layers ``selection`` chooses (dlo.export_static), save it, reload it plainly."""
    exported = export_static(model, **selection)
    info = exported.config.dlo_export
    path = save_export(exported, out, tokenizer, dict(info), force=True)
    # Measure what users get: the saved checkpoint, loaded by stock transformers.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval(), path, info


def checkpoint_mib(model_dir: str) -> float:
    """MiB of the weight files a saved model stores (a shared tensor is stored once)."""
    files = set(weight_files(model_dir).values())
    return sum(os.path.getsize(f) for f in files) / 2**20


def routing_label(routing) -> str:
    """The label kind, with the similarity estimator where a label uses one (``cos-global/dense``)."""
    if routing.label == "self" or routing.similarity_source == "packed":
        return routing.label
    return f"{routing.label}/{routing.similarity_source}"


def measure_run(cfg: StudyConfig, arm: Arm, seed: int, tokenizer, data: EvalData) -> list[dict]:
    """The rows of one trained run and of the static models derived from it."""
    out = cfg.run_dir(arm, seed)
    attn = cfg.recipe["model"].get("attn_implementation", "sdpa")
    model = load_trained(os.path.join(out, "final"), attn)
    with open(os.path.join(out, "final", "summary.json")) as fh:
        summary = json.load(fh)
    label = routing_label(model.dlo_routing_config) if arm.kind == "dlo" else None
    common = {"arm": arm.name, "seed": seed, "label": label, "train_seconds": summary["train_seconds"],
              "train_steps": summary["steps"]}
    measured = measure(model, tokenizer, data, cfg.eval)
    # Memory: what training held (shared repetitions count once; adapters included, before any merge; unknown for
    # a run saved without the count) and what the saved model stores.
    held = {"total": measured["parameters"], "trainable": 0} if not arm.train else \
        summary.get("parameters", {"total": None, "trainable": None})
    rows = [{"name": arm.name, "kind": arm.kind, "model_dir": os.path.join(out, "final"), **common,
             "training_parameters": held["total"], "trainable_parameters": held["trainable"],
             "checkpoint_mib": checkpoint_mib(os.path.join(out, "final")), **measured}]
    derived = []
    if arm.name == cfg.static.dense:
        similarity = evaluate(model, data.calibration, progress=False).similarity
        derived = [(f"shortgpt-{n}L", "shortgpt", {"num_layers": n, "similarity": similarity})
                   for n in cfg.static.num_layers]
    elif arm.kind == "dlo":
        usage = evaluate(model, data.calibration, progress=False)
        derived = [(f"{arm.name}/usage-{n}L", "usage-export",
                    {"num_layers": n, "capacities": usage.capacity, "similarity": usage.similarity})
                   for n in cfg.static.num_layers]
    for name, kind, selection in derived:
        if selection["num_layers"] > model.config.num_hidden_layers:
            raise ValueError(f"static.num_layers has {selection['num_layers']}, more than the "
                             f"{model.config.num_hidden_layers} layers of {arm.name}")
        static, path, info = _static_model(model, tokenizer, os.path.join(out, "static", name.split("/")[-1]),
                                           attn, **selection)
        rows.append({"name": name, "kind": kind, "model_dir": path, "source": arm.name, "kept": info["kept"],
                     "dropped": info["dropped"], **common, "label": label, "checkpoint_mib": checkpoint_mib(path),
                     **measure(static, tokenizer, data, cfg.eval)})
    return rows
