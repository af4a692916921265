"""Shared-weight repetitions against copied expansions: forward at init, one training step, memory, save/load."""

import copy
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import dlo
from dlo.errors import UserError
from dlo.expansion import ExpansionPlan, expand_model
from dlo.modeling import decoder_layers, materialise_repetitions
from dlo.sharing import ResidualScale, ScaledProjection

ATOL = 1e-6
PLANS = {  # every strategy on the 4-layer fixture
    "llama-pro": lambda init, shared: ExpansionPlan.llama_pro(4, 2, init=init, shared=shared),
    "dus": lambda init, shared: ExpansionPlan.dus(4, 1, init=init, shared=shared),
    "idus": lambda init, shared: ExpansionPlan.idus(4, 1, 2, init=init, shared=shared),
    "slices": lambda init, shared: ExpansionPlan.slices("0-3,1-4", init=init, shared=shared),
    "mergekit": lambda init, shared: ExpansionPlan.from_mergekit(MERGEKIT, init=init, shared=shared),
}
MERGEKIT = """
merge_method: passthrough
slices:
  - sources: [{model: tiny, layer_range: [0, 3]}]
  - sources: [{model: tiny, layer_range: [1, 3]}]
  - sources: [{model: tiny, layer_range: [1, 4]}]
"""


@pytest.fixture
def base(tiny_llama_config):
    return LlamaForCausalLM(tiny_llama_config).eval()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # each Parameter once, as an optimizer sees them


def repetitions(model) -> int:
    return sum(isinstance(m, ScaledProjection) for m in model.modules()) // 2


def ids(B=2, T=10):
    return torch.randint(3, 97, (B, T))


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("strategy", sorted(PLANS))
def test_shared_equals_copied_expansion_at_init(base, strategy, init):
    copied = expand_model(copy.deepcopy(base), PLANS[strategy](init, False))
    shared = expand_model(copy.deepcopy(base), PLANS[strategy](init, True))
    n_new = len(PLANS[strategy](init, True).new_indices)
    assert repetitions(shared) == n_new > 0
    assert count(shared) == count(base) + n_new * 2 * base.config.hidden_size  # two residual scales each
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(shared(x).logits, copied(x).logits, atol=ATOL, rtol=0)
        if init == "zero":
            torch.testing.assert_close(shared(x).logits, base(x).logits, atol=ATOL, rtol=0)


def test_repetition_shares_tensors_but_not_its_cache_layer(base):
    plan = ExpansionPlan.dus(4, 1, shared=True)  # [0, 1, 2, 1, 2, 3]
    layers = decoder_layers(expand_model(copy.deepcopy(base), plan))
    assert layers[3] is not layers[1] and layers[3].self_attn.q_proj.weight is layers[1].self_attn.q_proj.weight
    assert layers[3].mlp.down_proj.weight is layers[1].mlp.down_proj.weight
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
    assert "shares layer 1" in plan.to_table().splitlines()[5]


def untied(model):
    """The reference: a copied model, each repetition owning clones of its tensors (scales kept)."""
    ref = copy.deepcopy(model)
    seen = set()
    for layer in decoder_layers(ref):
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in seen:
                    module._parameters[name] = torch.nn.Parameter(p.detach().clone())
                seen.add(id(p))
    return ref


