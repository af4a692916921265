"""Block routing under attn_implementation='flash_attention_2', through transformers' own flash integration.

There is no flash-attn package (nor GPU) on a CPU machine: the flash kernels transformers calls are replaced by an
exact torch reference of their documented semantics (causal from the bottom right, window in slots, a query with
no key gives zeros), so what is tested is dlo's side: the variable-length layout of each packed batch and the key
masks of decode steps. The reference kernel itself is checked first: the stock model under it equals SDPA.
"""

import copy

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

import dlo
from dlo.errors import UserError

ATOL = 1e-5
T = 20


def _attend(q, k, v, scale, causal, window):
    """One sequence: q (Sq, H, D) over k, v (Sk, Hk, D), flash semantics."""
    Sq, Sk = q.shape[0], k.shape[0]
    if Sq == 0 or Sk == 0:
        return q.new_zeros(Sq, q.shape[1], v.shape[-1])
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    query = torch.arange(Sq)[:, None] + (Sk - Sq)  # bottom-right alignment
    key = torch.arange(Sk)[None, :]
    allowed = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        allowed &= key <= query
    left, right = window
    if left >= 0:
        allowed &= key >= query - left
    if right >= 0:
        allowed &= key <= query + right
    probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1) * allowed.any(-1, keepdim=True)
    return torch.einsum("hqk,khd->qhd", probs, v)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    scale = softmax_scale or q.shape[-1] ** -0.5
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal, window_size) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    scale = softmax_scale or q.shape[-1] ** -0.5
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert len(cq) == len(ck) and cq[-1] == q.shape[0] and ck[-1] == k.shape[0]
    out = []
    for (q0, q1), (k0, k1) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
        assert 0 <= q1 - q0 <= max_seqlen_q and 0 <= k1 - k0 <= max_seqlen_k
        out.append(_attend(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal, window_size))
    return torch.cat(out)


@pytest.fixture
def flash(monkeypatch):
    """transformers' flash integration, running the reference kernels above."""
    kernels = (flash_attn_func, flash_attn_varlen_func, None, flash_utils._pad_input, flash_utils._unpad_input)
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)


def _with_attention(model, implementation):
    model = copy.deepcopy(model)
    model.config._attn_implementation = implementation
    return model


def _llama(tiny_llama_config):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config)


def _mistral(tiny_llama_config, window):
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
    config = MistralConfig(**{k: v for k, v in tiny_llama_config.to_dict().items() if k in keep},
                           sliding_window=window, attn_implementation="sdpa")
    torch.manual_seed(0)
    return MistralForCausalLM(config)


def _routed(model, label="self"):
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers=[1, 2, 3], capacity=0.5, label=label))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    dlo.calibrate(model, [{"input_ids": torch.randint(3, 97, (4, 24))}], progress=False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _batch(padded=True):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    if padded:
        mask[1, :6] = 0  # left padding
        mask[2, -8:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}



def _assert_same(got, want, mask):
    (got_logits, got_grads), (want_logits, want_grads) = got, want
    valid = mask.bool()
    torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=ATOL, rtol=0)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=ATOL, rtol=1e-4, msg=name)


def test_the_reference_kernel_gives_the_stock_model_sdpa_gives(tiny_llama_config, flash, logits_and_grads):
    model = _llama(tiny_llama_config)
    batch = _batch()
    want = logits_and_grads(model, batch, True)
    _assert_same(logits_and_grads(_with_attention(model, "flash_attention_2"), batch, True), want,
                 batch["attention_mask"])


@pytest.mark.parametrize("train", [True, False], ids=["training", "prefill"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("build", [_llama, lambda c: _mistral(c, T)], ids=["llama", "mistral-window-T"])
def test_routed_flash_equals_routed_sdpa(tiny_llama_config, flash, logits_and_grads, build, padded, train):
    sdpa = _routed(build(tiny_llama_config))
    batch = _batch(padded)
    want = logits_and_grads(copy.deepcopy(sdpa), batch, train)
    got = logits_and_grads(_with_attention(sdpa, "flash_attention_2"), batch, train)
    _assert_same(got, want, batch["attention_mask"])


def test_cached_chunks_and_generation_equal_sdpa(tiny_llama_config, flash):
    sdpa = _routed(_llama(tiny_llama_config)).eval()
    fa2 = _with_attention(sdpa, "flash_attention_2")
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def chunked(model):
        cache, logits = None, []
        with torch.no_grad():
            for start, stop in ((0, 9), (9, 10), (10, T)):
                out = model(ids[:, start:stop], attention_mask=mask[:, :stop], position_ids=positions[:, start:stop],
                            cache=cache, use_cache=True)
                cache, _ = out.cache, logits.append(out.logits)
        return torch.cat(logits, dim=1)

    valid = mask.bool()
    torch.testing.assert_close(chunked(fa2)[valid], chunked(sdpa)[valid], atol=ATOL, rtol=0)
    prompt, prompt_mask = ids[:, :12], mask[:, 6:18]  # left padding only, as generate() expects
    prompt = prompt.masked_fill(prompt_mask == 0, 0)
    runs = [model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=10, do_sample=False)
            for model in (fa2, sdpa)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        selected = sdpa(runs[1], output_router_logits=True).routing[0].selected
    assert selected.any() and not selected.all(), "routing is not exercised"


def test_a_sliding_window_the_sequence_exceeds_is_refused(tiny_llama_config, flash):
    fa2 = _with_attention(_routed(_mistral(tiny_llama_config, 8)), "flash_attention_2")
    with pytest.raises(UserError, match=r"sliding-window layer 1 under attn_implementation='flash_attention_2' runs "
                                        r"sequences of up to its window \(8 tokens\); this forward reaches 20"):
        fa2(**_batch())


def test_unsupported_implementations_are_refused_precisely(tiny_llama_config):
    flex = _with_attention(_llama(tiny_llama_config), "flex_attention")
    with pytest.raises(UserError, match=r"runs attn_implementation in \('sdpa', 'eager', 'flash_attention_2'\), got "
                                        r"'flex_attention' \(the model builds one BlockMask"):
        dlo.attach_routers(flex, dlo.RoutingConfig(layers=[1], label="self"))
    dlo.attach_routers(flex, dlo.RoutingConfig(layers=[1], granularity="mlp", label="self"))  # attention stays stock
    fa2 = _with_attention(_llama(tiny_llama_config), "flash_attention_2")
    with pytest.raises(UserError, match=r"similarity_source='packed'.*use similarity_source='dense'"):
        dlo.attach_routers(copy.deepcopy(fa2), dlo.RoutingConfig(layers=[1], label="cos"))
    dlo.attach_routers(fa2, dlo.RoutingConfig(layers=[1], label="cos", similarity_source="dense"))


def test_rows_packing_several_examples_are_refused(tiny_llama_config, flash):
    fa2 = _with_attention(_routed(_llama(tiny_llama_config)), "flash_attention_2")
    ids = _batch(padded=False)["input_ids"][:1]
    positions = torch.cat([torch.arange(8), torch.arange(T - 8)]).unsqueeze(0)  # two examples in one row
    with pytest.raises(UserError, match=r"does not run rows that pack several examples"):
        fa2(ids, position_ids=positions, use_cache=False)
