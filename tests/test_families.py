"""Every supported family (dlo/families.py) end to end, on tiny random models that keep its structure.

Each config keeps what distinguishes the real checkpoints it stands for: GQA ratio, rope scaling,
biases, tied embeddings, q/k norms, post-norms, softcapping, fused projections, partial rotary and
sliding windows (a window of 5, smaller than every test sequence, so prompts run past it).
"""

import copy
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlo
from dlo.cache import RoutedLayer, RoutedSlidingLayer
from dlo.cli import main as cli_main
from dlo.expansion import ExpansionPlan
from dlo.expansion_io import expand_checkpoint
from dlo.families import FAMILIES, check_routable
from dlo.modeling import decoder_layers, stock_model_class

WINDOW = 5
PAD = 0
PROMPT_LEN, NEW_TOKENS = 9, 8
TRAIN_LEN = 12
LEFT_PAD = (0, 3, 5)
# Of the 6 layers after llama-pro (groups=2: copies at 2 and 5), originals and copies are routed, full and
# sliding ones alike; 0 and 4 stay stock, so every cache mixes stock and routed layers.
ROUTED = [1, 2, 3, 5]
CAPACITIES = [0.5, 0.7, 0.5, 0.7]
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
SLIDING = "sliding_attention"
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny" / "base"

# name: (config class, its structural options, attention implementation)
CONFIGS = {
    "llama-2": ("LlamaConfig", dict(num_key_value_heads=4), "sdpa"),
    "llama-3.2": ("LlamaConfig", dict(
        num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), "sdpa"),
    "mistral-v0.1": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=WINDOW), "sdpa"),
    "mistral-v0.3": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None), "sdpa"),
    "qwen2.5": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True), "sdpa"),
    "qwen2-sliding": ("Qwen2Config", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW,
                                          max_window_layers=2), "sdpa"),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True), "sdpa"),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=16), "sdpa"),
    "gemma-2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                                     query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                                     final_logit_softcapping=30.0), "eager"),
    "gemma-3": ("Gemma3TextConfig", dict(
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
        layer_types=[SLIDING] * 3 + ["full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         SLIDING: {"rope_type": "default", "rope_theta": 1e4}}), "sdpa"),
    "phi-3": ("Phi3Config", dict(num_key_value_heads=2, sliding_window=WINDOW, partial_rotary_factor=0.5,
                                 tie_word_embeddings=True), "sdpa"),
    "olmo-2": ("Olmo2Config", dict(num_key_value_heads=2), "sdpa"),
}
MLP_ROUTABLE = {f.model_type for f in FAMILIES if f.mlp_routable}


def _config(name, **overrides):
    cls, options, attn = CONFIGS[name]
    return getattr(transformers, cls)(**{**COMMON, **options, **overrides}, attn_implementation=attn)


def _build(name, **overrides):
    return AutoModelForCausalLM.from_config(_config(name, **overrides)).eval()


def _mlp_routable(name):
    return _config(name).model_type in MLP_ROUTABLE


CASES = [(name, "block") for name in CONFIGS] + [(name, "mlp") for name in CONFIGS if _mlp_routable(name)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: per-op overhead dominates, and a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_supported_family_is_tested():
    assert {_config(name).model_type for name in CONFIGS} == {f.model_type for f in FAMILIES}


def _batch(batch, length, left_pad=LEFT_PAD):
    ids = torch.randint(3, COMMON["vocab_size"], (batch, length))
    mask = torch.ones_like(ids)
    for b, pad in enumerate(left_pad[:batch]):
        mask[b, :pad] = 0
        ids[b, :pad] = PAD
    return ids, mask


def _positions(mask):
    """Position ids as generate() derives them from a left-padded mask."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _randomise_routers(model):
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
        torch.nn.init.normal_(layer.router.bias, std=0.1)


def _calibrated(model):
    calibration = torch.Generator().manual_seed(7)
    dlo.calibrate(model, [{"input_ids": torch.randint(3, COMMON["vocab_size"], (4, 24), generator=calibration)}],
                  progress=False)
    model.generation_config.eos_token_id = None  # the config's eos would stop rows at random
    model.generation_config.pad_token_id = PAD
    return model.eval()


def _window(config, layer_index):
    """The sliding window of a layer, or None for full attention."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_index] == SLIDING else None
    return getattr(config, "sliding_window", None)


def _has_window(config):
    return any(_window(config, i) is not None for i in range(config.num_hidden_layers))


def _assert_close_on_valid(got, want, mask, atol):
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=atol, rtol=0)


# -- a routed layer against the stock layer ----------------------------------------------------------------------

@pytest.mark.parametrize("name, granularity", CASES)
def test_every_token_running_equals_the_stock_layers(name, granularity):
    base = _build(name)
    ids, mask = _batch(3, TRAIN_LEN)
    with torch.no_grad():
        want = base(ids, attention_mask=mask).logits
        fresh = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers="all", granularity=granularity))
        _assert_close_on_valid(fresh(ids, attention_mask=mask).logits, want, mask, 1e-6)  # zero router: all run
        full = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers="all", capacity=1.0, beta=0.0,
                                                                         granularity=granularity))
        forced = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers="all", granularity=granularity))
        for model in (full, forced):
            _randomise_routers(model)
        for training in (True, False):
            full.train(training)
            _assert_close_on_valid(full(ids, attention_mask=mask).logits, want, mask, 1e-6)
            forced.train(training)
            with dlo.forced_routing(forced, "run"):
                _assert_close_on_valid(forced(ids, attention_mask=mask).logits, want, mask, 1e-6)


