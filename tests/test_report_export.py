"""Efficiency report, static export and the report/export/generate CLI, against independent references:
hand-written FLOPs arithmetic, the stock model with layers deleted, HF's own loss, a manual greedy loop."""

import copy
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

import dlo
from dlo.cli import main
from dlo.evaluation import IGNORE, encode, read_eval_records
from dlo.export import export_static, save_export, select_layers
from dlo.modeling import decoder_layers

ATOL = 1e-5
SENTENCES = [  # eight words each: text records tokenise to exactly T = 8 (no special tokens added)
    "the cat sat on the mat all day",
    "a dog ran in the park at noon",
    "the bird sang a song in early spring",
    "my friend read the book by the fire",
    "we walked to the river after lunch today",
    "she wrote a long letter to her aunt",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", chat_template=CHAT_TEMPLATE)


def _routed(base, layers, capacity, granularity="block", beta=0.3, seed=0):
    """Routed copy of ``base`` with random routers, calibrated so thresholds sit inside the scores."""
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=layers, capacity=capacity,
                                                                       granularity=granularity, beta=beta))
    gen = torch.Generator().manual_seed(seed)
    for layer in dlo.routed_layers(model):
        layer.router.weight.data.normal_(generator=gen)
        layer.router.bias.data.normal_(std=0.1, generator=gen)
    dlo.calibrate(model, [{"input_ids": torch.randint(6, 30, (4, 16), generator=gen)}], progress=False)
    return model.eval()


