"""Rows that pack several examples (data.packing): position ids restart per example, no token attends across examples.

The model keeps the examples apart when a batch has position ids and no padding mask (transformers builds its
packed-sequence mask from them); routed layers do the same on their packed batch, from sequence indices and the
example of each token. Budgets are per row: a row's examples share its top-k.
"""

import copy
import math

import pytest
import torch
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

import dlo
from dlo import attention
from dlo.batching import IGNORE_INDEX, SFTCollator
from dlo.data import pack
from dlo.routing import RoutedDecoderLayer

T = 24
LENGTHS = ((9, 15), (5, 7, 12))  # the examples of each row


def _packed_batch():
    g = torch.Generator().manual_seed(5)
    examples = [{"input_ids": torch.randint(3, 97, (n,), generator=g).tolist(), "labels": None}
                for row in LENGTHS for n in row]
    for e in examples:
        e["labels"] = list(e["input_ids"])
    blocks = pack(examples, T)
    assert len(blocks) == len(LENGTHS)
    return examples, SFTCollator(pad_token_id=0)(blocks)


def _model(tiny_llama_config, name):
    torch.manual_seed(0)
    if name == "llama":
        model = LlamaForCausalLM(tiny_llama_config)
    else:  # a sliding window shorter than an example
        keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings")
        model = MistralForCausalLM(MistralConfig(**{k: v for k, v in tiny_llama_config.to_dict().items() if k in keep},
                                                 sliding_window=6, attn_implementation="sdpa"))
    model = dlo.attach_routers(model, dlo.RoutingConfig(layers=[1, 2, 3], capacity=0.5, label="self"))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return model


def test_packing_restarts_positions_and_drops_the_cross_example_target():
    examples, batch = _packed_batch()
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no padding mask: it would join the examples
    starts = [0, 9, 0, 5, 12]
    flat_positions = batch["position_ids"].flatten().tolist()
    assert flat_positions == [i for e in examples for i in range(len(e["input_ids"]))]
    labels = batch["labels"].flatten()
    first = torch.tensor([s + row * T for row, s in zip((0, 0, 1, 1, 1), starts)])
    assert (labels[first] == IGNORE_INDEX).all()
    assert (labels != IGNORE_INDEX).sum() == labels.numel() - len(starts)


@pytest.mark.parametrize("train", [True, False], ids=["training", "threshold"])
@pytest.mark.parametrize("name", ["llama", "mistral-window-6"])
def test_packed_rows_equal_the_reference_mask_path(tiny_llama_config, monkeypatch, logits_and_grads, name, train):
    model = _model(tiny_llama_config, name)
    dlo.calibrate(model, [{"input_ids": torch.randint(3, 97, (4, T))}], progress=False)
    _, batch = _packed_batch()
    seen = set()
    original = RoutedDecoderLayer._attention_path
    monkeypatch.setattr(RoutedDecoderLayer, "_attention_path",
                        lambda self, *args: seen.add(original(self, *args)) or original(self, *args))
    fast = logits_and_grads(copy.deepcopy(model), batch, train)
    assert seen == {attention.POSITIONS}
    monkeypatch.setattr(RoutedDecoderLayer, "_attention_path", lambda self, *args: attention.REFERENCE)
    want = logits_and_grads(copy.deepcopy(model), batch, train)
    torch.testing.assert_close(fast[0], want[0], atol=1e-5, rtol=0)
    for key, grad in want[1].items():
        torch.testing.assert_close(fast[1][key], grad, atol=1e-5, rtol=1e-4, msg=key)


def test_each_example_attends_as_if_alone_with_per_row_budgets(tiny_llama_config):
    """Per routed layer: a packed row's output is, example by example, the stock layer on that example's selected
    tokens alone at their own positions; and a row's examples share its budget k = ceil(c * T)."""
    model = _model(tiny_llama_config, "llama").train()
    _, batch = _packed_batch()
    seen = {}
    for layer in dlo.routed_layers(model):
        layer.register_forward_hook(lambda m, args, kwargs, out: seen.__setitem__(m.layer_index, (args, kwargs, out)),
                                    with_kwargs=True)
    with torch.no_grad():
        records = model(**batch, use_cache=False).routing  # a cache would join the examples (transformers)
    stock = LlamaForCausalLM(tiny_llama_config)
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if k in stock.state_dict()})
    for record, routed in zip(records, dlo.routed_layers(model)):
        args, kwargs, got = seen[routed.layer_index]
        h = args[0] if args else kwargs["hidden_states"]
        cos, sin = (t.expand(len(LENGTHS), T, -1) for t in kwargs["position_embeddings"])
        layer = stock.model.layers[routed.layer_index]
        gate = 1.0 + routed.beta * (torch.sigmoid(record.logits) - 0.5)
        assert (record.selected.sum(1) == math.ceil(0.5 * T)).all()  # per-row budget
        want = h.clone()
        for row, lengths in enumerate(LENGTHS):
            start = 0
            for n in lengths:
                picked = record.selected[row, start:start + n].nonzero().squeeze(1) + start
                start += n
                if picked.numel() == 0:
                    continue
                with torch.no_grad():
                    f = layer(h[row, picked][None], attention_mask=None,
                              position_ids=batch["position_ids"][row, picked][None],
                              position_embeddings=(cos[row, picked][None], sin[row, picked][None]))
                f = f[0] if isinstance(f, tuple) else f
                want[row, picked] = h[row, picked] + gate[row, picked, None] * (f[0] - h[row, picked])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

