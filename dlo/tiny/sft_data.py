"""SFT data: chat records with a checkable answer, built from the parsed plays.

Three tasks, each record's last message being the exact expected answer:

- ``speaker``: who speaks these lines (play named in the question) -> the speaker's name;
- ``play``: which play are these lines from -> the play's title;
- ``continue``: the next line of a speech, given its opening lines -> that line.

Eval records come only from the held-out speeches (``corpus.heldout_keys``), which the tokenizer
and the base model never saw, and train records only from the rest. An eval record is also
dropped if any of its lines occurs anywhere in the train-side text (short lines such as
"My lord." recur across plays), so no eval passage or answer appears in train.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from dlo.tiny.corpus import Play, Speech

SYSTEM = "You are a Shakespeare scholar. Answer with the name, title or line asked for, and nothing else."
TASKS = ("speaker", "play", "continue")
# Speaker questions only about characters with this many speeches, so the answer is learnable.
MIN_SPEAKER_SPEECHES = 15
MIN_PASSAGE_CHARS = 20
MAX_PASSAGE_LINES = 3


def _passage(speech: Speech, rng: random.Random, start: int | None = None, max_lines: int = MAX_PASSAGE_LINES):
    """1..max_lines consecutive lines of ``speech`` (from ``start`` or a random line), or None if too short."""
    start = rng.randrange(len(speech.lines)) if start is None else start
    n = rng.randint(1, max_lines)
    lines = list(speech.lines[start:start + n])
    while len("\n".join(lines)) < MIN_PASSAGE_CHARS and start + len(lines) < len(speech.lines):
        lines.append(speech.lines[start + len(lines)])
    return lines if len("\n".join(lines)) >= MIN_PASSAGE_CHARS else None


def make_record(task: str, speech: Speech, title: str, rng: random.Random) -> tuple[dict, list[str]] | None:
    """One chat record for ``task`` from ``speech`` and the corpus lines it shows, or None if unfit."""
    if task == "continue":
        if len(speech.lines) < 2:
            return None
        lines = _passage(speech, rng, start=0, max_lines=min(MAX_PASSAGE_LINES, len(speech.lines) - 1))
        if lines is None or len(lines) >= len(speech.lines):
            return None
        answer = speech.lines[len(lines)]
        user = f"Continue this speech by {speech.speaker} in {title}: give its next line.\n" + "\n".join(lines)
        used = [*lines, answer]
    else:
        lines = _passage(speech, rng)
        if lines is None:
            return None
        if task == "speaker":
            answer, user = speech.speaker, f"Who speaks these lines in {title}?\n" + "\n".join(lines)
        elif task == "play":
            answer, user = title, "Which play are these lines from?\n" + "\n".join(lines)
        else:
            raise ValueError(f"task {task!r} is not one of {TASKS}")
        used = lines
    record = {
        "task": task,
        "answer": answer,
        "source": f"{speech.play_id}#{speech.index}",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
    }
    return record, used


def _draw(speeches: list[tuple[Speech, str]], n: int, rng: random.Random, eligible, forbidden: set[str]) -> list[dict]:
    """Up to ``n`` records, tasks in turn, each from its own speech (taken in shuffled order).

    A speech unfit for one task (too short, a minor speaker) stays available to the next.
    """
    unused = list(speeches)
    rng.shuffle(unused)
    records = []
    for task in (TASKS[i % len(TASKS)] for i in range(n)):
        for pos, (speech, title) in enumerate(unused):
            if task == "speaker" and not eligible(speech):
                continue
            made = make_record(task, speech, title, rng)
            if made and not forbidden.intersection(made[1]):
                records.append(made[0])
                del unused[pos]
                break
    return records


def build_sft(plays: list[Play], heldout: set[tuple[str, int]], seed: int, n_train: int = 4000, n_eval: int = 300,
              min_speaker_speeches: int = MIN_SPEAKER_SPEECHES) -> tuple[list[dict], list[dict]]:
    """Train and eval records; raises if the held-out pool cannot supply ``n_eval`` records."""
    counts = Counter((s.play_id, s.speaker) for p in plays for s in p.speeches)
    eligible = lambda s: counts[(s.play_id, s.speaker)] >= min_speaker_speeches
    train_side = [(s, p.title) for p in plays for s in p.speeches if s.key not in heldout]
    eval_side = [(s, p.title) for p in plays for s in p.speeches if s.key in heldout]
    train_lines = {line for s, _ in train_side for line in s.lines}
    rng = random.Random(seed)
    train = _draw(train_side, n_train, rng, eligible, forbidden=set())
    evals = _draw(eval_side, n_eval, rng, eligible, forbidden=train_lines)
    for name, got, want in (("train", train, n_train), ("eval", evals, n_eval)):
        if len(got) < want:
            raise ValueError(f"only {len(got)} {name} records could be built, {want} asked; ask for fewer "
                             "(eval records come only from the held-out speeches, train records from the rest)")
    return train, evals


def write_jsonl(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