def _batch(B=3, T=10, lengths=(10, 7, 4)):
    ids = torch.randint(6, 30, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids, mask


def _without_layers(base, dropped):
    reference = copy.deepcopy(base)
    layers = decoder_layers(reference)
    for i in sorted(dropped, reverse=True):
        del layers[i]
    reference.config.num_hidden_layers = len(layers)
    return reference.eval()


@pytest.fixture
def base(tiny_llama_config):
    return LlamaForCausalLM(tiny_llama_config).eval()


@pytest.fixture
def saved(base, tokenizer, tmp_path):
    """A routed 4-layer model (routed layers 1 and 3) saved with the tokenizer, plus chat and text data."""
    base.config.dlo_expansion = {"base_num_layers": 3}
    model = _routed(base, [1, 3], [0.3, 0.7])
    model.save_pretrained(tmp_path / "routed")
    tokenizer.save_pretrained(tmp_path / "routed")
    with open(tmp_path / "text.jsonl", "w") as fh:
        for s in SENTENCES:
            fh.write(json.dumps({"text": s}) + "\n")
    with open(tmp_path / "chat.jsonl", "w") as fh:
        for s in SENTENCES:
            msgs = [{"role": "user", "content": " ".join(s.split()[:3])}, {"role": "assistant", "content": s}]
            fh.write(json.dumps({"messages": msgs, "task": "echo", "answer": s}) + "\n")
    return tmp_path


# ---- report -------------------------------------------------------------------------------------------------


def test_report_schema_flops_and_loss(saved, capsys):
    out = saved / "report"
    rc = main(["report", "--model", str(saved / "routed"), "--data", str(saved / "text.jsonl"), "--output", str(out),
               "--batch-size", "4", "--repeats", "1", "--warmup", "1", "--examples", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FLOPs per token" in printed and "Wall-clock on" in printed
    report = json.loads((out / "report.json").read_text())

    assert set(report) >= {"schema_version", "created", "versions", "model", "data", "device", "eval", "layers",
                           "flops", "timing", "plots"}
    assert report["model"]["routed_layers"] == [1, 3] and report["model"]["granularity"] == "block"
    assert report["model"]["num_layers"] == 4 and report["model"]["base_num_layers"] == 3
    assert report["model"]["architecture"] == "LlamaForCausalLM"
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["data"]["sequences"] == 6 and report["data"]["tokens"] == 48
    for key in ("prefill", "train_step"):
        assert report["timing"][key]["dense_s"] > 0 and report["timing"][key]["routed_s"] > 0
    assert report["timing"]["train_step_similarity_s"] > 0  # label is cos-global: similarity has a cost
    assert report["timing"]["batch_shape"] == [4, 8]
    for name in ("capacity.png", "flops.png", "timing.png", "scores.png", "routing_heatmap.png"):
        assert name in report["plots"]
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))

    # FLOPs by hand: d=64, 4 heads of 16 (d_q=64), 2 kv heads (d_kv=32), d_ff=128, V=97, T=8.
    assert report["flops"]["seq_len"] == 8
    proj = 2 * 64 * (64 + 32 + 32) + 2 * 64 * 64  # q, k, v, o = 24576
    scores = 4 * 64 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) / 8  # causal: position t scores t keys = 1152
    mlp = 6 * 64 * 128  # 49152
    dense_layer = proj + scores + mlp  # 74880
    head = 2 * 64 * 97  # 12416
    per = report["flops"]["per_token"]
    assert per["dense_base"]["total"] == pytest.approx(3 * dense_layer + head, rel=1e-12)
    assert per["dense_expanded"]["total"] == pytest.approx(4 * dense_layer + head, rel=1e-12)
    assert per["dense_expanded"]["lm_head"] == head
    routed_total = 2 * dense_layer + head
    rows = {row["index"]: row for row in report["layers"]}
    for i in (1, 3):
        c = rows[i]["capacity"]
        K = c * 8  # tokens that run, attending causally among themselves
        expected = 2 * 64 + c * (proj + mlp) + 4 * 64 * K * (K + 1) / 2 / 8
        assert rows[i]["flops_routed"] == pytest.approx(expected, rel=1e-12)
        routed_total += expected
    assert per["routed"]["total"] == pytest.approx(routed_total, rel=1e-12)
    assert rows[0]["flops_routed"] == rows[0]["flops_dense"] == pytest.approx(dense_layer)

    # Realised capacities and loss against the model itself: one batch, HF's own loss over every token.
    model = dlo.load_model(saved / "routed").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(saved / "routed")
    ids = tok(SENTENCES, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, labels=ids, use_cache=False, output_router_logits=True)
        loss = out.loss.item()
    for layer, record in zip(dlo.routed_layers(model), out.routing):
        share = record.selected.float().mean().item()
        assert rows[layer.layer_index]["capacity"] == pytest.approx(share, abs=1e-6)
        assert 0 < share < 1
        assert rows[layer.layer_index]["threshold"] == pytest.approx(float(layer.threshold()))
    assert report["eval"]["loss"] == pytest.approx(loss, abs=1e-4)
    assert report["eval"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-3)
    assert report["eval"]["dense_loss"] != pytest.approx(report["eval"]["loss"], abs=1e-6)


def test_flops_mlp_granularity_scales_only_the_mlp(tiny_llama_config):
    from dlo.flops import Dims, layer_flops

    dims = Dims.from_config(tiny_llama_config)
    got = layer_flops(dims, seq_len=8, capacity=0.25, granularity="mlp")
    assert got["total"] == pytest.approx(2 * 64 + 24576 + 1152 + 0.25 * 49152)
    with pytest.raises(ValueError, match=r"capacity=1.5: must be in \[0, 1\]"):
        layer_flops(dims, seq_len=8, capacity=1.5, granularity="block")


def test_chat_records_count_only_the_reply(tokenizer):
    record = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]}
    ids, labels = encode(record, tokenizer, max_length=64)
    counted = [t for t in labels if t != IGNORE]
    assert tokenizer.convert_ids_to_tokens(counted) == ["sat", "on", "the", "mat", "</s>"]
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["<|user|>", "the", "cat", "</s>"]
    assert len(ids) == len(labels)
    assert encode(record, tokenizer, max_length=3)[0] == ids[:3]