@pytest.mark.parametrize("init, checkpointing", [("zero", False), ("copy", False), ("copy", True)])
def test_one_step_equals_copied_model_with_summed_duplicate_gradients(base, init, checkpointing):
    plan = ExpansionPlan.slices("0-3,1-4", init=init, shared=True)  # [0, 1, 2, 1, 2, 3]: 3 reuses 1, 4 reuses 2
    model = expand_model(copy.deepcopy(base), plan)
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5, label="cos"))
    if checkpointing:  # each use recomputed in backward: its gradient still reaches the one tensor
        model.activation_checkpointing_enable({"use_reentrant": False})
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    for module in model.modules():
        if isinstance(module, ResidualScale):
            torch.nn.init.uniform_(module.weight, 0.5, 1.0)
    ref = untied(model)
    x = ids(T=12)
    rep = {3: 1, 4: 2}
    layers, ref_layers = decoder_layers(model), decoder_layers(ref)
    for m in (model, ref):
        m.train()
        m(x, labels=x).loss.backward()
    with torch.no_grad():
        for j, k in rep.items():  # the reference's duplicate gradients summed into its source
            src = dict(ref_layers[k].named_parameters())
            for name, p in ref_layers[j].named_parameters():
                if not name.startswith("router.") and "residual_scale" not in name:
                    src[name.removeprefix("base_layer.")].grad += p.grad
                    shared_grad = dict(layers[k].named_parameters())[name].grad
                    torch.testing.assert_close(shared_grad, src[name].grad, atol=ATOL, rtol=0)
                    p.grad = None
        assert layers[3].self_attn.q_proj.weight.grad.abs().sum() > 0
    for m in (model, ref):
        torch.optim.SGD([p for p in m.parameters() if p.grad is not None], lr=0.5).step()
    with torch.no_grad():
        for j, k in rep.items():  # the copies follow their source, as a shared tensor does
            src = dict(ref_layers[k].named_parameters())
            for name, p in ref_layers[j].named_parameters():
                if not name.startswith("router.") and "residual_scale" not in name:
                    p.copy_(src[name])
        model.eval(), ref.eval()
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=ATOL, rtol=0)
        trained, initial = layers[1].self_attn.q_proj.weight, decoder_layers(base)[1].self_attn.q_proj.weight
        assert not torch.equal(trained, initial)


def test_memory_optimizer_and_checkpoint_are_the_base_plus_routers_and_scales(base, tmp_path):
    d = base.config.hidden_size
    model = expand_model(copy.deepcopy(base), ExpansionPlan.dus(4, 1, shared=True))  # 2 repetitions
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5))
    routers = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    assert routers == 2 * (d + 1)
    assert count(model) == count(base) + routers + 2 * 2 * d
    optimizer = torch.optim.Adam(model.parameters())
    model.train()
    x = ids()
    model(x, labels=x).loss.backward()
    optimizer.step()
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert state == 2 * count(model)  # exp_avg and exp_avg_sq of each tensor once
    model.save_pretrained(tmp_path / "shared")
    base.save_pretrained(tmp_path / "base")

    def stored(path):
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as fh:
            return {k: fh.get_slice(k).get_shape() for k in fh.keys()}

    def numel(shapes):
        return sum(torch.Size(s).numel() for s in shapes.values())

    shared, plain = stored(tmp_path / "shared"), stored(tmp_path / "base")
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("capacity", "score_quantiles")))
    assert numel(shared) == numel(plain) + routers + 2 * 2 * d + buffers + 1  # + the routing step
    assert len([k for k in shared if ".self_attn.q_proj." in k]) == 4  # each base layer's tensors once


def test_save_load_restores_the_sharing(base, tmp_path):
    model = expand_model(copy.deepcopy(base), ExpansionPlan.llama_pro(4, 2, init="copy", shared=True))
    for module in model.modules():
        if isinstance(module, ResidualScale):
            torch.nn.init.uniform_(module.weight, 0.2, 0.8)
    model.save_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
        for loaded in (dlo.load_model(tmp_path), remote):
            layers = decoder_layers(loaded.eval())
            assert layers[2].self_attn.q_proj.weight is layers[1].self_attn.q_proj.weight
            assert count(loaded) == count(model)
            torch.testing.assert_close(loaded(x).logits, want, atol=ATOL, rtol=0)
    try:  # never a silently re-initialised stock model: a refusal, or (this process ran the code) the shared model
        plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    except ValueError as err:
        assert "trust_remote_code" in str(err)
    else:
        assert decoder_layers(plain)[5].mlp.up_proj.weight is decoder_layers(plain)[4].mlp.up_proj.weight
    routed = dlo.attach_routers(dlo.load_model(tmp_path), dlo.RoutingConfig(layers="new"))
    routed.save_pretrained(tmp_path / "routed")
    again = dlo.load_model(tmp_path / "routed")
    assert decoder_layers(again)[5].mlp.up_proj.weight is decoder_layers(again)[4].mlp.up_proj.weight
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_cached_generation_equals_cache_free_with_routed_repetitions(base, granularity):
    model = expand_model(copy.deepcopy(base), ExpansionPlan.slices("0-3,1-4", init="copy", shared=True))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5, granularity=granularity))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    dlo.calibrate(model, [{"input_ids": torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(7))}],
                  progress=False)
    model.generation_config.eos_token_id = None
    model.eval()
    prompt = ids(B=2, T=6)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        records = model(seq[:, :-1], use_cache=False, output_router_logits=True).routing
    assert torch.equal(out, seq)
    assert all(0 < r.selected.float().mean() < 1 for r in records)  # the repetitions really route


