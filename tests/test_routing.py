"""Routed layers against their references: the base model, the stock layer, a slow per-sequence loop."""

import copy
import math

import pytest
import torch
from transformers import LlamaForCausalLM

import dlo
from dlo.modeling import decoder_layers

ATOL = 1e-5


def _randomise_routers(model, scale=1.0):
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=scale)
        torch.nn.init.normal_(layer.router.bias, std=0.1)


def _batch(vocab, B=3, T=12, left_pad=(0, 3, 5)):
    ids = torch.randint(3, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(left_pad[:B]):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


@pytest.fixture
def base(tiny_llama_config):
    return LlamaForCausalLM(tiny_llama_config).eval()


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_identity_at_init_expanded_zero_init(base, granularity):
    """Zero-init copies + fresh routers give the base model's logits in train and eval mode."""
    from dlo.expansion import ExpansionPlan, expand_model

    model = expand_model(copy.deepcopy(base), ExpansionPlan.llama_pro(num_layers=4, groups=2, init="zero"))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers="new", capacity=0.5, granularity=granularity))
    assert len(dlo.routed_layers(model)) == 2
    ids, mask = _batch(base.config.vocab_size)
    with torch.no_grad():
        want = base(ids, attention_mask=mask).logits
        for train in (True, False):
            model.train(train)
            got = model(ids, attention_mask=mask).logits
            valid = mask.bool()
            torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_capacity_one_equals_unrouted(base, granularity):
    model = dlo.attach_routers(copy.deepcopy(base),
                               dlo.RoutingConfig(layers="all", capacity=1.0, granularity=granularity, beta=0.0))
    _randomise_routers(model)
    ids, mask = _batch(base.config.vocab_size)
    with torch.no_grad():
        want = base(ids, attention_mask=mask).logits
        model.train()
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_forced_skip_is_identity_for_routed_layers(base, granularity):
    routed = [1, 3]
    model = dlo.attach_routers(copy.deepcopy(base),
                               dlo.RoutingConfig(layers=routed, capacity=0.5, granularity=granularity))
    _randomise_routers(model)
    ids, mask = _batch(base.config.vocab_size)
    with torch.no_grad(), dlo.forced_routing(model, "skip"):
        got = model(ids, attention_mask=mask).logits
        if granularity == "block":  # the whole layer is skipped: same as deleting it
            reference = copy.deepcopy(base)
            layers = decoder_layers(reference)
            for i in sorted(routed, reverse=True):
                del layers[i]
            reference.config.num_hidden_layers = len(layers)
        else:  # only the MLP is skipped: same as a zero MLP
            reference = copy.deepcopy(base)
            for i in routed:
                torch.nn.init.zeros_(decoder_layers(reference)[i].mlp.down_proj.weight)
        want = reference(ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)


def _reference_block_layer(stock, rotary, h, valid, router, beta, capacity, threshold, training):
    """Slow obvious reference: per sequence, pick tokens, run the stock layer on them alone."""
    y = h.clone()
    B, T, _ = h.shape
    for b in range(B):
        pos = torch.nonzero(valid[b]).squeeze(1)
        logits = router(h[b]).squeeze(-1).float()
        scores = torch.sigmoid(logits)
        if training:
            k = math.ceil(capacity * len(pos))  # of the row's valid tokens: padding neither runs nor counts
            ranked = sorted(pos.tolist(), key=lambda t: (-logits[t].item(), t))  # ties -> earlier token
            chosen = sorted(ranked[:k])
        else:
            chosen = [t for t in pos.tolist() if scores[t] >= threshold]
        if not chosen:
            continue
        sel = torch.tensor(chosen)
        x = h[b, sel].unsqueeze(0)
        position_ids = sel.unsqueeze(0)
        cos, sin = rotary(x, position_ids=position_ids)
        f = stock(x, attention_mask=None, position_ids=position_ids, position_embeddings=(cos, sin))[0]
        g = 1 + beta * (scores[sel] - 0.5)
        y[b, sel] = h[b, sel] + g.unsqueeze(-1) * (f - h[b, sel])
    return y


@pytest.mark.parametrize("training", [True, False])
def test_block_routing_matches_slow_reference(base, training):
    layer_index, capacity, beta = 2, 0.4, 0.3
    stock = copy.deepcopy(decoder_layers(base)[layer_index])
    model = dlo.attach_routers(copy.deepcopy(base),
                               dlo.RoutingConfig(layers=[layer_index], capacity=capacity, beta=beta))
    _randomise_routers(model, scale=0.5)
    routed = dlo.routed_layers(model)[0]
    # A threshold strictly between scores: deterministic decisions with rows of different counts.
    routed.score_quantiles.copy_(torch.linspace(0.2, 0.8, routed.score_quantiles.numel()))
    model.train(training)
    ids, mask = _batch(base.config.vocab_size, B=3, T=11)
    captured = {}
    hook = routed.register_forward_hook(
        lambda mod, args, kwargs, out: captured.update(h=args[0], y=out), with_kwargs=True
    )
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
    hook.remove()
    valid = mask.bool()
    with torch.no_grad():
        want = _reference_block_layer(stock, model.model.rotary_emb, captured["h"], valid, routed.router, beta,
                                      capacity, float(routed.threshold()), training)
    record = out.routing[0]
    assert 0 < int(record.selected.sum()) < int(valid.sum())  # something ran, something skipped
    torch.testing.assert_close(captured["y"][valid], want[valid], atol=ATOL, rtol=0)