def test_report_on_chat_data_runs(saved):
    rc = main(["report", "--model", str(saved / "routed"), "--data", str(saved / "chat.jsonl"), "--output",
               str(saved / "rep_chat"), "--repeats", "1", "--warmup", "0", "--max-samples", "3"])
    assert rc == 0
    report = json.loads((saved / "rep_chat" / "report.json").read_text())
    assert report["data"]["sequences"] == 3
    assert report["data"]["loss_tokens"] < report["data"]["tokens"]  # prompts carry no loss


# ---- export: equality with references ---------------------------------------------------------------------


def test_export_block_equals_forced_routing_and_base_without_layers(base, tmp_path):
    model = _routed(base, [1, 2, 3], [0.2, 0.8, 0.6])
    exported = export_static(model, min_capacity=0.5)
    assert type(exported) is LlamaForCausalLM
    assert exported.config.dlo_export["kept"] == [0, 2, 3] and exported.config.dlo_export["dropped"] == [1]
    save_export(exported, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no trust_remote_code
    assert type(loaded) is LlamaForCausalLM
    assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == [0, 1, 2]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and "dlo_routing" not in cfg and "auto_map" not in cfg
    assert cfg["dlo_export"]["dropped"] == [1]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert not any("router" in k or "score_quantiles" in k or k.endswith(".capacity") for k in keys)
    assert not any(k.startswith("model.layers.3.") for k in keys)

    ids, mask = _batch()
    valid = mask.bool()
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask, use_cache=False).logits
        with dlo.forced_routing(model, "run", layers=[2, 3]), dlo.forced_routing(model, "skip", layers=[1]):
            forced = model(ids, attention_mask=mask, use_cache=False).logits
        plain = _without_layers(base, [1])(ids, attention_mask=mask, use_cache=False).logits
        routed_as_is = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[valid], forced[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[valid], plain[valid], atol=ATOL, rtol=0)
    assert (got[valid] - routed_as_is[valid]).abs().max() > 1e-3  # the references are not trivially equal


def test_export_mlp_granularity_drops_the_whole_layer(base):
    model = _routed(base, [0, 2], [0.1, 0.9], granularity="mlp")
    exported = export_static(model, min_capacity=0.5)
    ids, mask = _batch()
    valid = mask.bool()
    with torch.no_grad():
        got = exported(ids, attention_mask=mask, use_cache=False).logits
        want = _without_layers(base, [0])(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)
    assert exported.config.dlo_export["granularity"] == "mlp"


def test_export_merges_lora_first(base):
    from peft import LoraConfig, get_peft_model

    model = _routed(base, [1, 3], [0.2, 0.9])
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask = _batch()
    valid = mask.bool()
    with torch.no_grad(), dlo.forced_routing(peft_model, "run", layers=[3]), \
            dlo.forced_routing(peft_model, "skip", layers=[1]):
        want = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        without_lora = _without_layers(base, [1])(ids, attention_mask=mask, use_cache=False).logits
    exported = export_static(peft_model, min_capacity=0.5)
    assert not any("lora" in k for k in exported.state_dict())
    with torch.no_grad():
        got = exported(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)
    assert (got[valid] - without_lora[valid]).abs().max() > 1e-3  # the adapters really changed the weights


def test_export_keeps_tied_embeddings_tied(tiny_llama_config, tmp_path):
    tiny_llama_config.tie_word_embeddings = True
    base = LlamaForCausalLM(tiny_llama_config).eval()
    exported = export_static(_routed(base, [2], [0.1]), min_capacity=0.5)
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    save_export(exported, tmp_path / "tied")
    again = export_static(AutoModelForCausalLM.from_pretrained(tmp_path / "tied"), num_layers=2,
                          similarity=[0.1, 0.2, 0.9])
    assert again.config.dlo_export["previous"]["dropped"] == [2] and again.config.dlo_export["dropped"] == [2]
    ids, mask = _batch()
    with torch.no_grad():
        got = again(ids, attention_mask=mask, use_cache=False).logits
        want = _without_layers(base, [2, 3])(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=0)


