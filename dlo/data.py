"""SFT data: load chat or prompt/completion records, tokenise with loss on the answer only.

Accepted inputs: a ``.jsonl``/``.json``/``.parquet`` file or a directory saved with
``datasets.Dataset.save_to_disk``. Each record holds either ``messages`` (a list of
``{"role", "content"}``; rendered with the tokenizer's chat template, loss on assistant turns
only) or ``prompt`` and ``completion`` strings (loss on the completion and EOS only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from dlo.chat import assistant_token_mask

IGNORE_INDEX = -100


def load_records(path: str, limit: int | None = None) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        import datasets

        records = [dict(r) for r in datasets.load_from_disk(path)]
    elif path.endswith(".jsonl"):
        records = _read_jsonl(path, limit)
    elif path.endswith(".json"):
        with open(path) as fh:
            records = json.load(fh)
    elif path.endswith(".parquet"):
        import datasets

        records = [dict(r) for r in datasets.Dataset.from_parquet(path)]
    else:
        raise ValueError(f"{path!r}: unsupported data format; use .jsonl, .json, .parquet or a datasets directory")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path!r}: no records found")
    return records[:limit] if limit else records


def _read_jsonl(path: str, limit: int | None) -> list:
    """The first ``limit`` records of a JSONL file (all when None); a bad line is named by its number."""
    records = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if limit and len(records) >= limit:
                break
    return records


def detect_format(records: list[dict], path: str = "data") -> str:
    first = records[0]
    if "messages" in first:
        return "messages"
    if "prompt" in first and "completion" in first:
        return "prompt_completion"
    raise ValueError(
        f"{path}: records need a 'messages' column (chat) or 'prompt' and 'completion' columns; "
        f"found columns {sorted(first)}"
    )


def tokenize_record(tokenizer, record: dict, fmt: str, max_length: int) -> dict[str, list[int]]:
    if fmt == "messages":
        ids, mask = assistant_token_mask(tokenizer, record["messages"])
    else:
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        completion = completion + [tokenizer.eos_token_id]
        ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}


def pack(examples: list[dict], block: int) -> list[dict]:
    """Concatenate examples and cut full blocks of ``block`` tokens (the tail is dropped)."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [{"input_ids": ids[i:i + block], "labels": labels[i:i + block]}
            for i in range(0, len(ids) - block + 1, block)]


def build_sft_dataset(tokenizer, path: str, max_length: int, limit: int | None = None,
                      packing: bool = False) -> list[dict]:
    records = load_records(path, limit)
    fmt = detect_format(records, path)
    column = ["messages"] if fmt == "messages" else ["prompt", "completion"]
    for i, record in enumerate(records):
        missing = [c for c in column if c not in record]
        if missing:
            raise ValueError(f"{path}: record {i} lacks column(s) {missing}")
    examples = [tokenize_record(tokenizer, r, fmt, max_length) for r in records]
    examples = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"])]
    if not examples:
        raise ValueError(
            f"{path}: no trainable tokens: every example has an empty answer after tokenisation/truncation "
            f"to max_length={max_length} (no assistant turn or completion)"
        )
    if packing:
        examples = pack(examples, max_length)
        if not examples:
            raise ValueError(f"{path}: packing into blocks of {max_length} tokens left no full block")
    return examples


@dataclass
class SFTCollator:
    """Right-pads a list of tokenised examples into a batch; padded labels are ignored."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[b, :n] = torch.tensor(e["input_ids"])
            labels[b, :n] = torch.tensor(e["labels"])
            mask[b, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
