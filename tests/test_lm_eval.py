"""lm-eval on dlo models with the tiny default's task definitions (recipes/lm_eval/tiny): a routed checkpoint
through lm-eval's HF backend (trust_remote_code) and its static export through the lm-eval CLI. Per-document
scores must not depend on the batch size and must equal a direct computation with the model."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import dlo
from dlo.data import load_records

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "recipes" / "lm_eval" / "tiny"
BASE = ROOT / "assets" / "tiny" / "base"
LIMIT = 3  # documents per task: 72 log-likelihood requests and 3 generations
ATOL = 1e-4  # float32 log-likelihoods summed over a few tokens; batched matmuls differ in the last bits
runs_lm_eval = pytest.mark.slow  # lm-eval's runs take tens of seconds on a CPU


def load_recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(f"dlo_lm_eval_{name}", ROOT / "recipes" / "lm_eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval comes with the dev extra (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny default expanded 6 -> 8 (copies, so the new layers matter), random routers on the copies
    calibrated to run half the tokens, saved with the tokenizer; and its export without the first copy."""
    out = tmp_path_factory.mktemp("lm_eval")
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="sdpa")
    model = dlo.expand_model(model, dlo.ExpansionPlan.llama_pro(num_layers=6, groups=2, init="copy"))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5))
    generator = torch.Generator().manual_seed(0)
    for layer in dlo.routed_layers(model):
        layer.router.weight.data.normal_(std=0.2, generator=generator)
    docs = load_records(str(TASKS / "answer_exact.jsonl"), 16)
    batch = tokenizer([d["prompt"] + d["answer"] for d in docs], add_special_tokens=False, padding=True,
                      return_tensors="pt")
    dlo.calibrate(model, [dict(batch)], progress=False)
    model.eval().save_pretrained(out / "routed")
    tokenizer.save_pretrained(out / "routed")
    exported = dlo.export_static(model, num_layers=7)
    exported.save_pretrained(out / "exported")
    tokenizer.save_pretrained(out / "exported")
    return out


def evaluate(lm_eval, pretrained, batch_size: int, **model_args):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(pretrained), batch_size=batch_size, device="cpu", **model_args)
    # Without lm-eval's built-in tasks: indexing them takes seconds and the tests need only ours.
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["dlo_tiny"], limit=LIMIT, bootstrap_iters=0, task_manager=tasks,
                                      verbosity="ERROR")
    return lm, results


def per_document(samples: dict) -> dict:
    """Task -> per document: the choices' log-likelihoods (multiple choice) or the generated text."""
    scores = {}
    for task, docs in samples.items():
        by_id = {doc["doc_id"]: doc["resps"] for doc in docs}
        if task == "dlo_tiny_play_choice":
            scores[task] = [[float(r[0][0]) for r in by_id[i]] for i in sorted(by_id)]
        else:
            scores[task] = [by_id[i][0][0] for i in sorted(by_id)]
    return scores


def assert_same_scores(a: dict, b: dict):
    assert a.keys() == b.keys() == {"dlo_tiny_play_choice", "dlo_tiny_answer_exact"}
    assert len(a["dlo_tiny_play_choice"]) == LIMIT
    torch.testing.assert_close(torch.tensor(a["dlo_tiny_play_choice"]), torch.tensor(b["dlo_tiny_play_choice"]),
                               atol=ATOL, rtol=0)
    assert a["dlo_tiny_answer_exact"] == b["dlo_tiny_answer_exact"]


@torch.no_grad()
def direct_loglikelihoods(model, tokenizer, prompt: str, continuations: list[str]) -> list[float]:
    """Sum of log p(continuation tokens | prompt), split as lm-eval splits them: the prompt's trailing whitespace
    (here the newline of the generation prompt) is scored as part of the continuation."""
    stripped = prompt.rstrip()
    context = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    scores = []
    for continuation in continuations:
        whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        logprobs = torch.log_softmax(model(torch.tensor([whole]), use_cache=False).logits[0].float(), dim=-1)
        targets = torch.tensor(whole[len(context):])
        scores.append(float(logprobs[len(context) - 1:-1].gather(1, targets[:, None]).sum()))
    return scores


@pytest.fixture(scope="module")
def routed_at_batch_size_1(lm_eval, checkpoints):
    return evaluate(lm_eval, checkpoints / "routed", 1, trust_remote_code=True)