def test_export_leaves_the_source_model_intact(base):
    model = _routed(base, [1], [0.2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exported = export_static(model, min_capacity=0.5)
    for p in exported.parameters():
        p.data.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(dlo.routed_layers(model)) == 1


# ---- export: layer selection -----------------------------------------------------------------------------


def test_select_layers_rules():
    usage = {1: 0.2, 2: 0.8, 3: 0.6}
    assert select_layers(4, usage, min_capacity=0.5) == [0, 2, 3]
    assert select_layers(4, usage, min_capacity=0.9) == [0]  # every routed layer dropped: allowed
    assert select_layers(4, usage, num_layers=2) == [0, 2]
    assert select_layers(4, usage, num_layers=4) == [0, 1, 2, 3]
    # Equal capacities: measured similarity decides (lower similarity = changes tokens more = kept) ...
    tied = {1: 0.5, 2: 0.5, 3: 0.5}
    assert select_layers(4, tied, num_layers=2, similarity=[0.1, 0.9, 0.95, 0.3]) == [0, 3]
    # ... else position: the earlier layer stays.
    assert select_layers(4, tied, num_layers=2) == [0, 1]
    # No routers: only similarity can rank layers.
    assert select_layers(4, {}, num_layers=2, similarity=[0.5, 0.9, 0.2, 0.99]) == [0, 2]


@pytest.mark.parametrize("kwargs, match", [
    ({"usage": {}, "min_capacity": 0.5}, "has no routers"),
    ({"usage": {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, "min_capacity": 0.5}, "would drop every layer"),
    ({"usage": {1: 0.5}, "min_capacity": 1.5}, r"min_capacity=1.5: must be in \(0, 1\]"),
    ({"usage": {1: 0.5}, "min_capacity": 0.0}, r"min_capacity=0.0"),
    ({"usage": {1: 0.5}, "num_layers": 0}, r"num_layers=0: must be in \[1, 4\]"),
    ({"usage": {1: 0.5}, "num_layers": 5}, r"num_layers=5"),
    ({"usage": {}, "num_layers": 2}, "only be ranked by measured similarity"),
    ({"usage": {1: 0.5}}, "exactly one of"),
    ({"usage": {1: 0.5}, "min_capacity": 0.5, "num_layers": 2}, "exactly one of"),
])
def test_select_layers_bad_inputs(kwargs, match):
    usage = kwargs.pop("usage")
    with pytest.raises(ValueError, match=match):
        select_layers(4, usage, **kwargs)


def test_export_plain_model_by_num_layers(base):
    exported = export_static(copy.deepcopy(base), num_layers=3, similarity=[0.2, 0.3, 0.99, 0.4])
    ids, mask = _batch()
    with torch.no_grad():
        got = exported(ids, attention_mask=mask, use_cache=False).logits
        want = _without_layers(base, [2])(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="has no routers"):
        export_static(copy.deepcopy(base), min_capacity=0.5)


def test_forced_routing_rejects_unknown_layers(base):
    model = _routed(base, [1], [0.5])
    with pytest.raises(ValueError, match=r"layers \[2\] are not routed"):
        with dlo.forced_routing(model, "run", layers=[2]):
            pass


# ---- export: atomic writes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_export_leaves_nothing(base, tokenizer, tmp_path, monkeypatch, error):
    exported = export_static(_routed(base, [1], [0.2]), min_capacity=0.5)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)  # the weights are already written by then
    with pytest.raises(type(error)):
        save_export(exported, tmp_path / "out", tokenizer, {"x": 1})
    assert os.listdir(tmp_path) == []

    # Over an existing output with force: the previous export survives the failure untouched.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous")
    with pytest.raises(type(error)):
        save_export(exported, tmp_path / "out", tokenizer, force=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["keep.txt"]


# ---- CLI end to end ------------------------------------------------------------------------------------------


def _realised_capacities(model_dir, records):
    """Share of valid tokens each routed layer runs on ``records`` (chat), measured in one padded batch."""
    model = dlo.load_model(model_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        records = model(**enc, use_cache=False, output_router_logits=True).routing
    valid = enc["attention_mask"].bool()
    return {layer.layer_index: (record.selected & valid).sum().item() / valid.sum().item()
            for layer, record in zip(dlo.routed_layers(model), records)}


def test_cli_export_with_data(saved, capsys):
    measured = _realised_capacities(saved / "routed", read_eval_records(str(saved / "chat.jsonl")))
    low, high = sorted(measured, key=measured.get)
    assert measured[low] < measured[high]
    threshold = (measured[low] + measured[high]) / 2  # drops exactly the less-used routed layer
    out = saved / "exported"
    rc = main(["export", "--model", str(saved / "routed"), "--output", str(out), "--min-capacity", str(threshold),
               "--data", str(saved / "chat.jsonl")])
    assert rc == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "export.json").read_text())
    assert record["usage_source"] == "measured"
    assert record["usage"] == {str(i): pytest.approx(c, abs=1e-9) for i, c in measured.items()}
    assert record["dropped"] == [low] and record["kept"] == sorted({0, 1, 2, 3} - {low})
    assert record["eval"]["before"]["loss"] > 0 and record["eval"]["after"]["loss"] > 0
    assert f"{record['eval']['before']['loss']:.4f} -> {record['eval']['after']['loss']:.4f}" in printed
    assert (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 3
    assert [f for f in os.listdir(saved) if f.startswith(".")] == []  # no temporary directory left behind


def test_cli_bad_inputs(saved, base, capsys):
    routed, missing = str(saved / "routed"), str(saved / "missing.jsonl")
    assert main(["export", "--model", routed, "--output", str(saved / "o"), "--min-capacity", "0.5",
                 "--data", missing]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err
    assert main(["report", "--model", routed, "--data", missing, "--output", str(saved / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err

    (saved / "full").mkdir()
    (saved / "full" / "x.txt").write_text("x")
    assert main(["export", "--model", routed, "--output", str(saved / "full"), "--min-capacity", "0.5"]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert main(["export", "--model", routed, "--output", str(saved / "full"), "--min-capacity", "0.5",
                 "--force"]) == 0
    assert not (saved / "full" / "x.txt").exists() and (saved / "full" / "config.json").is_file()
    capsys.readouterr()

    # Every layer of this model is routed: a threshold above every capacity is refused.
    all_routed = _routed(base, [0, 1, 2, 3], 0.3)
    all_routed.save_pretrained(saved / "all_routed")
    assert main(["export", "--model", str(saved / "all_routed"), "--output", str(saved / "o2"),
                 "--min-capacity", "0.9"]) == 2
    assert "would drop every layer" in capsys.readouterr().err
    # Routed layers 1 and 3 at 0.3/0.7: 0.9 drops both, the unrouted ones remain.
    assert main(["export", "--model", routed, "--output", str(saved / "o3"), "--min-capacity", "0.9"]) == 0
    assert "every routed layer dropped" in capsys.readouterr().out

    base.save_pretrained(saved / "plain")
    assert main(["export", "--model", str(saved / "plain"), "--output", str(saved / "o4"),
                 "--min-capacity", "0.5"]) == 2
    assert "has no routers" in capsys.readouterr().err
    assert main(["export", "--model", str(saved / "plain"), "--output", str(saved / "o4"), "--num-layers", "2"]) == 2
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither rule given: argparse refuses
        main(["export", "--model", routed, "--output", str(saved / "o5")])
    assert not any((saved / name).exists() for name in ("o", "o2", "o4", "o5", "r"))

    (saved / "bad.jsonl").write_text('{"text": "the cat"}\n{"nothing": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: record 2 needs"):
        read_eval_records(str(saved / "bad.jsonl"))
    (saved / "bad.jsonl").write_text('{"text": "the cat"}\n\nnot json\n')  # the line number counts blank lines
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        read_eval_records(str(saved / "bad.jsonl"))
    (saved / "bad.jsonl").write_text('{"prompt": "the cat"}\n')  # a prompt without its completion
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1 needs"):
        read_eval_records(str(saved / "bad.jsonl"))


def test_cli_generate_routed_and_exported(saved, capsys):
    routed = str(saved / "routed")
    assert main(["generate", "--model", routed, "--prompt", "the cat sat", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    completion, _, shares = printed.partition("\n\n")

    # Independent greedy loop with full cache-free forwards.
    model = dlo.load_model(routed).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(routed)
    ids = tok("the cat sat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert completion.strip() == tok.decode(ids[0, 3:], skip_special_tokens=True).strip()
    assert "layers run per generated token (of 4; 2 routed)" in shares
    counts = [int(line.split()[-2].split("/")[0]) for line in shares.splitlines()[1:-1]]
    assert len(counts) == 4 and all(2 <= n <= 4 for n in counts)  # the 2 unrouted layers always run

    main(["export", "--model", routed, "--output", str(saved / "exp"), "--num-layers", "3"])
    capsys.readouterr()
    assert main(["generate", "--model", str(saved / "exp"), "--prompt", "the cat", "--chat",
                 "--max-new-tokens", "3", "--temperature", "0.8"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() and "layers run per generated token" not in printed


def test_cli_on_a_lora_adapter_and_on_plain_models(saved, capsys):
    """An adapter directory is merged before export; a plain (exported) model is reported and re-exported."""
    from peft import LoraConfig, get_peft_model

    routed = dlo.load_model(saved / "routed")
    peft_model = get_peft_model(routed, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(saved / "adapter")
    assert json.loads((saved / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        saved / "routed")
    assert main(["export", "--model", str(saved / "adapter"), "--output", str(saved / "merged"),
                 "--min-capacity", "0.5"]) == 0
    want = export_static(peft_model, min_capacity=0.5).state_dict()
    got = AutoModelForCausalLM.from_pretrained(saved / "merged").state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)

    plain, data = str(saved / "merged"), str(saved / "text.jsonl")
    assert main(["report", "--model", plain, "--data", data, "--output", str(saved / "rep_plain"),
                 "--repeats", "1", "--warmup", "0"]) == 0
    report = json.loads((saved / "rep_plain" / "report.json").read_text())
    assert report["model"]["routed_layers"] == [] and report["model"]["granularity"] is None
    assert report["timing"]["prefill"]["routed_s"] is None and report["eval"]["dense_loss"] is None
    assert report["flops"]["per_token"]["routed"]["total"] == report["flops"]["per_token"]["dense_expanded"]["total"]
    assert sorted(report["plots"]) == ["capacity.png", "flops.png", "timing.png"]
    # A plain model is cut by measured similarity: the layer that changes its tokens least goes.
    similarity = [row["similarity"] for row in report["layers"]]
    assert main(["export", "--model", plain, "--output", str(saved / "cut"), "--num-layers", "2", "--data", data]) == 0
    record = json.loads((saved / "cut" / "export.json").read_text())
    assert record["dropped"] == [similarity.index(max(similarity))]
    assert "unrouted (ranked by measured similarity)" in capsys.readouterr().out


def test_multi_turn_chat_and_prompt_completion_records(tokenizer):
    record = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"},
                           {"role": "user", "content": "on"}, {"role": "assistant", "content": "the mat"}]}
    ids, labels = encode(record, tokenizer, max_length=64)
    full = tokenizer(tokenizer.apply_chat_template(record["messages"], tokenize=False), add_special_tokens=False)
    assert ids == full["input_ids"]
    counted = tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE])
    assert counted == ["sat", "</s>", "the", "mat", "</s>"]
    ids, labels = encode({"prompt": "the cat", "completion": "sat on"}, tokenizer, max_length=64)
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", "cat", "sat", "on", "</s>"]
    assert labels[:2] == [IGNORE, IGNORE] and labels[2:] == ids[2:]
