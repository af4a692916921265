"""Depth expansion against hand-written layer maps, direct tensor computations and the base model."""

import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import dlo
from dlo.cli import main as cli_main
from dlo.expansion import ExpansionPlan, expand_model, slerp
from dlo.expansion_io import expand_checkpoint

ATOL = 1e-5


def sources(plan):
    return [spec.base_index for spec in plan.layers]


def new_positions(plan):
    return [j for j, spec in enumerate(plan.layers) if spec.is_new]


def layer_state(model, i):
    return model.model.layers[i].state_dict()


def assert_same_tensors(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def tiny(config_cls, **overrides):
    """A 4-layer config of ``config_cls`` shaped like the ``tiny_llama_config`` fixture."""
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    return config_cls(**{**kwargs, **overrides})


@pytest.fixture
def base(tiny_llama_config):
    return LlamaForCausalLM(tiny_llama_config).eval()


def ids(vocab=97, B=2, T=9):
    return torch.randint(0, vocab, (B, T))


# -- layer maps (DESIGN.md §2.1), written out by hand ----------------------------------------

def test_llama_pro_n32_g8():
    plan = ExpansionPlan.llama_pro(num_layers=32, groups=8)
    assert sources(plan) == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 11, 12, 13, 14, 15, 15,
                             16, 17, 18, 19, 19, 20, 21, 22, 23, 23, 24, 25, 26, 27, 27, 28, 29, 30, 31, 31]
    assert new_positions(plan) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert [plan.layers[j].init for j in new_positions(plan)] == ["zero"] * 8  # llama-pro's default
    assert {spec.init for spec in plan.layers if not spec.is_new} == {"copy"}


def test_dus_n32_m8():
    plan = ExpansionPlan.dus(num_layers=32, overlap=8)
    assert len(plan.layers) == 48
    assert sources(plan) == list(range(0, 24)) + list(range(8, 32))
    assert new_positions(plan) == list(range(24, 40))  # base 8..23 a second time
    assert {spec.init for spec in plan.layers} == {"copy"}


def test_idus_n32_m8_g8():
    plan = ExpansionPlan.idus(num_layers=32, overlap=8, group_size=8)
    assert sources(plan) == [*range(0, 8), *range(8, 16), *range(8, 16), *range(16, 24), *range(16, 24),
                             *range(24, 32)]
    assert new_positions(plan) == [*range(16, 24), *range(32, 40)]


def test_idus_group_size_1_is_reachable():
    plan = ExpansionPlan.idus(num_layers=5, overlap=1, group_size=1)  # A = 0..3, B = 1..4
    assert sources(plan) == [0, 1, 1, 2, 2, 3, 3, 4]
    assert new_positions(plan) == [2, 4, 6]


def test_idus_uneven_last_chunk():
    plan = ExpansionPlan.idus(num_layers=7, overlap=2, group_size=3)  # A = 0..4, B = 2..6
    assert sources(plan) == [0, 1, 2, 2, 3, 4, 3, 4, 5, 6]
    assert new_positions(plan) == [3, 6, 7]


@pytest.mark.parametrize("n, groups, want, new", [
    (6, 3, [0, 1, 1, 2, 3, 3, 4, 5, 5], [2, 5, 8]),
    (5, 5, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], [1, 3, 5, 7, 9]),
    (7, 1, [0, 1, 2, 3, 4, 5, 6, 6], [7]),
])
def test_llama_pro_small(n, groups, want, new):
    plan = ExpansionPlan.llama_pro(num_layers=n, groups=groups, init="copy")
    assert sources(plan) == want and new_positions(plan) == new


@pytest.mark.parametrize("n, m, want, new", [
    (5, 2, [0, 1, 2, 2, 3, 4], [3]),
    (3, 0, [0, 1, 2, 0, 1, 2], [3, 4, 5]),
    (5, 1, [0, 1, 2, 3, 1, 2, 3, 4], [4, 5, 6]),
])
def test_dus_small(n, m, want, new):
    plan = ExpansionPlan.dus(num_layers=n, overlap=m)
    assert sources(plan) == want and new_positions(plan) == new


