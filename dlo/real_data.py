"""Real data for the real model, from what the package registry and the interpreter ship (no dataset hub here).

- Instructions: the English conversations of ``chatterbot-corpus`` 1.3.3 (PyPI, BSD-3-Clause; hand-written
  question -> answer dialogues on AI, science, history, trivia, tech support, ...). Each conversation becomes one
  chat record, its turns alternating user / assistant (a trailing question without an answer is dropped);
  identical conversations are kept once.
- Plain English text: the Python Language Reference as CPython ships it (``pydoc_data.topics``, PSF-2.0), cut at
  paragraph ends into passages of about ``PASSAGE_CHARS`` characters. Nothing trains on it: it measures held-out
  language-modelling loss.

``python -m dlo.real_data --output runs/data/real`` writes ``train.jsonl`` and ``eval.jsonl`` (chat records; the
held-out conversations are drawn by ``--seed``), ``text.jsonl`` (``{"text": ...}`` passages), ``choice.jsonl``
(each held-out first exchange as a question with its answer among ``CHOICES`` answers, the others drawn by the
seed from other held-out conversations; the lm-eval tasks in recipes/lm_eval/real score it) and ``manifest.json``
(sources, versions, counts, seed). A rerun with the same settings does nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dlo.checkpoints import atomic_output_dir
from dlo.errors import UserError, run_entry_point

CHAT_PACKAGE = "chatterbot-corpus"
CHOICES = 4
PASSAGE_CHARS = 1500
MANIFEST = "manifest.json"


def chat_records() -> list[dict]:
    """Every distinct English chatterbot-corpus conversation as ``{"messages": [...]}``, in file order."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")  # located without importing (it imports nothing we need)
    if spec is None:
        raise UserError(f"the {CHAT_PACKAGE} package is not installed: pip install --no-deps {CHAT_PACKAGE}==1.3.3 "
                        "(make setup installs it)")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    records, seen = [], set()
    for path in sorted(folder.glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            turns = [str(turn).strip() for turn in turns]
            turns = turns[: len(turns) // 2 * 2]  # end on an answer
            if not turns or not all(turns) or tuple(turns) in seen:
                continue
            seen.add(tuple(turns))
            roles = ["user", "assistant"] * (len(turns) // 2)
            records.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)],
                            "source": f"{CHAT_PACKAGE}/{path.stem}"})
    return records


def text_records(passage_chars: int = PASSAGE_CHARS) -> list[dict]:
    """The Python Language Reference's topics, in name order, as passages cut at paragraph ends."""
    from pydoc_data.topics import topics

    records = []
    for name in sorted(topics):
        passage = ""
        for paragraph in topics[name].split("\n\n"):
            passage = f"{passage}\n\n{paragraph}" if passage else paragraph
            if len(passage) >= passage_chars:
                records.append({"text": passage, "source": f"pydoc_data.topics/{name}"})
                passage = ""
        if passage.strip():
            records.append({"text": passage, "source": f"pydoc_data.topics/{name}"})
    return records


def split(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): ``eval_fraction`` of the records drawn by ``seed``, each part in its original order."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: must be in (0, 1)")
    held_out = set(random.Random(seed).sample(range(len(records)), round(len(records) * eval_fraction)))
    train = [r for i, r in enumerate(records) if i not in held_out]
    return train, [r for i, r in enumerate(records) if i in held_out]


def choice_records(held_out: list[dict], seed: int) -> list[dict]:
    """The first exchange of each held-out conversation as ``{"question", "choices", "label"}``: its own answer and
    ``CHOICES - 1`` distinct answers of other conversations, in an order drawn by ``seed``."""
    rng = random.Random(seed)
    firsts = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in held_out]
    answers = sorted({answer for _, answer in firsts})
    records = []
    for question, answer in firsts:
        choices = [answer, *rng.sample([a for a in answers if a != answer], CHOICES - 1)]
        rng.shuffle(choices)
        records.append({"question": question, "choices": choices, "label": choices.index(answer)})
    return records


def build(output: str | os.PathLike, seed: int = 0, eval_fraction: float = 0.1) -> dict:
    """Write the data set into ``output`` (atomically); returns its manifest. Nothing is rewritten when
    ``output`` already holds the same sources and settings."""
    records = chat_records()
    manifest = {"format": 2,
                "chat": {"package": CHAT_PACKAGE, "version": _version(CHAT_PACKAGE), "licence": "BSD-3-Clause"},
                "text": {"source": "pydoc_data.topics (the Python Language Reference)",
                         "python": sys.version.split()[0], "licence": "PSF-2.0"},
                "seed": seed, "eval_fraction": eval_fraction}
    existing = Path(output) / MANIFEST
    if existing.is_file():
        recorded = json.loads(existing.read_text())
        if {k: recorded.get(k) for k in manifest} == manifest:
            return recorded
    train, held_out = split(records, eval_fraction, seed)
    texts = text_records()
    choices = choice_records(held_out, seed)
    manifest["counts"] = {"train": len(train), "eval": len(held_out), "text": len(texts), "choice": len(choices)}
    with atomic_output_dir(output, force=existing.is_file()) as tmp:
        parts = (("train.jsonl", train), ("eval.jsonl", held_out), ("text.jsonl", texts), ("choice.jsonl", choices))
        for name, part in parts:
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in part)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2)
    return manifest


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dlo.real_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Directory to write the data set into.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the held-out draw.")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="Share of conversations held out.")
    args = parser.parse_args(argv)

    def run():
        counts = build(args.output, args.seed, args.eval_fraction)["counts"]
        print(f"{args.output}: {counts['train']} training and {counts['eval']} held-out conversations "
              f"({CHAT_PACKAGE}), {counts['text']} held-out text passages (Python Language Reference)")

    return run_entry_point(run, prog="python -m dlo.real_data")


if __name__ == "__main__":
    sys.exit(main())