def test_refusals(base, tiny_llama_config):
    with pytest.raises(ValueError, match="shared=true"):
        ExpansionPlan.dus(4, 1, init="slerp", shared=True)
    with pytest.raises(ValueError, match="shared="):
        ExpansionPlan.dus(4, 1, shared="yes")
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(UserError, match="Gemma2DecoderLayer.*shared=false"):
        expand_model(gemma2, ExpansionPlan.dus(2, 0, shared=True))


def routed_shared(base, init="copy"):
    """[0, 1, 2, 1, 2, 3] with the repetitions (3, 4) routed, scales and routers away from their init."""
    model = expand_model(copy.deepcopy(base), ExpansionPlan.slices("0-3,1-4", init=init, shared=True))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5))
    for module in model.modules():
        if isinstance(module, ResidualScale):
            torch.nn.init.uniform_(module.weight, 0.2, 0.8)
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return model.eval()


def test_materialised_export_loads_plain_with_the_same_logits(base, tmp_path):
    model = routed_shared(base)
    x = ids()
    with torch.no_grad(), dlo.forced_routing(model, "run"):  # what a kept routed layer becomes: every token, g = 1
        want = model(x).logits
    exported = dlo.export_static(model, num_layers=6)
    assert type(exported) is LlamaForCausalLM and not any(isinstance(m, ScaledProjection) for m in exported.modules())
    layers = decoder_layers(exported)
    assert layers[3].self_attn.q_proj.weight.data_ptr() != layers[1].self_attn.q_proj.weight.data_ptr()
    memory = exported.config.dlo_export["memory"]
    assert memory["source"]["parameters"] == count(model)
    assert memory["export"]["parameters"] == count(expand_model(copy.deepcopy(base), ExpansionPlan.slices("0-3,1-4")))
    exported.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(plain) is LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain(x).logits, want, atol=1e-5, rtol=0)


def test_export_keeping_the_sharing(base, tmp_path):
    model = routed_shared(base)
    x = ids()
    with torch.no_grad(), dlo.forced_routing(model, "run"), dlo.forced_routing(model, "skip", layers=[4]):
        want = model(x).logits
    dlo.set_capacity(model, [0.9, 0.1])  # layer 4 is the least used: dropped
    exported = dlo.export_static(model, num_layers=5, keep_shared=True)
    assert exported.config.dlo_export["dropped"] == [4]
    assert exported.config.dlo_export["repetitions"] == {"shared": {"3": 1}, "materialised": []}
    layers = decoder_layers(exported)
    assert layers[3].self_attn.q_proj.weight is layers[1].self_attn.q_proj.weight
    assert exported.config.dlo_export["memory"]["export"]["parameters"] == count(base) + 2 * base.config.hidden_size
    exported.save_pretrained(tmp_path)
    loaded = dlo.load_model(tmp_path)
    assert decoder_layers(loaded)[3].mlp.gate_proj.weight is decoder_layers(loaded)[1].mlp.gate_proj.weight
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.eval()(x).logits, want, atol=1e-5, rtol=0)