def test_slices_maps():
    plan = ExpansionPlan.slices([(0, 16), (8, 24), (16, 32)])
    assert sources(plan) == [*range(0, 16), *range(8, 24), *range(16, 32)]
    assert new_positions(plan) == [*range(16, 24), *range(32, 40)]
    small = ExpansionPlan.slices("2-5,0-3", init="zero")
    assert sources(small) == [2, 3, 4, 0, 1, 2]
    assert new_positions(small) == [5] and small.layers[5].init == "zero" and small.layers[0].init == "copy"


def test_build_dispatches_like_the_constructors():
    assert ExpansionPlan.build("dus", 32, overlap=8) == ExpansionPlan.dus(32, 8)
    assert ExpansionPlan.build("slices", ranges=[(0, 2)]) == ExpansionPlan.slices([(0, 2)])


# -- plain data: table, dict, files ----------------------------------------------------------

def test_table_lists_every_layer():
    lines = ExpansionPlan.llama_pro(num_layers=4, groups=2).to_table().splitlines()
    assert lines[0].startswith("llama-pro (groups=2, init=zero): 4 -> 6 layers, 2 new")
    rows = [line.split() for line in lines[2:]]
    assert rows == [["0", "0", "copy"], ["1", "1", "copy"], ["2", "1", "zero", "yes"],
                    ["3", "2", "copy"], ["4", "3", "copy"], ["5", "3", "zero", "yes"]]


@pytest.mark.parametrize("ext", ["json", "yaml", "yml"])
def test_save_load_roundtrip(tmp_path, ext):
    plan = ExpansionPlan.idus(num_layers=7, overlap=2, group_size=3, init="slerp")
    plan.save(str(tmp_path / f"plan.{ext}"))
    assert ExpansionPlan.load(str(tmp_path / f"plan.{ext}")) == plan
    assert ExpansionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_plan_file_extension_checked(tmp_path):
    with pytest.raises(ValueError, match=r"'\.txt'.*\.json, \.yaml, \.yml"):
        ExpansionPlan.dus(4, 1).save(str(tmp_path / "plan.txt"))


# -- expand_model ----------------------------------------------------------------------------

def test_tensors_equal_their_source_and_own_their_storage(base):
    reference = copy.deepcopy(base)
    plan = ExpansionPlan.dus(num_layers=4, overlap=1)  # 0 1 2 1 2 3
    model = expand_model(base, plan)
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    for j, i in enumerate([0, 1, 2, 1, 2, 3]):
        assert_same_tensors(layer_state(model, j), layer_state(reference, i))
        assert model.model.layers[j].self_attn.layer_idx == j
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(storages) == len(set(storages))
    with torch.no_grad():  # writing into a copy leaves its source alone
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, reference.model.layers[1].mlp.up_proj.weight)


def test_provenance_recorded_and_saved(base, tmp_path):
    model = expand_model(base, ExpansionPlan.llama_pro(num_layers=4, groups=2))
    want = {"strategy": "llama-pro", "params": {"groups": 2, "init": "zero"}, "base_num_layers": 4,
            "layers": [{"source": 0, "init": "copy", "new": False}, {"source": 1, "init": "copy", "new": False},
                       {"source": 1, "init": "zero", "new": True}, {"source": 2, "init": "copy", "new": False},
                       {"source": 3, "init": "copy", "new": False}, {"source": 3, "init": "zero", "new": True}]}
    assert model.config.dlo_expansion == want
    model.save_pretrained(tmp_path)  # safetensors refuses shared storage
    with open(tmp_path / "config.json") as fh:
        saved = json.load(fh)
    assert saved["dlo_expansion"] == want and saved["num_hidden_layers"] == 6
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LlamaForCausalLM
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_zero_init_llama_pro_equals_base(base):
    x = ids()
    with torch.no_grad():
        want = base(x).logits
        copied = expand_model(copy.deepcopy(base), ExpansionPlan.llama_pro(4, 2, init="copy"))(x).logits
        model = expand_model(base, ExpansionPlan.llama_pro(4, 2, init="zero"))
        got = model(x).logits
    assert (copied - want).abs().max() > 1e-3  # a duplicated layer does change the output...
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)  # ...unless its residual writes are zero
    for j in (2, 5):
        layer = model.model.layers[j]
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.mlp.up_proj.weight.any()


