"""Packed attention without per-layer gathered masks (dlo/attention.py), against the reference mask path.

The reference (``packed_attention_mask``) gathers rows and columns of the model's own mask. The fast paths: running
tokens first then plain causal SDPA (full attention, or a window the chunk cannot exceed), and masks built from
sequence indices (sliding windows, eager attention, prefill and chunks into the routed cache).
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

import dlo
from dlo import attention
from dlo.routing import RoutedDecoderLayer

ATOL = 1e-5
T_TRAIN = 24
T_PROBE = 48  # K = 24 > head_dim (16): only attention-sized 4-D tensors have two dims of at least K


def _reference(monkeypatch):
    monkeypatch.setattr(RoutedDecoderLayer, "_attention_path", lambda self, *args: attention.REFERENCE)


def _mistral_config(tiny_llama_config, window, attn="sdpa"):
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
    return MistralConfig(**{k: v for k, v in tiny_llama_config.to_dict().items() if k in keep},
                         sliding_window=window, attn_implementation=attn)


# name: (model class, config builder): full attention under SDPA and eager, a window shorter than the sequence
# (masks from positions), one as long as it (the causal path), and the window under eager.
MODELS = {
    "llama-sdpa": lambda c: LlamaForCausalLM(c),
    "llama-eager": lambda c: LlamaForCausalLM(type(c)(**{**c.to_dict(), "attn_implementation": "eager"})),
    "mistral-window-5": lambda c: MistralForCausalLM(_mistral_config(c, 5)),
    "mistral-window-T": lambda c: MistralForCausalLM(_mistral_config(c, T_TRAIN)),
    "mistral-window-5-eager": lambda c: MistralForCausalLM(_mistral_config(c, 5, "eager")),
}
EXPECTED_PATH = {"llama-sdpa": attention.CAUSAL, "llama-eager": attention.POSITIONS,
                 "mistral-window-5": attention.POSITIONS, "mistral-window-T": attention.CAUSAL,
                 "mistral-window-5-eager": attention.POSITIONS}


def _routed(tiny_llama_config, name):
    torch.manual_seed(0)
    model = dlo.attach_routers(MODELS[name](tiny_llama_config),
                               dlo.RoutingConfig(layers=[1, 2, 3], capacity=0.5, label="self"))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    dlo.calibrate(model, [{"input_ids": torch.randint(3, 97, (4, 32))}], progress=False)
    return model


def _padded_batch(T=T_TRAIN):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    mask[2, -9:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}



def _paths_taken(model, batch):
    taken = set()
    original = RoutedDecoderLayer._attention_path

    def spy(self, *args):
        taken.add(original(self, *args))
        return original(self, *args)

    RoutedDecoderLayer._attention_path = spy
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        RoutedDecoderLayer._attention_path = original
    return taken


@pytest.mark.parametrize("train", [True, False], ids=["training", "prefill"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fast_paths_equal_the_reference_mask_path(tiny_llama_config, monkeypatch, logits_and_grads, name, train):
    routed = _routed(tiny_llama_config, name)
    batch = _padded_batch()
    routed.train(train)
    assert _paths_taken(routed, batch) == {EXPECTED_PATH[name]}
    fast_logits, fast_grads = logits_and_grads(copy.deepcopy(routed), batch, train)
    _reference(monkeypatch)
    ref_logits, ref_grads = logits_and_grads(copy.deepcopy(routed), batch, train)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(fast_logits[valid], ref_logits[valid], atol=ATOL, rtol=0)
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["llama-sdpa", "mistral-window-5", "llama-eager"])
def test_prefill_and_chunks_into_the_routed_cache_equal_the_reference(tiny_llama_config, monkeypatch, name):
    model = _routed(tiny_llama_config, name).eval()
    batch = _padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def chunked():
        cache, logits = None, []
        with torch.no_grad():
            for start, stop in ((0, 10), (10, 11), (11, T_TRAIN)):
                out = model(ids[:, start:stop], attention_mask=mask[:, :stop], position_ids=positions[:, start:stop],
                            cache=cache, use_cache=True)
                cache = out.cache
                logits.append(out.logits)
        return torch.cat(logits, dim=1)

    fast = chunked()
    _reference(monkeypatch)
    valid = mask.bool()
    torch.testing.assert_close(fast[valid], chunked()[valid], atol=ATOL, rtol=0)


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


@pytest.mark.parametrize("name", ["llama-sdpa", "mistral-window-T"])
def test_no_per_layer_dense_mask_is_kept_for_backward(tiny_llama_config, monkeypatch, name):
    routed = _routed(tiny_llama_config, name)
    batch = _padded_batch(T=T_TRAIN)
    assert _saved_attention_sized(copy.deepcopy(routed), batch) == []
    _reference(monkeypatch)
    assert _saved_attention_sized(copy.deepcopy(routed), batch), "the probe sees nothing: it tests nothing"


class _AttentionSized(TorchDispatchMode):
    """Records every 4-D tensor an op creates whose last two dims both reach ``K`` (a packed batch's attention scores
    or mask: (B, h, K, K), or rows of the model's mask: (B, h, K, T)), but for the model's own (B, 1, T, T) mask."""

    def __init__(self, K: int, T: int):
        super().__init__()
        self.K, self.T, self.seen = K, T, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and min(t.shape[-2:]) >= self.K and \
                    tuple(t.shape[-2:]) != (self.T, self.T):
                self.seen.add(tuple(t.shape[-2:]))
        return out


def _allocated_attention_sized(model, batch) -> set[tuple]:
    T = batch["input_ids"].shape[1]
    probe = _AttentionSized(K=round(0.5 * T), T=T)
    model.train()
    with probe:
        model(**batch, use_cache=False).loss.backward()
    return probe.seen


@pytest.mark.parametrize("name", ["llama-sdpa", "mistral-window-5"])
def test_no_tensor_of_packed_rows_by_sequence_is_allocated_in_padded_training(tiny_llama_config, monkeypatch, name):
    """Forward and backward of a padded batch: no (B, h, K, T) tensor per routed layer, and on the causal path no
    (B, h, K, K) one either (a sliding window shorter than the sequence builds its (B, 1, K, K) mask)."""
    routed = _routed(tiny_llama_config, name)
    batch = _padded_batch(T=T_PROBE)
    K = T_PROBE // 2
    seen = _allocated_attention_sized(copy.deepcopy(routed), batch)
    assert seen == (set() if EXPECTED_PATH[name] == attention.CAUSAL else {(K, K)})
    _reference(monkeypatch)
    assert (K, T_PROBE) in _allocated_attention_sized(copy.deepcopy(routed), batch), "the probe sees nothing"


def test_caller_masks_keep_the_reference_path(tiny_llama_config):
    """A 4-D mask of the caller's (or packed position ids) may say anything: only its own rows and columns are exact."""
    layer = dlo.routed_layers(_routed(tiny_llama_config, "llama-sdpa"))[0]
    four_d = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    config = layer.self_attn.config
    assert attention.attention_path(config, 1, four_d, None, 4, False) == attention.REFERENCE
    assert attention.attention_path(config, 1, None, None, 4, False) == attention.CAUSAL
    assert attention.attention_path(config, 1, None, torch.ones(1, 4, dtype=torch.bool), 4, True) == \
        attention.POSITIONS
