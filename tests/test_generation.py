"""generate() with a KV cache under routing against cache-free forwards of the growing sequence."""

import copy

import pytest
import torch
import transformers
from transformers import DynamicCache, LlamaForCausalLM, StaticCache
from transformers.cache_utils import StaticLayer

import dlo
from dlo.cache import RoutedCache, RoutedLayer
from dlo.static_cache import RoutedStaticLayer

PROMPT_LEN, NEW_TOKENS, PAD = 7, 12, 0
ROUTED = [0, 2, 3]  # layer 1 stays unrouted: the cache mixes stock and routed layers


@pytest.fixture
def base(tiny_llama_config):
    return LlamaForCausalLM(tiny_llama_config).eval()


def _routed(base, granularity, capacity=0.5, layers=ROUTED):
    model = dlo.attach_routers(copy.deepcopy(base),
                               dlo.RoutingConfig(layers=layers, capacity=capacity, granularity=granularity))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
        torch.nn.init.normal_(layer.router.bias, std=0.1)
    calibration = torch.Generator().manual_seed(7)  # other text than the prompts: no score sits on a threshold
    dlo.calibrate(model, [{"input_ids": torch.randint(3, 97, (4, 32), generator=calibration)}], progress=False)
    model.generation_config.eos_token_id = None  # the config's eos (2) would stop rows at random
    model.generation_config.pad_token_id = PAD
    return model.eval()


def _prompts(batch):
    ids = torch.randint(3, 97, (batch, PROMPT_LEN))
    mask = torch.ones_like(ids)
    for b, pad in enumerate((0, 2, 4)[:batch]):  # left padding, as generate() expects
        mask[b, :pad] = 0
        ids[b, :pad] = PAD
    return ids, mask


def _cache_free_logits(model, ids, mask):
    """Last-token logits of a forward without cache, positions as generate() derives them."""
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, -1]


def _cache_free_records(model, ids, mask):
    """What each routed layer decided in a cache-free forward (positions as generate() derives them)."""
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                 output_router_logits=True).routing


