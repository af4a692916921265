"""SFT data: load chat or prompt/completion records, tokenise with loss on the answer only.

Accepted inputs: a ``.jsonl``/``.json``/``.parquet`` file or a directory saved with
``datasets.Dataset.save_to_disk``. Each record holds either ``messages`` (a list of
``{"role", "content"}``; rendered with the tokenizer's chat template, loss on assistant turns
only) or ``prompt`` and ``completion`` strings (loss on the completion and EOS only).

Every record is checked before anything is tokenised: a malformed line, a record of the other
format, non-text content, an assistant turn or completion without text, a conversation without
an assistant turn are refused, naming the file and line (or record). An example longer than
``max_length`` is truncated; one whose answer begins only after ``max_length`` tokens is dropped.
Both are counted (``DataCounts``) so the recipe reports them. A file where many examples are truncated, or
that repeats records, is legal but suspicious: a ``DloWarning`` says how many (``overlap_warning`` does the
same for an eval file that shares records with the training file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from dlo.batching import IGNORE_INDEX
from dlo.chat import assistant_token_mask, check_messages, json_kind
from dlo.errors import UserError, warn

COLUMNS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion")}
# Warn when at least this share of a file's examples lose their end to max_length.
TRUNCATED_WARN_SHARE = 0.1


def located_records(path: str, limit: int | None = None) -> list[tuple[str, object]]:
    """The first ``limit`` records of a data file (all when None), each with where it is: ``file:LINE`` for
    JSONL, ``file: record N`` or ``file: row N`` otherwise (1-based), for messages about that record."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        import datasets

        records = [(f"{path}: row {i}", dict(r)) for i, r in enumerate(datasets.load_from_disk(path), 1)]
    elif path.endswith(".jsonl"):
        records = _read_jsonl(path, limit)
    elif path.endswith(".json"):
        records = [(f"{path}: record {i}", r) for i, r in enumerate(_read_json(path), 1)]
    elif path.endswith(".parquet"):
        import datasets

        records = [(f"{path}: row {i}", dict(r)) for i, r in enumerate(datasets.Dataset.from_parquet(path), 1)]
    else:
        raise UserError(f"{path!r}: unsupported data format; use .jsonl, .json, .parquet or a datasets directory")
    if not records:
        raise UserError(f"{path!r}: no records found")
    return records[:limit] if limit else records


def load_records(path: str, limit: int | None = None) -> list:
    return [record for _, record in located_records(path, limit)]


def _read_jsonl(path: str, limit: int | None) -> list[tuple[str, object]]:
    """The first ``limit`` records of a JSONL file (all when None); a bad line is named by its number."""
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{path}:{line_no}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from err
                if limit and len(records) >= limit:
                    break
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start} of a line)") from err
    return records


