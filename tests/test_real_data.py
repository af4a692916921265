"""The real data set (dlo/real_data.py): chatterbot-corpus conversations and the Python Language Reference."""

import json

import pytest
import yaml

from dlo import real_data
from dlo.data import build_sft_dataset


def test_conversations_alternate_end_on_an_answer_and_are_distinct():
    records = real_data.chat_records()
    assert len(records) > 800
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(m["content"].strip() for m in record["messages"])
    keys = [tuple(m["content"] for m in r["messages"]) for r in records]
    assert len(set(keys)) == len(keys)
    first = records[0]  # ai.yml's first conversation, read straight from the package's YAML
    folder = real_data.Path(real_data.importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0])
    raw = yaml.safe_load((folder / "data/english/ai.yml").read_text())["conversations"][0]
    assert [m["content"] for m in first["messages"]] == raw[: len(raw) // 2 * 2]


def test_text_passages_cover_the_reference_in_order():
    from pydoc_data.topics import topics

    passages = real_data.text_records()
    joined = {name: "\n\n".join(p["text"] for p in passages if p["source"] == f"pydoc_data.topics/{name}")
              for name in topics}
    assert all(joined[name].split() == topics[name].split() for name in topics)  # every word, in order
    last = {p["source"]: i for i, p in enumerate(passages)}
    cut = [p for i, p in enumerate(passages) if last[p["source"]] != i]  # every passage but each topic's last
    assert len(cut) > 100 and all(len(p["text"]) >= real_data.PASSAGE_CHARS for p in cut)


def test_build_splits_by_seed_without_overlap_and_is_idempotent(tmp_path):
    out = tmp_path / "real"
    manifest = real_data.build(out, seed=3)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    choices = [json.loads(line) for line in (out / "choice.jsonl").read_text().splitlines()]
    assert manifest["counts"] == {"train": len(train), "eval": len(held_out), "choice": len(held_out),
                                  "text": len((out / "text.jsonl").read_text().splitlines())}
    for doc, conversation in zip(choices, held_out):  # the right answer is the conversation's own, once
        assert doc["question"] == conversation["messages"][0]["content"]
        assert doc["choices"][doc["label"]] == conversation["messages"][1]["content"]
        assert len(set(doc["choices"])) == real_data.CHOICES
    assert len(held_out) == round(0.1 * (len(train) + len(held_out)))
    as_key = lambda r: json.dumps(r["messages"])
    assert not {as_key(r) for r in train} & {as_key(r) for r in held_out}
    written = (out / "train.jsonl").stat().st_mtime_ns
    assert real_data.build(out, seed=3) == manifest and (out / "train.jsonl").stat().st_mtime_ns == written
    other = real_data.build(tmp_path / "other", seed=4)
    assert other["counts"] == manifest["counts"]
    assert (tmp_path / "other" / "eval.jsonl").read_text() != (out / "eval.jsonl").read_text()
    with pytest.raises(ValueError, match="eval_fraction=1.5: must be in"):
        real_data.build(tmp_path / "bad", eval_fraction=1.5)
    assert not (tmp_path / "bad").exists()


def test_records_train_with_the_sft_tokenisation(tmp_path):
    from transformers import AutoTokenizer

    real_data.build(tmp_path / "real")
    tokenizer = AutoTokenizer.from_pretrained("assets/tiny/base")
    examples, counts = build_sft_dataset(tokenizer, str(tmp_path / "real" / "eval.jsonl"), 256, None)
    assert counts.examples == counts.records > 50
    assert all(any(label != -100 for label in e["labels"]) for e in examples)