@runs_lm_eval
def test_routed_checkpoint_with_trust_remote_code(lm_eval, checkpoints, routed_at_batch_size_1):
    lm, single = routed_at_batch_size_1
    _, batched = evaluate(lm_eval, checkpoints / "routed", 4, trust_remote_code=True)
    scores = per_document(single["samples"])
    assert_same_scores(scores, per_document(batched["samples"]))
    assert single["results"] == batched["results"]

    model, tokenizer = lm.model, lm.tokenizer
    assert [layer.layer_index for layer in dlo.routed_layers(model)] == [3, 7]  # the custom code built routers
    doc = load_records(str(TASKS / "play_choice.jsonl"), 1)[0]
    ids = tokenizer(doc["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(), dlo.forced_routing(model, "run"):
        every_layer_runs = model(ids, use_cache=False).logits
    with torch.no_grad():
        assert (model(ids, use_cache=False).logits - every_layer_runs).abs().max() > 1e-3  # tokens do skip
    reference = direct_loglikelihoods(model, tokenizer, doc["prompt"], doc["choices"])
    torch.testing.assert_close(torch.tensor(scores["dlo_tiny_play_choice"][0]), torch.tensor(reference),
                               atol=ATOL, rtol=0)
    first = load_records(str(TASKS / "answer_exact.jsonl"), 1)[0]
    prompt = tokenizer(first["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    greedy = model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1]:]
    assert scores["dlo_tiny_answer_exact"][0] == tokenizer.decode(greedy, skip_special_tokens=True).split("<|end|>")[0]


@runs_lm_eval
def test_export_through_the_lm_eval_cli(lm_eval, checkpoints, tmp_path):
    export = checkpoints / "exported"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={export}",
           "--include_path", str(TASKS), "--tasks", "dlo_tiny", "--batch_size", "4", "--limit", str(LIMIT),
           "--device", "cpu", "--output_path", str(tmp_path), "--log_samples"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "dlo_tiny_play_choice" in proc.stdout and "exact_match" in proc.stdout
    samples = {}
    for path in glob.glob(str(tmp_path / "**" / "samples_*.jsonl"), recursive=True):
        task = re.match(r"samples_(.+)_\d{4}-\d\d-\d\dT", Path(path).name).group(1)  # samples_TASK_DATE.jsonl
        samples[task] = [json.loads(line) for line in Path(path).read_text().splitlines()]

    lm, single = evaluate(lm_eval, export, 1)
    assert type(lm.model) is LlamaForCausalLM  # plain transformers, no dlo code
    assert_same_scores(per_document(single["samples"]), per_document(samples))


@runs_lm_eval
def test_capacity_override_reaches_the_model(lm_eval, checkpoints, routed_at_batch_size_1, tmp_path):
    script = load_recipe_module("evaluate")
    results = script.main(["--model", str(checkpoints / "routed"), "--capacity", "1.0", "--tasks",
                           "dlo_tiny_play_choice", "--limit", str(LIMIT), "--batch-size", "4", "--device", "cpu",
                           "--output", str(tmp_path / "c1.json")])
    every_token = per_document(results["samples"])["dlo_tiny_play_choice"]
    calibrated = per_document(routed_at_batch_size_1[1]["samples"])["dlo_tiny_play_choice"]
    assert torch.tensor(calibrated).sub(torch.tensor(every_token)).abs().max() > 1e-3
    saved = json.loads((tmp_path / "c1.json").read_text())
    assert saved["capacity"] == "1.0" and "acc,none" in saved["results"]["dlo_tiny_play_choice"]
    with pytest.raises(SystemExit, match="has no routers"):
        script.main(["--model", str(checkpoints / "exported"), "--capacity", "0.5"])


def test_task_data_is_the_tiny_eval_set_in_chat_format():
    build = load_recipe_module("build_tiny_tasks")
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    plays = json.loads((ROOT / "assets" / "tiny" / "build_info.json").read_text())["corpus"]["plays"]
    built = build.build_tasks(load_records(str(ROOT / "assets" / "tiny" / "sft" / "eval.jsonl")), tokenizer, plays)
    for name, docs in built.items():
        assert load_records(str(TASKS / f"{name}.jsonl")) == docs, f"rerun recipes/lm_eval/build_tiny_tasks.py ({name})"
    choice = built["play_choice"][0]
    assert choice["prompt"].startswith("<s><|system|>\n") and choice["prompt"].endswith("<|assistant|>\n")
    assert choice["choices"][choice["label"]] == choice["answer"] + "<|end|>"
    assert len(choice["choices"]) == 24 and len(built["play_choice"]) == 100
    assert {d["task"] for d in built["answer_exact"]} == {"speaker", "play"}