def _read_json(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, found {json_kind(data)}")
    return data


def detect_format(record, where: str) -> str:
    """The format of a file, from its first record: 'messages' or 'prompt_completion'."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object (one record), found {json_kind(record)}")
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise UserError(
        f"{where}: records need a 'messages' column (chat) or 'prompt' and 'completion' columns; "
        f"found columns {sorted(record)}"
    )


def check_record(where: str, record, fmt: str) -> None:
    """Refuse a record that would train on nothing or on something other than its text answer."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object (one record), found {json_kind(record)}")
    missing = [c for c in COLUMNS[fmt] if c not in record]
    if missing:
        raise UserError(f"{where}: the record lacks {missing} (the file's first record sets the format: {fmt})")
    if fmt == "messages":
        messages = record["messages"]
        for i, m in enumerate(messages if isinstance(messages, list) else []):
            empty = isinstance(m, dict) and (m.get("content") is None or str(m.get("content")).strip() == "")
            if empty and m.get("role") == "assistant":
                raise UserError(f"{where}: messages[{i}] is an assistant turn with empty content; "
                                "every reply needs text to train on")
        check_messages(messages, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: no trainable tokens: the conversation has no assistant turn")
        return
    for column in COLUMNS[fmt]:
        if not isinstance(record[column], str):
            raise UserError(f"{where}: {column} is {json_kind(record[column])}: only text is supported")
    if not record["completion"].strip():
        raise UserError(f"{where}: the completion is empty; there is nothing to train on")


def token_mask(tokenizer, record: dict, fmt: str) -> tuple[list[int], list[int]]:
    """Token ids of a whole record and a 0/1 mask, 1 on the answer (assistant turns, or completion and EOS)."""
    if fmt == "messages":
        return assistant_token_mask(tokenizer, record["messages"])
    prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    completion = completion + [tokenizer.eos_token_id]
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def _labelled(ids: list[int], mask: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}


def tokenize_record(tokenizer, record: dict, fmt: str, max_length: int) -> dict[str, list[int]]:
    ids, mask = token_mask(tokenizer, record, fmt)
    return _labelled(ids[:max_length], mask[:max_length])


def pack(examples: list[dict], block: int) -> list[dict]:
    """Concatenate examples and cut full blocks of ``block`` tokens (the tail is dropped).

    Each block carries ``position_ids`` that restart at 0 where an example starts (an example cut by a block's end
    goes on counting in the next block), so the model keeps examples apart: it attends within each one (transformers
    builds that mask from position ids when a batch has no padding mask). The first token of every example is no
    target: it would be predicted from the example before it.
    """
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [IGNORE_INDEX if i == 0 else t for e in examples for i, t in enumerate(e["labels"])]
    positions = [i for e in examples for i in range(len(e["input_ids"]))]
    return [{"input_ids": ids[i:i + block], "labels": labels[i:i + block], "position_ids": positions[i:i + block]}
            for i in range(0, len(ids) - block + 1, block)]


@dataclass
class DataCounts:
    """What became of a data file's records; ``summary.json`` reports them under ``data``."""

    records: int
    examples: int = 0  # trained on (before packing)
    truncated: int = 0  # kept, cut to max_length
    dropped_too_long: int = 0  # no answer token within max_length
    packed_blocks: int | None = None


def _key(record) -> str:
    """A record's content, comparable across files and formats (key order does not matter)."""
    return json.dumps(record, sort_keys=True, default=str)


def warn_duplicates(path: str, located: list[tuple[str, object]]):
    """Warn when records repeat an earlier one: each copy trains again, weighting it more."""
    first: dict[str, str] = {}
    repeats = []
    for where, record in located:
        key = _key(record)
        if key in first:
            repeats.append((where, first[key]))
        else:
            first[key] = where
    if repeats:
        where, earlier = repeats[0]
        warn(f"{path}: {len(repeats)} of {len(located)} records repeat an earlier one (first: {where} repeats "
             f"{earlier}); each copy trains again")


def overlap_warning(train_path: str, eval_path: str, train_limit: int | None = None,
                    eval_limit: int | None = None):
    """Warn when the eval file holds records of the training file (within the limits each is read with): the
    eval loss then measures memory, not generalisation."""
    train = {_key(record) for record in load_records(train_path, train_limit)}
    shared = [where for where, record in located_records(eval_path, eval_limit) if _key(record) in train]
    if shared:
        warn(f"{eval_path}: {len(shared)} eval records are also in the training file {train_path} (first: "
             f"{shared[0]}); the eval loss is not measured on unseen text")


def build_sft_dataset(tokenizer, path: str, max_length: int, limit: int | None = None,
                      packing: bool = False) -> tuple[list[dict], DataCounts]:
    """Tokenised examples of a data file, every record checked first, and what became of the records."""
    located = located_records(path, limit)
    fmt = detect_format(located[0][1], located[0][0])
    for where, record in located:
        check_record(where, record, fmt)
    counts = DataCounts(records=len(located))
    examples = []
    for _, record in located:
        ids, mask = token_mask(tokenizer, record, fmt)
        if len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):
                counts.dropped_too_long += 1
                continue
            counts.truncated += 1
        examples.append(_labelled(ids, mask))
    counts.examples = len(examples)
    warn_duplicates(path, located)
    if counts.truncated and counts.truncated >= TRUNCATED_WARN_SHARE * counts.records:
        warn(f"{path}: {counts.truncated} of {counts.records} examples ({counts.truncated / counts.records:.0%}) are "
             f"truncated at data.max_length={max_length} tokens, so their ends are not trained on; raise "
             "data.max_length to keep them whole")
    if not examples:
        raise UserError(f"{path}: all {counts.records} examples are dropped: each reaches data.max_length="
                        f"{max_length} tokens before its answer begins; raise data.max_length")
    if packing:
        examples = pack(examples, max_length)
        counts.packed_blocks = len(examples)
        if not examples:
            raise UserError(f"{path}: packing into blocks of {max_length} tokens left no full block")
    return examples, counts