def test_kv_cache_decoding_after_expansion(base):
    """Renumbered layer_idx: incremental decoding with a cache matches the cache-free forward."""
    model = expand_model(base, ExpansionPlan.idus(num_layers=4, overlap=1, group_size=2))
    x = ids(B=1, T=8)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :5], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(5, 8):
            out = model(x[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=ATOL, rtol=0)


def test_merge_linear_is_the_mean_with_the_previous_base_layer(base):
    reference = copy.deepcopy(base)
    model = expand_model(base, ExpansionPlan.llama_pro(4, 2, init="merge-linear"))
    for j, i in ((2, 1), (5, 3)):
        prev, cur = layer_state(reference, i - 1), layer_state(reference, i)
        for key, got in layer_state(model, j).items():
            torch.testing.assert_close(got, (prev[key] + cur[key]) * 0.5, atol=1e-7, rtol=0)


def slerp_half_direct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """slerp at t=1/2 in float64: sin(θ/2)/sin(θ) · (a + b), θ the angle between a and b."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    theta = math.acos(float(a64 @ b64 / (a64.norm() * b64.norm())))
    return (math.sin(theta / 2) / math.sin(theta) * (a64 + b64)).reshape(a.shape)


def test_slerp_against_direct_computation(base):
    reference = copy.deepcopy(base)
    model = expand_model(base, ExpansionPlan.dus(4, 1, init="slerp"))  # new: positions 3, 4 (base 1, 2)
    for j, i in ((3, 1), (4, 2)):
        prev, cur = layer_state(reference, i - 1), layer_state(reference, i)
        for key, got in layer_state(model, j).items():
            if "layernorm" in key:  # all ones in both layers: parallel, the linear fallback
                torch.testing.assert_close(got, (prev[key] + cur[key]) / 2)
            else:
                torch.testing.assert_close(got.double(), slerp_half_direct(prev[key], cur[key]), atol=1e-6, rtol=1e-5)
                assert not torch.allclose(got, (prev[key] + cur[key]) / 2, atol=1e-6)  # really spherical


def test_slerp_cases():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(a, b), torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))  # stays on the circle
    torch.testing.assert_close(slerp(a, 3 * a), 2 * a)  # parallel: linear
    torch.testing.assert_close(slerp(a, -a), torch.zeros(2))  # anti-parallel: linear
    torch.testing.assert_close(slerp(torch.zeros(2), b), b / 2)  # zero vector: linear
    half = slerp(a.bfloat16(), b.bfloat16())
    assert half.dtype == torch.bfloat16


def test_mistral_zero_init_identity():
    base = MistralForCausalLM(tiny(MistralConfig, sliding_window=4)).eval()
    x = ids(T=10)
    with torch.no_grad():
        want = base(x).logits
        model = expand_model(base, ExpansionPlan.llama_pro(4, 4))
        got = model(x).logits
    assert sources(ExpansionPlan.from_dict(model.config.dlo_expansion)) == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_qwen2_layer_types_follow_the_map(tmp_path):
    base = Qwen2ForCausalLM(tiny(Qwen2Config, use_sliding_window=True, sliding_window=3,
                                 max_window_layers=2)).eval()
    assert base.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    reference = copy.deepcopy(base)
    model = expand_model(base, ExpansionPlan.slices([(2, 4), (0, 3)]))
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention",
                                        "full_attention", "sliding_attention"]
    for j, i in enumerate([2, 3, 0, 1, 2]):
        assert_same_tensors(layer_state(model, j), layer_state(reference, i))  # q/k/v biases included
        assert model.model.layers[j].self_attn.sliding_window == (3 if i >= 2 else None)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(T=10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_qwen2_zero_init_with_biases():
    base = Qwen2ForCausalLM(tiny(Qwen2Config)).eval()
    x = ids()
    with torch.no_grad():
        want = base(x).logits
        got = expand_model(base, ExpansionPlan.llama_pro(4, 2))(x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# -- the CLI, streaming a checkpoint ---------------------------------------------------------

SIDE_FILES = {"tokenizer.json": '{"version": "1.0", "dummy": true}', "tokenizer_config.json": '{"x": 1}',
              "special_tokens_map.json": "{}"}


def save_base(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    return path


def run_cli(*argv):
    return cli_main(["expand", *map(str, argv)])


def assert_state_equal(got_model, want_model):
    got, want = got_model.state_dict(), want_model.state_dict()
    assert_same_tensors(got, want)


def test_cli_end_to_end_equals_expand_model(base, tmp_path, capsys):
    src = save_base(base, tmp_path / "base")
    out = tmp_path / "out" / "expanded"
    assert run_cli("--model", src, "--strategy", "llama-pro", "--groups", 2, "--output", out) == 0
    printed = capsys.readouterr().out
    want = expand_model(LlamaForCausalLM.from_pretrained(src).eval(), ExpansionPlan.llama_pro(4, 2))
    assert f"parameters: {base.num_parameters():,} -> {want.num_parameters():,}" in printed
    assert "    2     1  zero          yes" in printed
    got = AutoModelForCausalLM.from_pretrained(out)
    assert type(got) is LlamaForCausalLM
    assert_state_equal(got, want)
    assert got.config.dlo_expansion == want.config.dlo_expansion
    for name, text in SIDE_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").is_file()
    assert sorted(os.listdir(out.parent)) == ["expanded"]  # no temp dir left behind


@pytest.mark.parametrize("init", ["zero", "merge-linear", "slerp"])
def test_streaming_sharded_equals_expand_model(base, tmp_path, init):
    src = save_base(base, tmp_path / "base", max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()  # the input is sharded too
    plan = ExpansionPlan.dus(4, 1, init=init)
    counts = expand_checkpoint(str(src), plan, str(tmp_path / "out"), max_shard_bytes=100_000)
    with open(tmp_path / "out" / "model.safetensors.index.json") as fh:
        index = json.load(fh)
    assert len(set(index["weight_map"].values())) > 2
    want = expand_model(LlamaForCausalLM.from_pretrained(src), plan)
    assert counts == {"before": base.num_parameters(), "after": want.num_parameters()}
    assert_state_equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), want)


def test_cli_tied_embeddings(tiny_llama_config, tmp_path):
    tiny_llama_config.tie_word_embeddings = True
    base = LlamaForCausalLM(tiny_llama_config).eval()
    src = save_base(base, tmp_path / "base")
    assert run_cli("--model", src, "--strategy", "idus", "--overlap", 1, "--group-size", 2,
                   "--output", tmp_path / "out") == 0
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in saved  # still tied, not duplicated
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    want = expand_model(base, ExpansionPlan.idus(4, 1, 2))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, want(x).logits, atol=0, rtol=0)


MERGEKIT_YAML = """\
slices:
  - sources:
      - model: {model}
        layer_range: [0, 3]
  - sources:
      - model: {model}
        layer_range: [1, 4]
  - sources:
      - model: {model}
        layer_range: [3, 4]
merge_method: passthrough
dtype: {dtype}
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mergekit_passthrough_equivalence(base, tmp_path, dtype):
    src = save_base(base, tmp_path / "base")
    config = tmp_path / "merge.yml"
    config.write_text(MERGEKIT_YAML.format(model=src, dtype=dtype))
    assert run_cli("--model", src, "--mergekit", config, "--output", tmp_path / "out") == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    # What passthrough writes, built by hand from the YAML's ranges: layers 0-2, 1-3, 3, renumbered;
    # everything outside the layers unchanged; every tensor in the YAML's dtype.
    want, base_state = {}, base.state_dict()
    for j, i in enumerate([0, 1, 2, 1, 2, 3, 3]):
        for key, tensor in layer_state(base, i).items():
            want[f"model.layers.{j}.{key}"] = tensor
    want.update({k: v for k, v in base_state.items() if not k.startswith("model.layers.")})
    assert_same_tensors(got, {k: v.to(getattr(torch, dtype)) for k, v in want.items()})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.num_hidden_layers == 7
    assert [e["new"] for e in loaded.config.dlo_expansion["layers"]] == [False] * 3 + [True, True, False, True]


def test_from_mergekit_path_or_text(tmp_path):
    text = MERGEKIT_YAML.format(model="org/base", dtype="bfloat16")
    (tmp_path / "m.yaml").write_text(text)
    plan = ExpansionPlan.from_mergekit(str(tmp_path / "m.yaml"))
    assert plan == ExpansionPlan.from_mergekit(text) == ExpansionPlan.from_mergekit(tmp_path / "m.yaml")
    assert sources(plan) == [0, 1, 2, 1, 2, 3, 3]
    assert plan.params["mergekit"] == {"model": "org/base", "dtype": "bfloat16"}


# -- bad input: clear errors, nothing written ------------------------------------------------

@pytest.mark.parametrize("build, match", [
    (lambda: ExpansionPlan.llama_pro(32, 5), r"groups=5.*divide num_layers=32.*\[1, 2, 4, 8, 16, 32\]"),
    (lambda: ExpansionPlan.llama_pro(32, 0), r"groups=0"),
    (lambda: ExpansionPlan.llama_pro(0, 1), r"num_layers=0.*positive"),
    (lambda: ExpansionPlan.dus(32, 16), r"overlap=16.*0 <= overlap < num_layers/2 = 16"),
    (lambda: ExpansionPlan.dus(32, -1), r"overlap=-1.*num_layers/2 = 16"),
    (lambda: ExpansionPlan.idus(5, 3, 1), r"overlap=3.*2\.5"),
    (lambda: ExpansionPlan.idus(32, 8, 0), r"group_size=0.*\[1, 24\]"),
    (lambda: ExpansionPlan.idus(32, 8, 25), r"group_size=25.*\[1, 24\]"),
    (lambda: ExpansionPlan.slices([]), r"no ranges"),
    (lambda: ExpansionPlan.slices([(3, 3)]), r"slice 3-3.*empty or reversed"),
    (lambda: ExpansionPlan.slices([(0, 2), (5, 2)]), r"slice 5-2.*empty or reversed"),
    (lambda: ExpansionPlan.slices([(-1, 2)]), r"slice -1-2"),
    (lambda: ExpansionPlan.slices([(0, 40)], num_layers=32), r"slice 0-40.*32-layer.*\[0, 32\]"),
    (lambda: ExpansionPlan.slices("0-16,x"), r"START-STOP.*got 'x'"),
    (lambda: ExpansionPlan.build("deep", 32), r"strategy='deep'.*llama-pro, dus, idus, slices"),
    (lambda: ExpansionPlan.dus(32, 8, init="ones"), r"init='ones'.*copy, zero, merge-linear, slerp"),
    (lambda: ExpansionPlan.llama_pro(4, 4, init="slerp"), r"init='slerp'.*base layer 0 has none"),
    (lambda: ExpansionPlan("dus", {}, [(0, "copy", False), (0, "copy", False)]), r"is_new=False.*already"),
    (lambda: ExpansionPlan.from_dict({"strategy": "dus"}), r"strategy and layers required"),
])
def test_bad_plans(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("text, match", [
    ("merge_method: slerp\nslices: []", r"merge_method='slerp'.*passthrough"),
    ("merge_method: passthrough\nmodels: [{model: a}]", r"\['models'\] are not supported"),
    ("merge_method: passthrough\nslices:\n - sources: [{model: a, layer_range: [0, 2]}]\n"
     " - sources: [{model: b, layer_range: [0, 2]}]", r"names 2 models \['a', 'b'\]"),
    ("merge_method: passthrough\nslices:\n - sources: [{model: a, layer_range: [0, 2]},"
     " {model: a, layer_range: [1, 3]}]", r"slice 0: passthrough takes exactly one source.*got 2"),
    ("merge_method: passthrough\nslices:\n - sources: [{model: a, layer_range: [0, 2],"
     " parameters: {scale: 0}}]", r"\['parameters'\].*init 'zero'"),
    ("merge_method: passthrough\nslices:\n - sources: [{model: a, layer_range: [2, 2]}]", r"slice 2-2.*empty"),
    ("merge_method: passthrough\ndtype: int8\nslices:\n - sources: [{model: a, layer_range: [0, 2]}]",
     r"dtype='int8'.*float32, float16, bfloat16"),
    ("no-such-file.yml", r"'no-such-file.yml' does not exist"),
    ("just-a-word", r"expected a YAML mapping"),
])
def test_bad_mergekit_configs(text, match):
    with pytest.raises(ValueError, match=match):
        ExpansionPlan.from_mergekit(text)


def test_expand_model_refuses(base):
    with pytest.raises(ValueError, match=r"made for a 32-layer model, this one has 4"):
        expand_model(copy.deepcopy(base), ExpansionPlan.llama_pro(32, 8))
    with pytest.raises(ValueError, match=r"base layer 5, out of range for a 4-layer model \(valid: \[0, 3\]\)"):
        expand_model(copy.deepcopy(base), ExpansionPlan.slices([(0, 6)]))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*llama, mistral, qwen2"):
        expand_model(gpt2, ExpansionPlan.dus(2, 0))
    with pytest.raises(ValueError, match=r"LlamaModel is not a causal LM"):
        expand_model(LlamaModel(base.config), ExpansionPlan.dus(4, 1))
    expanded = expand_model(copy.deepcopy(base), ExpansionPlan.dus(4, 1))
    with pytest.raises(ValueError, match=r"already expanded"):
        expand_model(expanded, ExpansionPlan.dus(6, 1))
    routed = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers="all"))
    with pytest.raises(ValueError, match=r"already has routers"):
        expand_model(routed, ExpansionPlan.dus(4, 1))
    assert base.config.num_hidden_layers == 4 and len(base.model.layers) == 4