def _reference_block(stock_layer, h, cos, sin, position_ids, selected, gate, window):
    """Per row, the stock layer on that row's selected tokens alone, at their positions; skipped tokens pass.

    Query at sequence index p attends the selected keys at indices (p - window, p] (all of them up to p
    without a window), which the reference writes as its own additive mask.
    """
    out = h.clone()
    for b in range(h.shape[0]):
        picked = selected[b].nonzero().squeeze(1)
        if picked.numel() == 0:
            continue
        query, key = picked[:, None], picked[None, :]
        allowed = key <= query
        if window is not None:
            allowed &= key > query - window
        mask = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
        f = stock_layer(h[b, picked][None], attention_mask=mask[None, None], position_ids=position_ids[b, picked][None],
                        position_embeddings=(cos[b, picked][None], sin[b, picked][None]))
        f = f[0] if isinstance(f, tuple) else f
        out[b, picked] = h[b, picked] + gate[b, picked, None] * (f[0] - h[b, picked])
    return out


@pytest.mark.parametrize("training", [True, False], ids=["top-k", "threshold"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_routing_equals_a_per_row_reference(name, training):
    base = _build(name)
    model = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers="all", capacity=0.5))
    _randomise_routers(model)
    _calibrated(model).train(training)
    seen = {}

    def keep(layer, args, kwargs, output):
        seen[layer.layer_index] = (args[0] if args else kwargs["hidden_states"], kwargs, output)

    for layer in dlo.routed_layers(model):
        layer.register_forward_hook(keep, with_kwargs=True)
    ids, mask = _batch(3, TRAIN_LEN)
    B, T = ids.shape
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=_positions(mask), output_router_logits=True)
    skipped, cut_by_window = 0, False
    for record, stock in zip(out.routing, decoder_layers(base)):
        index = stock.self_attn.layer_idx
        h, kwargs, got = seen[index]
        cos, sin = (t.expand(B, T, -1) for t in kwargs["position_embeddings"])
        gate = 1.0 + model.dlo_routing_config.beta * (torch.sigmoid(record.logits) - 0.5)
        window = _window(base.config, index)
        with torch.no_grad():
            want = _reference_block(stock, h, cos, sin, kwargs["position_ids"].expand(B, T), record.selected,
                                    gate.to(h.dtype), window)
        _assert_close_on_valid(got, want, mask, 1e-5)
        skipped += int((record.valid & ~record.selected).sum())
        ran = [row.nonzero().squeeze(1) for row in record.selected]
        cut_by_window |= window is not None and any(len(r) and int(r[-1] - r[0]) >= window for r in ran)
    assert skipped > 0, "no token skipped: the reference checks nothing"
    assert cut_by_window or not _has_window(base.config), "no selected key fell out of a window"


@pytest.mark.parametrize("name", [name for name in CONFIGS if _has_window(_config(name))])
def test_chunks_over_a_routed_sliding_cache_equal_one_forward(name):
    """Several queries at once over a routed cache past its window: the masks of a decode step, generalised."""
    model = dlo.attach_routers(_build(name), dlo.RoutingConfig(layers="all"))
    _randomise_routers(model)
    _calibrated(model)
    ids, mask = _batch(3, 2 * TRAIN_LEN)
    positions = _positions(mask)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        cache, chunks = None, []
        for start, stop in ((0, 7), (7, 14), (14, 15), (15, 2 * TRAIN_LEN)):  # chunks longer than the window
            out = model(ids[:, start:stop], attention_mask=mask[:, :stop], position_ids=positions[:, start:stop],
                        cache=cache, use_cache=True)
            cache = out.cache
            chunks.append(out.logits)
    assert any(isinstance(layer, RoutedSlidingLayer) for layer in cache.layers)
    _assert_close_on_valid(torch.cat(chunks, dim=1), want, mask, 1e-5)


