"""Packed attention without per-layer dense masks: running tokens first, then plain causal SDPA.

Padded training batches and inference prefill with fillers used to build a (B, heads, K, K) mask per
routed layer; for full-attention layers under SDPA the packed batch is now ordered so that plain causal
attention is exact. The mask path stays as the reference.
"""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import dlo
from dlo.routing import RoutedDecoderLayer

ATOL = 1e-5


@pytest.fixture
def routed(tiny_llama_config):
    torch.manual_seed(0)
    model = dlo.attach_routers(LlamaForCausalLM(tiny_llama_config),
                               dlo.RoutingConfig(layers=[1, 2, 3], capacity=0.5, label="self"))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    dlo.calibrate(model, [{"input_ids": torch.randint(3, 97, (4, 32))}], progress=False)
    return model


def _padded_batch(T=24):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    mask[2, -9:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _step(model, batch, train):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    if train:
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("train", [True, False])
def test_causal_path_equals_the_mask_path(routed, monkeypatch, train):
    batch = _padded_batch()
    fast_logits, fast_grads = _step(copy.deepcopy(routed), batch, train)
    monkeypatch.setattr(RoutedDecoderLayer, "_attends_causally", lambda self, mask, routing: False)
    ref_logits, ref_grads = _step(copy.deepcopy(routed), batch, train)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(fast_logits[valid], ref_logits[valid], atol=ATOL, rtol=0)
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=ATOL, rtol=1e-4, msg=name)


def _saved_attention_sized(model, batch) -> list[tuple]:
    """Shapes of the tensors autograd keeps whose last two dims are (K, K) or (K, T) for a routed layer's K."""
    K = round(0.5 * batch["input_ids"].shape[1])
    T = batch["input_ids"].shape[1]
    seen = []

    def pack(t):
        if t.dim() == 4 and t.shape[-2] in (K, K + 1) and t.shape[-1] in (K, K + 1, T):
            seen.append(tuple(t.shape))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch, use_cache=False).loss.backward()
    return seen


def test_no_per_layer_dense_mask_is_kept_for_backward(routed, monkeypatch):
    batch = _padded_batch(T=40)
    assert _saved_attention_sized(copy.deepcopy(routed), batch) == []
    monkeypatch.setattr(RoutedDecoderLayer, "_attends_causally", lambda self, mask, routing: False)
    assert _saved_attention_sized(copy.deepcopy(routed), batch), "the probe sees nothing: it tests nothing"


def test_sliding_window_and_eager_layers_keep_the_mask_path(tiny_llama_config):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{k: v for k, v in tiny_llama_config.to_dict().items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")}, sliding_window=5, attn_implementation="sdpa")
    sliding = dlo.attach_routers(MistralForCausalLM(config), dlo.RoutingConfig(layers=[1], label="self"))
    eager = dlo.attach_routers(LlamaForCausalLM(tiny_llama_config).to(torch.float32),
                               dlo.RoutingConfig(layers=[1], label="self"))
    eager.config._attn_implementation = "eager"
    routing = dlo.routing.RoutingInputs(training=True, token_mask=torch.ones(1, 4, dtype=torch.bool))
    assert not dlo.routed_layers(sliding)[0]._attends_causally(None, routing)
    assert not dlo.routed_layers(eager)[0]._attends_causally(None, routing)