def test_padding_never_selected_and_ties_go_to_earlier_tokens(base):
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[0], capacity=0.5)).train()
    ids, mask = _batch(base.config.vocab_size, B=2, T=8, left_pad=(0, 2))
    with torch.no_grad():
        record = model(ids, attention_mask=mask).routing[0]
    assert not (record.selected & ~mask.bool()).any()
    # Zero-initialised router: every score ties, so the first ceil(0.5 * n) of a row's n valid tokens run:
    # 4 of 8 in the full row, 3 of 6 in the padded one (padding does not count towards the budget).
    assert record.selected[0].tolist() == [True] * 4 + [False] * 4
    assert record.selected[1].tolist() == [False, False, True, True, True, False, False, False]


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_eval_routing_is_causal(base, granularity):
    model = dlo.attach_routers(copy.deepcopy(base),
                               dlo.RoutingConfig(layers=[1, 2], capacity=0.5, granularity=granularity))
    _randomise_routers(model)
    ids = torch.randint(3, base.config.vocab_size, (2, 16))
    dlo.calibrate(model, [{"input_ids": ids}], progress=False)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 7) % base.config.vocab_size
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
        a = out.logits
        b = model(ids2).logits
    for record in out.routing:
        share = record.selected.float().mean().item()
        assert 0.2 < share < 0.8  # routing is really active
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=ATOL, rtol=0)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


def test_gradients_reach_router_through_gate_and_loss(base):
    ids = torch.randint(3, base.config.vocab_size, (2, 10))
    # Without the router loss (weight 0), the task loss reaches the router through the gate alone.
    gate_only = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[1], capacity=0.5, label="self",
                                                                          router_loss_weight=0.0)).train()
    gate_only(ids, labels=ids).loss.backward()
    router = dlo.routed_layers(gate_only)[0].router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0

    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[1], capacity=0.5, label="self"))
    model.train()
    out = model(ids, labels=ids)
    weight = model.dlo_routing_config.router_loss_weight
    torch.testing.assert_close(out.loss, out.task_loss + weight * out.router_loss)
    out.router_loss.backward()  # the router loss alone
    assert dlo.routed_layers(model)[0].router.weight.grad.abs().sum() > 0


def test_router_loss_trains_with_a_loss_computed_from_the_decoder_alone(base):
    """A loss the model does not compute itself (a custom or fused head over the decoder's hidden states)
    trains the routers exactly as the model's own loss does."""
    config = dlo.RoutingConfig(layers=[1, 2], capacity=0.5, label="cos")
    own = dlo.attach_routers(copy.deepcopy(base), config).train()
    _randomise_routers(own)
    outside = copy.deepcopy(own)
    ids = torch.randint(3, base.config.vocab_size, (2, 10))
    own(ids, labels=ids).loss.backward()
    hidden = outside.model(ids).last_hidden_state  # the decoder on its own, as TRL's fused LM head calls it
    logits = outside.lm_head(hidden)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for (name, a), b in zip(own.named_parameters(), outside.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("label", ["self", "cos", "cos-global"])
def test_routers_and_model_train_together(base, label):
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[1, 2], capacity=0.5, label=label))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, base.config.vocab_size, (4, 12))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()  # the loss already holds the weighted router loss
        opt.step()  # the routing state advances after the optimizer step
        opt.zero_grad()
    after = model.state_dict()
    changed = ("model.layers.1.router.weight", "model.layers.1.self_attn.q_proj.weight",
               "model.layers.0.mlp.up_proj.weight")
    for name in changed:
        assert not torch.equal(before[name], after[name]), name
    # Tracked quantiles moved off their initial 0.5.
    assert not torch.allclose(after["model.layers.1.score_quantiles"], before["model.layers.1.score_quantiles"])
    assert int(after["dlo_routing_state.step"]) == 3
    logs = dlo.routing_state(model).pop_logs()
    assert set(logs) >= {"router_loss", "task_loss", "routing/capacity", "routing/agreement", "routing/threshold"}
    assert all(0.0 < c <= 1.0 for c in logs["routing/capacity"])


