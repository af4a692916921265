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
from dlo.modeling import decoder_layers
from dlo.sharing import ScaledProjection

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


@pytest.mark.parametrize("init", ["zero", "copy"])
def test_one_step_equals_copied_model_with_summed_duplicate_gradients(base, init):
    plan = ExpansionPlan.slices("0-3,1-4", init=init, shared=True)  # [0, 1, 2, 1, 2, 3]: 3 reuses 1, 4 reuses 2
    model = expand_model(copy.deepcopy(base), plan)
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5, label="cos"))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    for module in model.modules():
        if isinstance(module, ScaledProjection):
            torch.nn.init.uniform_(module.residual_scale.weight, 0.5, 1.0)
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
        if isinstance(module, ScaledProjection):
            torch.nn.init.uniform_(module.residual_scale.weight, 0.2, 0.8)
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


def test_cached_generation_equals_cache_free_with_routed_repetitions(base):
    model = expand_model(copy.deepcopy(base), ExpansionPlan.slices("0-3,1-4", init="copy", shared=True))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5))
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