# -- the whole chain --------------------------------------------------------------------------------------------

def _train(model, steps=3):
    ids, mask = _batch(3, TRAIN_LEN)
    labels = ids.masked_fill(mask == 0, -100)
    routers = [layer.router.weight.detach().clone() for layer in dlo.routed_layers(model)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.isfinite(out.loss) and out.router_loss is not None
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert int(dlo.routing_state(model).step) == steps
    assert all(not torch.equal(before, layer.router.weight) for before, layer in zip(routers, dlo.routed_layers(model)))


@torch.no_grad()
def _greedy_cache_free(model, ids, mask, steps):
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids, mask


def _check_generation(model, batch):
    ids, mask = _batch(batch, PROMPT_LEN)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         return_dict_in_generate=True)
    want, want_mask = _greedy_cache_free(model, ids, mask, NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        sampled.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0,
                                      use_cache=use_cache))
    assert torch.equal(sampled[0], sampled[1])

    fed, fed_mask = want[:, :-1], want_mask[:, :-1]  # what the cache saw
    with torch.no_grad():
        records = model(fed, attention_mask=fed_mask, position_ids=_positions(fed_mask), use_cache=False,
                        output_router_logits=True).routing
    for layer, record in zip(dlo.routed_layers(model), records):
        if batch > 1:
            ran = record.selected[record.valid]
            assert ran.any() and not ran.all(), f"layer {layer.layer_index}: routing is not exercised"
        if layer.granularity == "block":
            _check_routed_cache(out.cache, layer.layer_index, record.selected, _window(model.config, layer.layer_index))


def _check_routed_cache(cache, layer_index, selected, window):
    """Per row, the layer stores tokens it ran, and every one a next query can attend (its window, or all)."""
    stored = cache.layers[layer_index]
    assert type(stored) is (RoutedLayer if window is None else RoutedSlidingLayer)
    seen = selected.shape[1]
    needed_from = 0 if window is None else seen + 1 - window
    for b in range(selected.shape[0]):
        ran = torch.nonzero(selected[b]).squeeze(1)
        kept = stored.slots[b][stored.valid[b]]
        assert torch.equal(kept, ran[-len(kept):] if len(kept) else kept)  # the latest tokens it ran, in order
        assert torch.isin(ran[ran >= needed_from], kept).all()


def _check_window_trimming(model):
    """Every token running: a sliding layer keeps each row's last `window` real tokens, a full one all of them."""
    ids, mask = _batch(3, PROMPT_LEN)
    with dlo.forced_routing(model, "run"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True)
    real = torch.cat([mask, torch.ones(3, NEW_TOKENS - 1, dtype=mask.dtype)], dim=1).bool()  # what the cache saw
    for layer in dlo.routed_layers(model):
        window = _window(model.config, layer.layer_index)
        stored = out.cache.layers[layer.layer_index]
        for b in range(3):
            positions = torch.nonzero(real[b]).squeeze(1)
            if window is not None:
                positions = positions[positions >= real.shape[1] - window]
            assert torch.equal(stored.slots[b][stored.valid[b]], positions)


