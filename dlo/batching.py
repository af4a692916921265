"""The one batching path: tokenised examples to model batches, for training, evaluation, calibration and
capacity measurement alike (docs/DESIGN.md §9).

An example is ``{"input_ids": [...], "labels": [...]}`` (labels optional; ``IGNORE_INDEX`` where no loss).
A batch right-pads its examples to the longest: ``input_ids`` (the pad id on padding), ``attention_mask``
(1 on real tokens) and, when the examples carry them, ``labels`` (``IGNORE_INDEX`` on padding). Right padding
whatever the tokenizer's ``padding_side``: every row keeps positions 0..n-1, as in training, and the routed
model takes its padding mask from ``attention_mask``, so every consumer of a batch routes the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
# What a forward without a loss needs (position_ids: packed rows, data.packing, keep their examples apart by them).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def pad_token_id(tokenizer) -> int:
    """The id padding takes: the tokenizer's pad token, else its EOS, else 0 (padding is masked, so any id does)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of tokenised examples (``labels`` only when the examples have them).

    Packed blocks (``dlo.data.pack``) are all full: they go as they are, with their position ids and no padding
    mask (which would make the model attend across the examples of a block).
    """
    if not examples:
        raise ValueError("collate() needs at least one example")
    if "position_ids" in examples[0]:
        if len({len(e["input_ids"]) for e in examples}) != 1:
            raise ValueError("packed blocks of different lengths: pack() cuts them all to one length")
        keys = [k for k in ("input_ids", "labels", "position_ids") if k in examples[0]]
        return {key: torch.tensor([e[key] for e in examples], dtype=torch.long) for key in keys}
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    with_labels = "labels" in examples[0]
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
        if with_labels:
            labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return {k: v for k, v in batch.items() if v is not None}


def batches(examples: list[dict], batch_size: int, pad_id: int, keys: tuple[str, ...] | None = None) -> list[dict]:
    """``collate`` over consecutive chunks of ``batch_size`` examples, each batch cut to ``keys`` (all when None)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        out.append({k: v for k, v in batch.items() if keys is None or k in keys})
    return out


def text_examples(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """Plain texts as examples (special tokens added as the tokenizer adds them), cut to ``max_length`` tokens."""
    return [{"input_ids": tokenizer(text, truncation=True, max_length=max_length)["input_ids"]} for text in texts]


def to_device(batch: dict, device, keys: tuple[str, ...] | None = None) -> dict:
    """The batch's tensors (those in ``keys``, all when None) on ``device``."""
    return {k: v.to(device) for k, v in batch.items() if keys is None or k in keys}


@dataclass
class SFTCollator:
    """The training collator (HF Trainer, TRL, a DataLoader): ``collate`` with the tokenizer's pad id."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_token_id)
