"""A gradient-checkpointed training step equals the same step without checkpointing.

The recomputation in backward must take exactly the decisions of its forward: padding mask, capacities,
annealing position and the similarity refresh all reach a routed layer as inputs, and nothing that
decides routing changes between a forward and its backward.
"""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import dlo

ROUTED = [1, 3]


def _batch(vocab, B=3, T=14):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, -5:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _routed(config, granularity, label, anneal_steps):
    torch.manual_seed(0)
    model = dlo.attach_routers(LlamaForCausalLM(config), dlo.RoutingConfig(
        layers=ROUTED, capacity=0.5, granularity=granularity, label=label, anneal_steps=anneal_steps))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    return model.train()


def _steps(model, batch, steps=3):
    """Run ``steps`` SGD steps; return the gradients of the last one and the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        losses += [out.task_loss.item(), out.router_loss.item()]
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return grads, losses


@pytest.mark.parametrize("granularity", ["block", "mlp"])
@pytest.mark.parametrize("label, anneal_steps", [("self", 0), ("cos", 2), ("cos-global", 2)])
def test_checkpointed_steps_equal_plain_steps(tiny_llama_config, granularity, label, anneal_steps):
    plain = _routed(tiny_llama_config, granularity, label, anneal_steps)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    batch = _batch(tiny_llama_config.vocab_size)
    want_grads, want_losses = _steps(plain, batch)
    got_grads, got_losses = _steps(checkpointed, batch)
    assert got_losses == pytest.approx(want_losses, abs=1e-6)
    assert want_grads.keys() == got_grads.keys()
    assert all(f"model.layers.{i}.router.weight" in want_grads for i in ROUTED)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    for a, b in zip(dlo.routed_layers(plain), dlo.routed_layers(checkpointed)):
        assert torch.equal(a.capacity, b.capacity) and torch.equal(a.score_quantiles, b.score_quantiles)


def test_reentrant_checkpointing_is_refused(tiny_llama_config):
    model = _routed(tiny_llama_config, "block", "self", 0)
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=True"):
        model(**_batch(tiny_llama_config.vocab_size))