def _check_export(model, granularity, tmp_path):
    exported = dlo.export_static(model, min_capacity=0.6)  # drops the routed layers of capacity 0.5
    kept = exported.config.dlo_export["kept"]
    assert kept == [0, 2, 4, 5] and len(decoder_layers(exported)) == 4
    if getattr(model.config, "layer_types", None) is not None:
        assert exported.config.layer_types == [model.config.layer_types[i] for i in kept]
    ids, mask = _batch(3, TRAIN_LEN)
    with torch.no_grad():
        logits = exported(ids, attention_mask=mask).logits
        if granularity == "block":  # dropped layers skip every token, kept ones run every token ungated
            with dlo.forced_routing(model, "skip", [1, 3]), dlo.forced_routing(model, "run", [2, 5]):
                _assert_close_on_valid(logits, model(ids, attention_mask=mask).logits, mask, 1e-5)
    exported.save_pretrained(tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(loaded) is stock_model_class(model)
    with torch.no_grad():
        _assert_close_on_valid(loaded(ids, attention_mask=mask).logits, logits, mask, 1e-6)


@pytest.mark.parametrize("name, granularity", CASES)
def test_expand_route_train_generate_export(name, granularity, tmp_path):
    base = _build(name)
    ids, mask = _batch(3, TRAIN_LEN)
    model = dlo.expand_model(copy.deepcopy(base), ExpansionPlan.llama_pro(num_layers=4, groups=2))
    with torch.no_grad():  # zero-init copies: the base model's logits
        _assert_close_on_valid(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits, mask,
                               1e-6)
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers=ROUTED, capacity=CAPACITIES, granularity=granularity,
                                                        label="self"))
    _randomise_routers(model)
    _train(model)
    _calibrated(model)
    for batch in (1, 3):
        _check_generation(model, batch)
    if granularity == "block":
        _check_window_trimming(model)
    _check_export(model, granularity, tmp_path)

    model.save_pretrained(tmp_path / "routed")
    loaded = dlo.load_model(str(tmp_path / "routed")).eval()
    with torch.no_grad():
        _assert_close_on_valid(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, mask,
                               1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dlo_expand_writes_what_expand_model_builds(name, tmp_path):
    base = _build(name)
    base.save_pretrained(tmp_path / "base")
    plan = ExpansionPlan.llama_pro(num_layers=4, groups=2)
    expand_checkpoint(str(tmp_path / "base"), plan, str(tmp_path / "expanded"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "expanded").eval()
    in_memory = dlo.expand_model(copy.deepcopy(base), plan)
    got, want = loaded.state_dict(), in_memory.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for key in ("num_hidden_layers", "layer_types", "sliding_window", "tie_word_embeddings"):
        assert getattr(loaded.config, key, None) == getattr(in_memory.config, key, None), key
    ids, mask = _batch(3, TRAIN_LEN)
    with torch.no_grad():
        _assert_close_on_valid(loaded(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits, mask,
                               1e-6)


# -- what is refused --------------------------------------------------------------------------------------------

def test_unverified_families_are_refused_at_attach_and_expand():
    from transformers import CohereConfig, CohereForCausalLM

    other = CohereForCausalLM(CohereConfig(**COMMON, num_key_value_heads=2)).eval()
    for act in (lambda: dlo.attach_routers(other, dlo.RoutingConfig(layers="all")),
                lambda: dlo.expand_model(other, ExpansionPlan.llama_pro(num_layers=4, groups=2))):
        with pytest.raises(ValueError, match=r"model_type='cohere'; supported: llama, mistral, qwen2, qwen3, gemma"):
            act()
    with pytest.raises(ValueError, match=r"CohereDecoderLayer, which dlo has not verified.*llama \(LlamaDecoder"):
        check_routable(decoder_layers(other)[0], 0, "block")  # what a routed layer checks when it is built
    assert not dlo.routed_layers(other) and len(decoder_layers(other)) == 4
    decoder_only = AutoModelForCausalLM.from_config(_config("gemma-3")).model  # no LM head, e.g. inside a VLM
    with pytest.raises(ValueError, match=r"Gemma3TextModel is not a causal LM"):
        dlo.attach_routers(decoder_only, dlo.RoutingConfig(layers=[1]))


@pytest.mark.parametrize("name", [name for name in CONFIGS if not _mlp_routable(name)])
def test_mlp_routing_is_refused_where_the_layer_is_not_pre_norm_attention_then_mlp(name):
    with pytest.raises(ValueError, match=r"granularity='mlp' is not verified .*use granularity='block'"):
        dlo.attach_routers(_build(name), dlo.RoutingConfig(layers="all", granularity="mlp"))


def test_bidirectional_attention_is_refused():
    with pytest.raises(ValueError, match=r"attends bidirectionally"):
        dlo.attach_routers(_build("gemma-3", use_bidirectional_attention=True), dlo.RoutingConfig(layers=[1]))


def test_dlo_generate_on_a_sliding_window_model(tmp_path, capsys):
    """The command line's generate with the routed cache, on Mistral v0.1's sliding window."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    model = _build("mistral-v0.1", vocab_size=len(tokenizer))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers=[1, 3]))
    _randomise_routers(model)
    _calibrated(model).save_pretrained(tmp_path / "routed")
    tokenizer.save_pretrained(tmp_path / "routed")
    argv = ["generate", "--model", str(tmp_path / "routed"), "--prompt", "To be, or not to be, that is the question",
            "--max-new-tokens", "12"]
    assert cli_main(argv) == 0
    assert "layers run per generated token" in capsys.readouterr().out