def test_cos_global_reallocates_capacity_by_similarity(base):
    model = dlo.attach_routers(copy.deepcopy(base),
                               dlo.RoutingConfig(layers=[1, 2], capacity=0.5, label="cos-global",
                                                 capacity_momentum=0.0))
    # Layer 2 becomes an exact identity (similarity 1), so layer 1 should earn the capacity.
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        torch.nn.init.zeros_(decoder_layers(model)[2].get_submodule(name).weight)
    model.train()
    ids = torch.randint(3, base.config.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    assert out.routing[0].similarity is not None
    # Decisions stay put until the optimizer step: the forward changes no capacity.
    assert [layer.target_capacity for layer in dlo.routed_layers(model)] == [0.5, 0.5]
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    caps = [layer.target_capacity for layer in dlo.routed_layers(model)]
    assert caps[0] > 0.9 and caps[1] < 0.1
    assert abs(sum(caps) / 2 - 0.5) < 0.06
    shares = dlo.routing_state(model).pop_logs()["routing/label_run_share"]
    assert shares[0] > shares[1]


@pytest.mark.parametrize("sharpness, want", [(1.0, [0.55, 0.45]),  # the paper's: capacity follows the label share
                                              # 0.55^4 / (0.55^4 + 0.45^4) = 0.6906 of the two layers' budget 1.0
                                              (4.0, [0.6906, 0.3094]),
                                              # 1.0 and the floor 0.05, rescaled to the mean 0.5: 1.0 / 1.05,
                                              # the floor kept
                                              (64.0, [0.9524, 0.05])])
def test_sharpened_reallocation_concentrates_the_budget(base, sharpness, want):
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(
        layers=[1, 2], capacity=0.5, label="cos-global", capacity_momentum=0.0, anneal_steps=0,
        reallocation_sharpness=sharpness))
    dlo.routing_state(model)._reallocate(torch.tensor([0.55, 0.45], dtype=torch.float64))
    caps = [layer.target_capacity for layer in dlo.routed_layers(model)]
    assert caps == pytest.approx(want, abs=1e-3)


def test_capacity_annealing_schedule():
    from dlo.schedules import anneal_fraction

    assert anneal_fraction(0, 10) == 0.0
    assert anneal_fraction(5, 10) == 0.5
    assert anneal_fraction(20, 10) == 1.0
    assert anneal_fraction(5, 10, "cosine") == pytest.approx(0.5)
    assert anneal_fraction(2, 10, "cosine") < 0.2
    assert anneal_fraction(3, 0) == 1.0
    # A delay holds every token running, then the same anneal follows, shifted.
    assert [anneal_fraction(s, 10, delay=20) for s in (0, 19, 20, 25, 30, 99)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert anneal_fraction(4, 0, delay=5) == 0.0 and anneal_fraction(5, 0, delay=5) == 1.0


@pytest.mark.parametrize("delay", [0, 2])
def test_annealing_drives_topk_capacity(base, delay):
    config = dlo.RoutingConfig(layers=[1], capacity=0.25, anneal_steps=4, label="self", anneal_delay_steps=delay)
    model = dlo.attach_routers(copy.deepcopy(base), config).train()
    ids = torch.randint(3, base.config.vocab_size, (2, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    for _ in range(6 + delay):  # the capacity follows the optimizer steps taken, whatever loop takes them
        out = model(ids, labels=ids)
        seen.append(out.routing[0].selected.float().mean().item())
        out.loss.backward()
        opt.step()
    assert seen == [1.0] * delay + [1.0, 13 / 16, 10 / 16, 7 / 16, 4 / 16, 4 / 16]
    assert int(dlo.routing_state(model).step) == 6 + delay


def test_save_load_round_trip_and_remote_code(base, tmp_path):
    from transformers import AutoModelForCausalLM

    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[0, 2], capacity=[0.3, 0.6]))
    _randomise_routers(model)
    dlo.calibrate(model, [{"input_ids": torch.randint(3, 97, (2, 16))}], progress=False)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        for loaded in (dlo.load_model(tmp_path),
                       AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)):
            loaded.eval()
            assert [layer.target_capacity for layer in dlo.routed_layers(loaded)] == pytest.approx([0.3, 0.6])
            torch.testing.assert_close(loaded(ids).logits, want, atol=ATOL, rtol=0)
    overridden = dlo.load_model(tmp_path, capacity=0.9)
    assert [layer.target_capacity for layer in dlo.routed_layers(overridden)] == pytest.approx([0.9, 0.9])


def test_load_rejects_config_weights_mismatch(base, tmp_path):
    import json

    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[0, 2]))
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dlo_routing"]["routed_layers"] = [0, 3]
    cfg["dlo_routing"]["config"]["layers"] = [0, 3]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="disagrees with the weights"):
        dlo.load_model(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"capacity": 0.0}, r"capacity=0.0: must be in \(0, 1\]"),
        ({"capacity": 1.5}, r"capacity=1.5"),
        ({"label": "dot"}, "label='dot'"),
        ({"granularity": "head"}, "granularity='head'"),
        ({"layers": "odd"}, "layers='odd'"),
        ({"similarity_every": 0}, "similarity_every=0"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dlo.RoutingConfig(**kwargs)


def test_bad_attach(base):
    with pytest.raises(ValueError, match=r"out of range \[0, 3\]"):
        dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[1, 4]))
    with pytest.raises(ValueError, match="no duplicated layers"):
        dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers="new"))
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[1]))
    with pytest.raises(ValueError, match="attaching twice"):
        dlo.attach_routers(model, dlo.RoutingConfig(layers=[2]))
    with pytest.raises(ValueError, match="capacity has 3 values but 2 layers"):
        dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=[1, 2], capacity=[0.5, 0.5, 0.5]))
