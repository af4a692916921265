"""One batching path: evaluation, calibration and capacity measurement see the batches training sees."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlo
from dlo.batching import IGNORE_INDEX, SFTCollator, batches, pad_token_id
from dlo.calibration import _batches as calibration_batches
from dlo.data import build_sft_dataset, load_records
from dlo.evaluation import load_batches

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny"
EVAL = TINY / "sft" / "eval.jsonl"
N, BATCH, MAX_LENGTH = 8, 3, 192


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY / "base")


def _assert_same(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in w:
            assert torch.equal(g[key], w[key]), key


def test_eval_batches_equal_the_training_collators(tokenizer):
    examples, counts = build_sft_dataset(tokenizer, str(EVAL), MAX_LENGTH, limit=N)
    assert counts.examples == N  # nothing dropped: the two paths see the same records
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    training = [collate(examples[i:i + BATCH]) for i in range(0, N, BATCH)]
    assert any((b["attention_mask"] == 0).any() for b in training)  # rows of different lengths: padding is tested
    _assert_same(load_batches(str(EVAL), tokenizer, BATCH, MAX_LENGTH, max_samples=N), training)


def test_calibration_texts_are_batched_as_training_batches_them(tokenizer):
    texts = [r["messages"][-1]["content"] for r in load_records(str(EVAL), N)]
    tokenizer.padding_side = "left"  # the tokenizer's own padding would put pads first
    examples = [{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"]} for t in texts]
    collate = SFTCollator(pad_token_id=pad_token_id(tokenizer))
    training = [{k: v for k, v in collate(examples[i:i + BATCH]).items() if k != "labels"} for i in range(0, N, BATCH)]
    got = calibration_batches(texts, tokenizer, BATCH, MAX_LENGTH, torch.device("cpu"))
    _assert_same(got, training)
    assert all(bool(b["attention_mask"][:, 0].all()) for b in got)  # right-padded: every row starts with a token


def test_calibration_from_texts_equals_calibration_from_training_batches(tokenizer):
    torch.manual_seed(0)
    model = dlo.attach_routers(AutoModelForCausalLM.from_pretrained(TINY / "base"),
                               dlo.RoutingConfig(layers=[1, 4], capacity=0.5))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.3)
    texts = [r["messages"][-1]["content"] for r in load_records(str(EVAL), N)]
    tokenizer.padding_side = "left"
    from_texts = dlo.calibrate(model, texts, tokenizer=tokenizer, batch_size=BATCH, progress=False)
    examples = [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]
    collate = SFTCollator(pad_token_id=pad_token_id(tokenizer))
    from_batches = dlo.calibrate(model, [collate(examples[i:i + BATCH]) for i in range(0, N, BATCH)],
                                 progress=False)
    assert from_texts == from_batches
    assert len(set(from_texts)) == 2 and all(0 < t < 1 for t in from_texts)  # real thresholds, per layer


def test_batches_pad_right_and_refuse_a_bad_batch_size():
    got = batches([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 2, pad_id=0)
    (batch,) = got
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="batch_size=0"):
        batches([{"input_ids": [1]}], 0, pad_id=0)
