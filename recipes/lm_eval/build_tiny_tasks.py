"""Build the lm-eval task data for the tiny default from its SFT eval set.

    python recipes/lm_eval/build_tiny_tasks.py      # writes recipes/lm_eval/tiny/*.jsonl

Prompts are the eval records' system and user turns rendered with the tiny tokenizer's chat template
(generation prompt included), so lm-eval scores the model in the format it was fine-tuned on, with no
chat-template options to remember. Two data files, one per task in ``tiny/``:

- ``play_choice.jsonl`` (``dlo_tiny_play_choice``, multiple choice): "which play are these lines
  from?", the 24 plays of the corpus as choices, each rendered as a complete assistant reply (so the
  end-of-turn token counts too and a title cannot win by being a prefix of another);
- ``answer_exact.jsonl`` (``dlo_tiny_answer_exact``, generation, exact match): the speaker and play
  questions, whose answers are short names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from dlo.data import load_records

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "assets" / "tiny"
OUT = Path(__file__).resolve().parent / "tiny"
EXACT_TASKS = ("speaker", "play")


def render(tokenizer, messages: list[dict], reply: str | None = None) -> str:
    if reply is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}], tokenize=False)


def reply_text(tokenizer, messages: list[dict], reply: str) -> str:
    """The assistant turn as the chat template renders it after the generation prompt."""
    prompt, full = render(tokenizer, messages), render(tokenizer, messages, reply)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders a reply that does not extend the generation prompt")
    return full[len(prompt):]


def build_tasks(records: list[dict], tokenizer, plays: list[str]) -> dict[str, list[dict]]:
    """Task name -> documents, from chat records with ``task``, ``answer``, ``source`` and ``messages``."""
    choice, exact = [], []
    for record in records:
        question = [m for m in record["messages"] if m["role"] != "assistant"]
        doc = {"prompt": render(tokenizer, question), "answer": record["answer"], "task": record["task"],
               "source": record["source"]}
        if record["task"] == "play":
            choice.append({**doc, "choices": [reply_text(tokenizer, question, play) for play in plays],
                           "label": plays.index(record["answer"])})
        if record["task"] in EXACT_TASKS:
            exact.append(doc)
    return {"play_choice": choice, "answer_exact": exact}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-file", default=str(TINY / "sft" / "eval.jsonl"))
    parser.add_argument("--tokenizer", default=str(TINY / "base"))
    parser.add_argument("--build-info", default=str(TINY / "build_info.json"), help="names the corpus's plays")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    records = load_records(args.eval_file)
    with open(args.build_info, encoding="utf-8") as fh:
        plays = json.load(fh)["corpus"]["plays"]
    tasks = build_tasks(records, AutoTokenizer.from_pretrained(args.tokenizer), plays)
    for name, docs in tasks.items():
        path = Path(args.out) / f"{name}.jsonl"
        path.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
        print(f"wrote {path} ({len(docs)} documents)")


if __name__ == "__main__":
    main()
