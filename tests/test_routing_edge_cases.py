"""Exact rows in padded inference batches, and routing at the extremes of capacity and padding."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import dlo
from dlo.routing import threshold_from_quantiles

ATOL = 1e-5
ROUTED = [0, 2, 3]


@pytest.fixture
def base(tiny_llama_config):
    return LlamaForCausalLM(tiny_llama_config).eval()


def _routed(base, granularity, capacity=0.5, seed=0):
    model = dlo.attach_routers(copy.deepcopy(base),
                               dlo.RoutingConfig(layers=ROUTED, capacity=capacity, granularity=granularity))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dlo.routed_layers(model):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
            layer.router.bias.copy_(torch.randn(layer.router.bias.shape, generator=g) * 0.1)
    texts = torch.randint(3, 97, (4, 32), generator=g)
    dlo.calibrate(model, [{"input_ids": texts}], progress=False)
    return model.eval()


def _left_padded(rows):
    """A left-padded batch of token lists, with the position ids generate() gives each row."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_every_row_of_a_left_padded_batch_gets_its_own_logits(base, granularity):
    """Per-row slow reference: each row alone, unpadded. Capacities where some rows run every token."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (9, 9, 6, 3)]
    ids, mask, positions = _left_padded(rows)
    some_row_ran_all = False
    for capacity in (0.3, 0.6, 0.9, 0.97):
        model = _routed(base, granularity, capacity)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=positions, use_cache=False,
                        output_router_logits=True)
            for b, r in enumerate(rows):
                alone = model(torch.tensor([r]), use_cache=False).logits[0]
                torch.testing.assert_close(out.logits[b, -len(r):], alone, atol=ATOL, rtol=0,
                                           msg=lambda m, b=b, c=capacity: f"row {b} at capacity {c}: {m}")
        for record in out.routing:  # the packed batch is as wide as the sequence, yet some row skips
            ran = (record.selected & record.valid).sum(1)
            some_row_ran_all |= bool((ran == ids.shape[1]).any() and (ran < record.valid.sum(1)).any())
    assert some_row_ran_all, "no layer had a full row running every token beside a row that skipped"


def test_capacity_one_at_inference_runs_every_token(base):
    model = _routed(base, "block", capacity=0.5)
    for layer in dlo.routed_layers(model):  # tracked scores all above what new text will score
        layer.score_quantiles.copy_(torch.linspace(0.97, 0.99, layer.score_quantiles.numel()))
        torch.nn.init.zeros_(layer.router.weight)
        torch.nn.init.zeros_(layer.router.bias)  # every score is 0.5, below the lowest tracked score
    ids = torch.randint(3, 97, (2, 10))
    dlo.set_capacity(model, 1.0)
    with torch.no_grad():
        records = model(ids, use_cache=False, output_router_logits=True).routing
    assert all(bool(r.selected.all()) for r in records)
    dlo.set_capacity(model, 0.99)  # just below 1.0: the tracked quantiles decide again, and nobody reaches them
    with torch.no_grad():
        records = model(ids, use_cache=False, output_router_logits=True).routing
    assert not any(bool(r.selected.any()) for r in records)


def test_thresholds_at_the_ends_of_the_tracked_quantiles():
    q = torch.linspace(0.1, 0.9, 101)
    assert float(threshold_from_quantiles(q, torch.tensor(1.0))) == 0.0  # every token runs
    assert float(threshold_from_quantiles(q, torch.tensor(1e-6))) == pytest.approx(0.9, abs=1e-6)  # top score
    assert float(threshold_from_quantiles(q, torch.tensor(0.5))) == pytest.approx(0.5, abs=1e-6)  # the median
    assert float(threshold_from_quantiles(q, torch.tensor(0.995))) == pytest.approx(0.1 + 0.8 * 0.005, abs=1e-6)


def test_capacity_giving_one_token_per_row_in_training(base):
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[1], capacity=0.01)).train()
    torch.nn.init.normal_(dlo.routed_layers(model)[0].router.weight)
    ids, mask, _ = _left_padded([list(range(3, 15)), list(range(20, 26))])
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    record = out.routing[0]
    assert record.selected.sum(1).tolist() == [1, 1]  # k = ceil(0.01 * n) = 1 of each row's real tokens
    best = record.logits.masked_fill(~record.valid, float("-inf")).argmax(1)
    assert record.selected[torch.arange(2), best].all()
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_a_row_without_real_tokens_runs_nothing_and_stays_finite(base):
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[1, 2], capacity=0.5, label="cos"))
    model.train()
    ids = torch.randint(3, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[1] = 0  # a row of padding only
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    for record in out.routing:
        assert not record.selected[1].any() and record.selected[0].sum() == 4
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