@pytest.mark.parametrize("argv, match", [
    (["--strategy", "deep"], r"--strategy 'deep'.*llama-pro, dus, idus, slices"),
    ([], r"--strategy is required"),
    (["--strategy", "llama-pro", "--groups", "3"], r"groups=3.*divide num_layers=4.*\[1, 2, 4\]"),
    (["--strategy", "dus", "--overlap", "2"], r"overlap=2.*num_layers/2 = 2"),
    (["--strategy", "dus", "--overlap", "-1"], r"overlap=-1"),
    (["--strategy", "dus"], r"dus needs --overlap M"),
    (["--strategy", "dus", "--overlap", "1", "--groups", "2"], r"--groups does not apply to dus"),
    (["--strategy", "slices", "--slices", "0-3,2-9"], r"slice 2-9.*4-layer.*\[0, 4\]"),
    (["--strategy", "slices", "--slices", "3-1"], r"slice 3-1.*empty or reversed"),
    (["--strategy", "dus", "--overlap", "1", "--init", "ones"], r"init='ones'.*copy, zero"),
    (["--strategy", "dus", "--overlap", "1", "--mergekit", "m.yml"], r"--mergekit.*--strategy dus"),
    (["--mergekit", "missing.yml"], r"'missing.yml' does not exist"),
])
def test_cli_bad_input_writes_nothing(base, tmp_path, capsys, argv, match):
    import re

    src = save_base(base, tmp_path / "base")
    out = tmp_path / "out" / "x"
    assert run_cli("--model", src, *argv, "--output", out) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_architecture(tmp_path, capsys):
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(src)
    assert run_cli("--model", src, "--strategy", "dus", "--overlap", 0, "--output", tmp_path / "out") == 2
    assert "model_type='gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_routed_or_expanded_checkpoints(base, tmp_path, capsys):
    src = save_base(base, tmp_path / "base")
    assert run_cli("--model", src, "--strategy", "dus", "--overlap", 1, "--output", tmp_path / "once") == 0
    assert run_cli("--model", tmp_path / "once", "--strategy", "dus", "--overlap", 1,
                   "--output", tmp_path / "twice") == 2
    assert "already expanded" in capsys.readouterr().err
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dlo_routing": {"routed_layers": [1]}}))
    assert run_cli("--model", src, "--strategy", "dus", "--overlap", 1, "--output", tmp_path / "routed") == 2
    assert "already has routers" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["base", "once"]


def test_cli_existing_output(base, tmp_path, capsys):
    src = save_base(base, tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", src, "--strategy", "dus", "--overlap", 1, "--output", out]
    assert run_cli(*args) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["base", "out"]
    assert run_cli(*args, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["base", "out"]