def test_per_repetition_lora_relaxes_the_sharing_and_merges_into_its_own_copy(base):
    from peft import LoraConfig, get_peft_model

    model = routed_shared(base)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj", "down_proj"],
                                            modules_to_save=["router", "residual_scale"], task_type="CAUSAL_LM"))
    layers = decoder_layers(lora)
    assert layers[3].self_attn.q_proj.lora_A is not layers[1].self_attn.q_proj.lora_A  # an adapter per repetition
    assert layers[3].self_attn.q_proj.base_layer.weight is layers[1].self_attn.q_proj.base_layer.weight
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("residual_scale" in n for n in trainable) and any(".router." in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    lora.train()
    x = ids()
    lora(input_ids=x, labels=x).loss.backward()
    torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1.0).step()
    lora.eval()
    with torch.no_grad(), dlo.forced_routing(lora, "run"):
        want = lora(input_ids=x).logits
    exported = dlo.export_static(lora, num_layers=6)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, want, atol=1e-5, rtol=0)


def test_materialising_in_place_gives_the_copied_model(base, tmp_path):
    model = routed_shared(base)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    materialise_repetitions(model)
    assert not any(isinstance(m, (ScaledProjection, ResidualScale)) for m in model.modules())
    assert count(model) == count(expand_model(copy.deepcopy(base), ExpansionPlan.slices("0-3,1-4"))) + 2 * 65
    model.save_pretrained(tmp_path / "routed")
    unrouted = materialise_repetitions(expand_model(copy.deepcopy(base), ExpansionPlan.dus(4, 1, shared=True)))
    assert type(unrouted) is LlamaForCausalLM
    unrouted.save_pretrained(tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(dlo.load_model(tmp_path / "routed").eval()(x).logits, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")(x).logits,
                                   unrouted(x).logits, atol=ATOL, rtol=0)


def test_cli_expand_shared_mergekit_stores_each_layer_once(base, tmp_path, capsys):
    from dlo.cli import main as cli_main

    base.save_pretrained(tmp_path / "base")
    (tmp_path / "tokenizer.json").write_text("{}")
    config = tmp_path / "merge.yml"
    config.write_text(MERGEKIT.replace("tiny", str(tmp_path / "base")) + "dtype: bfloat16\n")
    assert cli_main(["expand", "--mergekit", str(config), "--shared", "--init", "zero",
                     "--output", str(tmp_path / "shared")]) == 0
    printed = capsys.readouterr().out
    assert "yes, shares layer 1" in printed and "shared repetitions" in printed
    assert cli_main(["expand", "--mergekit", str(config), "--output", str(tmp_path / "copied")]) == 0
    got = dlo.load_model(tmp_path / "shared")
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).eval()  # rotary in fp32
    want = expand_model(copy.deepcopy(bf16), PLANS["mergekit"]("zero", True))
    assert got.dtype == torch.bfloat16
    assert decoder_layers(got)[3].mlp.up_proj.weight is decoder_layers(got)[1].mlp.up_proj.weight
    with torch.no_grad():
        x = ids()
        torch.testing.assert_close(got.eval()(x).logits, want(x).logits, atol=0, rtol=0)
        torch.testing.assert_close(got(x).logits, bf16(x).logits, atol=0, rtol=0)  # scales 0: the base

    def stored(name):
        return os.path.getsize(tmp_path / name / "model.safetensors")

    layer = sum(p.numel() for p in decoder_layers(base)[0].parameters()) * 2  # bf16 bytes
    assert stored("copied") - stored("shared") > 4 * layer - 4 * 2 * 64 * 2  # 4 repeated layers, less their scales
    assert cli_main(["expand", "--mergekit", str(config), "--shared", "--init", "slerp",
                     "--output", str(tmp_path / "x")]) == 2
    assert "--init='slerp' with --shared" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_report_and_flops_count_repetitions_as_the_copied_layers(base):
    from dlo.report import build_report

    model = routed_shared(base)
    copied = untied(model)  # the same function with copied tensors: the same decisions
    x = ids(B=2, T=12)
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}]
    shared_report, _ = build_report(model, batches, repeats=1, warmup=0, num_examples=0, progress=False)
    copied_report, _ = build_report(copied, batches, repeats=1, warmup=0, num_examples=0, progress=False)
    assert shared_report["flops"] == copied_report["flops"]
    assert [layer["capacity"] for layer in shared_report["layers"]] == [layer["capacity"] for layer in
                                                                         copied_report["layers"]]
    assert 0 < shared_report["layers"][3]["capacity"] < 1
