"""Host synchronisations of a routed model's decode steps, counted on CPU as a GPU would pay them.

A host sync is any read of a tensor's value by Python: ``item``, ``bool``/``int``/``float`` of a tensor, ``tolist``,
and ops whose output shape depends on values (``nonzero``, ``masked_select``, ``unique``). The operator-level ones
are counted by a dispatch mode; ``tolist`` reads memory directly, so it is wrapped. Each decode forward of the
routed model must make exactly the syncs of the stock model's (what transformers itself reads), none per routed
layer; with idle checks on (the CPU default) one per routed layer; compaction one per routed layer every
``COMPACT_EVERY`` steps. The same holds over a static cache, whose decode step torch.compile captures as one graph.
"""

import copy

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM, StaticCache

import dlo
import dlo.cache
from dlo.static_cache import route_static_cache

ROUTED = [0, 2, 3]
PROMPT_LEN, NEW_TOKENS = 6, 10
VALUE_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "_unique2",
               "unique_consecutive", "unique_dim"}


class SyncCounter(TorchDispatchMode):
    """Counts value reads per forward of a model, keyed by the forward's chunk length."""

    def __init__(self):
        super().__init__()
        self.current = None  # reads of the forward running now, None outside any
        self.per_forward: list[tuple[int, int]] = []  # (chunk length, reads) per forward

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in VALUE_READS:
            self.read()
        return func(*args, **(kwargs or {}))

    def read(self):
        if self.current is not None:
            self.current += 1

    def watch(self, model):
        def start(module, args, kwargs):
            self.current = 0

        def stop(module, args, kwargs, output):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.per_forward.append((ids.shape[1], self.current))
            self.current = None

        return [model.register_forward_pre_hook(start, with_kwargs=True),
                model.register_forward_hook(stop, with_kwargs=True)]

    def decode_reads(self) -> list[int]:
        return [reads for length, reads in self.per_forward if length == 1]


@pytest.fixture
def models(tiny_llama_config):
    base = LlamaForCausalLM(tiny_llama_config).eval()
    routed = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=ROUTED, capacity=0.5))
    for layer in dlo.routed_layers(routed):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    calibration = torch.Generator().manual_seed(7)
    dlo.calibrate(routed, [{"input_ids": torch.randint(3, 97, (4, 32), generator=calibration)}], progress=False)
    for model in (base, routed):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return routed.eval(), base


def _prompts(padded=True):
    ids = torch.randint(3, 97, (3, PROMPT_LEN))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0  # left padding: the model passes a mask (without, transformers passes none)
    return ids, mask


def _generate_counting(model, ids, mask, monkeypatch, **kwargs):
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        counter.read()
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    hooks = counter.watch(model)
    try:
        with counter:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return out, counter.decode_reads()


def _routed_cache(model, skip_idle_layers):
    return dlo.RoutedCache(model.config, ROUTED, skip_idle_layers=skip_idle_layers)


@pytest.mark.parametrize("padded", [True, False])
def test_decode_steps_read_no_value_the_stock_model_does_not(models, monkeypatch, padded):
    routed, base = models
    ids, mask = _prompts(padded)
    want = routed.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    _, stock = _generate_counting(base, ids, mask, monkeypatch)
    got, reads = _generate_counting(routed, ids, mask, monkeypatch, cache=_routed_cache(routed, False))
    assert torch.equal(got, want)
    assert len(reads) == NEW_TOKENS - 1 and reads == stock


def test_idle_checks_read_once_per_routed_layer_and_step(models, monkeypatch):
    routed, base = models
    ids, mask = _prompts()
    _, stock = _generate_counting(base, ids, mask, monkeypatch)
    got, reads = _generate_counting(routed, ids, mask, monkeypatch, cache=_routed_cache(routed, True))
    assert torch.equal(got, routed.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False))
    assert reads == [n + len(ROUTED) for n in stock]


def test_compaction_reads_once_per_routed_layer_every_few_steps(models, monkeypatch):
    routed, base = models
    ids, mask = _prompts()
    every = 4
    monkeypatch.setattr(dlo.cache, "COMPACT_EVERY", every)
    _, stock = _generate_counting(base, ids, mask, monkeypatch)
    cache = _routed_cache(routed, False)
    got, reads = _generate_counting(routed, ids, mask, monkeypatch, cache=cache)
    want = routed.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    assert torch.equal(got, want)
    compacting = [step for step in range(len(reads)) if step and step % every == 0]  # appended columns reach `every`
    assert reads == [n + (len(ROUTED) if step in compacting else 0) for step, n in enumerate(stock)]
    for i in ROUTED:  # columns left by rows that skipped: at most one per step since the last compaction
        assert cache.layers[i].keys.shape[-2] - int(cache.stored_lengths(i).max()) <= every


def test_static_cache_decode_steps_read_no_value_the_stock_model_does_not(models, monkeypatch):
    """A static cache's routed layers write at a tensor position in place: no read per routed layer either."""
    routed, base = models
    ids, mask = _prompts()
    want = routed.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    length = PROMPT_LEN + NEW_TOKENS
    _, stock = _generate_counting(base, ids, mask, monkeypatch, cache=StaticCache(base.config, max_cache_len=length))
    cache = route_static_cache(StaticCache(routed.config, max_cache_len=length), ROUTED, skip_idle_layers=False)
    got, reads = _generate_counting(routed, ids, mask, monkeypatch, cache=cache)
    assert torch.equal(got, want)
    assert len(reads) == NEW_TOKENS - 1 and reads == stock


def test_static_cache_decode_step_traces_as_one_graph(models):
    """What CUDA graphs need: with idle checks off, torch.compile traces a decode step of the routed static cache
    without a graph break past the routing inputs (built outside the graph) and without recompiling per step."""
    from torch._dynamo.utils import counters

    routed, _ = models
    ids, mask = _prompts()
    want = routed.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    cache = route_static_cache(StaticCache(routed.config, max_cache_len=PROMPT_LEN + NEW_TOKENS), ROUTED,
                               skip_idle_layers=False)
    config = transformers.CompileConfig(backend="eager", mode=None)  # dynamo's graph capture, no code generation
    config._compile_all_devices = True  # generate() compiles on accelerators only unless told
    torch._dynamo.reset()
    counters.clear()
    got = routed.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, cache=cache,
                          compile_config=config)
    assert torch.equal(got, want)
    breaks = [reason for reason in counters["graph_break"] if "RoutingState.inputs" not in reason]
    assert not breaks, breaks
    # One graph (two if the part before the routing inputs holds any op) serves every step: a recompile per step
    # would add one per step.
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