@torch.no_grad()
def _greedy_cache_free(model, ids, mask, steps):
    for _ in range(steps):
        token = _cache_free_logits(model, ids, mask).argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids, mask


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_greedy_generate_matches_cache_free_forwards(base, granularity, batch):
    model = _routed(base, granularity)
    ids, mask = _prompts(batch)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                         return_dict_in_generate=True)
    want, want_mask = _greedy_cache_free(model, ids, mask, NEW_TOKENS)
    assert out.sequences.shape == (batch, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(out.sequences, want)

    # The cache saw every token but the last generated one: replay that sequence without cache
    # and read which tokens each routed layer ran.
    fed, fed_mask = want[:, :-1], want_mask[:, :-1]
    with torch.no_grad():
        records = _cache_free_records(model, fed, fed_mask)
    cache = out.cache
    assert isinstance(cache, dlo.RoutedCache) == (granularity == "block")
    assert cache.get_seq_length() == fed.shape[1]
    for layer, record in zip(dlo.routed_layers(model), records):
        selected, valid = record.selected, record.valid  # (B, T)
        share = (selected.sum() / valid.sum()).item()
        assert 0.2 < share < 0.8, f"layer {layer.layer_index} runs {share:.2f} of tokens: routing is not exercised"
        if granularity == "mlp":  # attention is dense: the stock cache holds every token (padding included)
            assert cache.layers[layer.layer_index].keys.shape[-2] == fed.shape[1]
            continue
        stored = cache.layers[layer.layer_index]
        assert isinstance(stored, RoutedLayer)
        assert torch.equal(cache.stored_lengths(layer.layer_index), selected.sum(1))
        assert stored.keys.shape[-2] >= int(selected.sum(1).max())  # decode steps add a column per row and step
        for b in range(batch):  # the stored tokens are the ones that ran, at their sequence positions
            assert torch.equal(stored.slots[b][stored.valid[b]], torch.nonzero(selected[b]).squeeze(1))
    assert cache.layers[1].keys.shape[-2] == fed.shape[1]  # the unrouted layer stores everything
    if granularity == "block":
        assert torch.equal(cache.stored_lengths(1), torch.full((batch,), fed.shape[1]))
        cache.compact()  # drops the columns of rows that skipped a decode step: each layer padded to its longest row
        for layer, record in zip(dlo.routed_layers(model), records):
            stored = cache.layers[layer.layer_index]
            assert stored.keys.shape[-2] == int(record.selected.sum(1).max())
            for b in range(batch):
                assert torch.equal(stored.slots[b][stored.valid[b]], torch.nonzero(record.selected[b]).squeeze(1))


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_unpadded_batch_whose_rows_store_different_counts(base, granularity):
    """No padding, so the model passes no mask; rows still store different numbers of tokens per layer."""
    model = _routed(base, granularity)
    ids = torch.randint(3, 97, (3, PROMPT_LEN))
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         return_dict_in_generate=True)
    want, _ = _greedy_cache_free(model, ids, mask, NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    if granularity == "block":
        lengths = torch.stack([out.cache.stored_lengths(i) for i in ROUTED])  # (layers, B)
        assert (lengths != lengths[:, :1]).any(), "every row stored as many tokens: the test exercises nothing"


def test_forced_run_stores_every_real_token(base):
    """Forced 'run' packs padding among the selected slots (training-like order): none is stored."""
    model = _routed(base, "block")
    ids, mask = _prompts(3)
    with dlo.forced_routing(model, "run"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True)
        want, want_mask = _greedy_cache_free(model, ids, mask, NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    for i in ROUTED:
        assert torch.equal(out.cache.layers[i].lengths, want_mask[:, :-1].sum(1))


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_sampling_with_seed_matches_cache_free_sampling(base, granularity):
    model = _routed(base, granularity)
    ids, mask = _prompts(3)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True,
                                   top_k=0, use_cache=use_cache))
    assert runs[0].shape == (3, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(runs[0], runs[1])


def test_eos_stops_rows_like_cache_free_generation(base):
    model = _routed(base, "block")
    ids, mask = _prompts(3)
    greedy, _ = _greedy_cache_free(model, ids, mask, NEW_TOKENS)
    eos = int(greedy[1, PROMPT_LEN + 2])  # row 1 emits it third: it must stop there
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    got = model.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(got, model.generate(ids, use_cache=False, **kwargs))
    first = (got[1, PROMPT_LEN:] == eos).nonzero()[0, 0]
    assert first <= 2 and (got[1, PROMPT_LEN + first + 1:] == PAD).all()


def test_beam_search_matches_cache_free_beam_search(base):
    model = _routed(base, "block")
    ids, mask = _prompts(3)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    got = model.generate(ids, use_cache=True, **kwargs)  # reorders the routed cache rows by beam
    assert torch.equal(got, model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_chunked_prefill_matches_one_forward(base, granularity):
    """Several queries over a non-empty routed cache: the masks of a decode step, generalised."""
    model = _routed(base, granularity)
    ids, mask = _prompts(3)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        head = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        assert isinstance(head.cache, RoutedCache) == (granularity == "block")
        tail = model(ids[:, 4:], attention_mask=mask, cache=head.cache)
    got = torch.cat([head.logits, tail.logits], dim=1)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=0)


def test_prefill_rows_with_every_token_selected_match_rows_alone(base):
    """A batch whose longest row runs every token (K == T) while others skip some."""
    model = _routed(base, "block", capacity=0.8, layers=[1])
    ids = torch.randint(3, 97, (4, 5))
    with torch.no_grad():
        out = model(ids, use_cache=False, output_router_logits=True)
        batched = out.logits
        counts = out.routing[0].selected.sum(1)
        alone = torch.cat([model(row[None], use_cache=False).logits for row in ids])
    assert counts.max() == 5 and counts.min() < 5
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_stock_cache_is_made_routed_when_empty_and_refused_once_it_holds_tokens(base):
    model = _routed(base, "block")
    ids, mask = _prompts(1)
    step_mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)  # the caller's own cache object becomes routed
        assert isinstance(cache, dlo.RoutedCache) and cache.get_seq_length() == PROMPT_LEN
        got = model(ids[:, -1:], attention_mask=step_mask, cache=cache).logits[:, -1]
        want = model(torch.cat([ids, ids[:, -1:]], 1), attention_mask=step_mask, use_cache=False).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        filled = DynamicCache(config=model.config)
        base(ids, attention_mask=mask, cache=filled)  # a plain model's cache: every layer holds every token
        with pytest.raises(ValueError, match=r"holding tokens cannot hold .* block-routed layers \[0"):
            model(ids[:, -1:], attention_mask=step_mask, cache=filled)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_static_cache_generate_matches_cache_free_forwards(base, granularity, batch):
    """cache_implementation='static': block-routed layers keep each token they ran at its own column, valid there."""
    model = _routed(base, granularity)
    ids, mask = _prompts(batch)
    want, want_mask = _greedy_cache_free(model, ids, mask, NEW_TOKENS)
    cache = StaticCache(model.config, max_cache_len=PROMPT_LEN + NEW_TOKENS + 3)  # room left over: columns never used
    for _ in range(2):  # the second run reuses the reset cache, as generate() reuses its own static cache
        cache.reset()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, cache=cache)
        assert torch.equal(out, want)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                      cache_implementation="static"), want)
    if granularity == "mlp":  # attention is dense: the stock static cache as it is
        assert all(type(layer) is StaticLayer for layer in cache.layers)
        return
    fed, fed_mask = want[:, :-1], want_mask[:, :-1]
    with torch.no_grad():
        records = _cache_free_records(model, fed, fed_mask)
    assert type(cache.layers[1]) is StaticLayer  # the unrouted layer stays stock
    for layer, record in zip(dlo.routed_layers(model), records):
        stored = cache.layers[layer.layer_index]
        assert isinstance(stored, RoutedStaticLayer)
        real = record.valid  # (B, T): under a static cache generate() passes a 4-D mask, padding is routed as is
        assert torch.equal(stored.valid[:, :fed.shape[1]][real], record.selected[real])
        assert not stored.valid[:, fed.shape[1]:].any()  # nothing beyond the tokens seen


def test_static_cache_refuses_sliding_window_layers(tiny_llama_config):
    config = transformers.Qwen2Config(**{**tiny_llama_config.to_dict(), "model_type": "qwen2"}, use_sliding_window=True,
                                      sliding_window=4, max_window_layers=0)
    model = _routed(transformers.Qwen2ForCausalLM(config).eval(), "block")
    ids, mask = _prompts(1)
    with pytest.raises(NotImplementedError, match="full-attention layers .StaticLayer. only"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")
