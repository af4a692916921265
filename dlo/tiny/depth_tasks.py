"""Depth testbed: in-context lookups that one layer cannot make, next to tokens that one layer can.

    python -m dlo.tiny.depth_tasks build --out runs/depth-testbed [--seed 0]

Every record shows a random cycle f over ``nodes`` letters as shuffled ``key value ,`` pairs, then a start
letter, and asks for the walk from it::

    user:       q d , d m , m q , ... , ? q
    assistant:  path q d m ...                      (walk letters: x_1 = f(q), x_{i+1} = f(x_i))

Each answer token has a class (``token_classes``, one per assistant token, the closing ``<|end|>``
included): ``format`` (``path`` and ``<|end|>``: the same in every record), ``copy`` (the start letter, at a
fixed distance back in the prompt) and ``lookup`` (a walk letter: find the current letter among the keys,
return its value). A lookup needs two attention layers in sequence (one binds each value to the key before
it, the next matches the current letter against those keys: the induction circuit), so a one-layer model
predicts walk letters at about chance (ln ``nodes`` nats) while format and copy tokens cost it nothing.
The base model is such a one-layer Llama, pretrained here on the same records; expanded by one or more
zero-initialised copies of its layer, it learns the lookups within a few hundred steps.

``build`` writes, reproducibly from the seed: ``base/`` (model, word-level tokenizer with the tiny chat
template, generation config), ``data/train.jsonl`` and ``data/eval.jsonl`` (eval cycles drawn from their own
random stream), and ``build_info.json`` (settings, pretraining log, per-class eval loss of the base).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import string
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from dlo.batching import SFTCollator
from dlo.data import build_sft_dataset
from dlo.tiny.pretrain import generation_config, tiny_llama_config
from dlo.tiny.sft_data import write_jsonl
from dlo.tiny.tokenizer import BOS, CHAT_TEMPLATE, END, EOS, PAD, ROLE_MARKERS, SPECIAL_TOKENS

LETTERS = string.ascii_lowercase
UNK = "<unk>"
PATH, SEPARATOR, QUERY = "path", ",", "?"
TOKEN_CLASSES = ("format", "copy", "lookup")
# Eval records come from this offset of the seed, so no eval cycle is drawn from the training stream.
EVAL_STREAM = 1_000_003


@dataclass(frozen=True)
class TaskSpec:
    """The walk task. A task spec makes the records (``make_record``) and names its vocabulary and token classes;
    dlo/tiny/mixed_depth.py is the other one."""

    nodes: int = 10  # letters in each record's cycle
    walk: int = 9  # lookups per answer; < nodes, so the walk never returns to its start
    alphabet: int = 24  # the cycle's letters are drawn from the first `alphabet` letters

    kind = "walk"
    token_classes = TOKEN_CLASSES
    words = (PATH, SEPARATOR, QUERY)  # the task's words besides the letters

    def __post_init__(self):
        check_letters(self.nodes, self.alphabet)
        if not 1 <= self.walk < self.nodes:
            raise ValueError(f"walk={self.walk}: must be in [1, nodes={self.nodes})")

    def make_record(self, rng: random.Random) -> dict:
        """One chat record: messages, the exact answer, and the class of every assistant token."""
        pairs, successor = shuffled_cycle(rng, self.nodes, self.alphabet)
        start = rng.choice(list(successor))
        walk, letter = [], start
        for _ in range(self.walk):
            letter = successor[letter]
            walk.append(letter)
        user = pairs_text(pairs) + f" {QUERY} {start}"
        answer = " ".join([PATH, start, *walk])
        return chat_record("walk", user, answer, ["format", "copy", *["lookup"] * self.walk, "format"])


def check_letters(nodes: int, alphabet: int):
    if not 2 <= nodes <= alphabet <= len(LETTERS):
        raise ValueError(f"nodes={nodes}, alphabet={alphabet}: need 2 <= nodes <= alphabet <= 26")


def shuffled_cycle(rng: random.Random, nodes: int, alphabet: int) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """A random cycle over ``nodes`` of the first ``alphabet`` letters: its (key, successor) pairs in shuffled
    order, and the successor map."""
    cycle = rng.sample(LETTERS[:alphabet], nodes)
    successor = {a: cycle[(i + 1) % nodes] for i, a in enumerate(cycle)}
    pairs = list(successor.items())
    rng.shuffle(pairs)
    return pairs, successor


def pairs_text(pairs: list[tuple[str, str]]) -> str:
    return " ".join(f"{key} {value} {SEPARATOR}" for key, value in pairs)


def chat_record(task: str, user: str, answer: str, token_classes: list[str]) -> dict:
    return {"task": task, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "answer": answer, "token_classes": token_classes}


@dataclass(frozen=True)
class BaseSpec:
    layers: int = 1
    hidden: int = 128
    heads: int = 4
    intermediate: int = 384
    pretrain_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30


def generate(spec, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [spec.make_record(rng) for _ in range(count)]


def build_tokenizer(spec) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (one token per letter or symbol) with the tiny default's chat template."""
    words = [*SPECIAL_TOKENS, UNK, *spec.words, *LETTERS[:spec.alphabet]]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=[*ROLE_MARKERS, END], chat_template=CHAT_TEMPLATE, model_max_length=256,
        clean_up_tokenization_spaces=False)


def base_model(tokenizer, spec: BaseSpec, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                               num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                               num_key_value_heads=spec.heads, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@torch.no_grad()
def class_losses(model, tokenizer, path: str, classes: tuple[str, ...], batch_size: int = 64) -> dict[str, float]:
    """Mean next-token loss of each token class on the records of ``path`` (answer tokens only)."""
    examples, _ = build_sft_dataset(tokenizer, path, max_length=tokenizer.model_max_length)
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    total = dict.fromkeys(classes, 0.0)
    count = dict.fromkeys(classes, 0)
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                reduction="none", ignore_index=-100)
        for row, record in enumerate(records[start:start + batch_size]):
            positions = (batch["labels"][row, 1:] != -100).nonzero().flatten().tolist()
            for position, name in zip(positions, record["token_classes"], strict=True):
                total[name] += float(nll[row, position])
                count[name] += 1
    return {name: total[name] / count[name] for name in classes}


def pretrain_base(model, tokenizer, spec: BaseSpec, train_file: str, seed: int) -> dict:
    """Train ``model`` in place on the answers of ``train_file`` (warmup, then cosine to a tenth of ``lr``)."""
    examples, _ = build_sft_dataset(tokenizer, train_file, max_length=tokenizer.model_max_length)
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_factor(step: int) -> float:
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * step / spec.pretrain_steps))
        return min(1.0, (step + 1) / spec.warmup_steps) * decay

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses, started = [], time.perf_counter()
    model.train()
    for step in range(spec.pretrain_steps):
        picked = [order[(step * spec.batch_size + i) % len(order)] for i in range(spec.batch_size)]
        loss = model(**collate([examples[i] for i in picked])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    return {"loss": losses, "seconds": round(time.perf_counter() - started, 1)}


def build(out: str | Path, seed: int = 0, task=TaskSpec(), base: BaseSpec = BaseSpec(),
          train_records: int = 16000, eval_records: int = 512) -> dict:
    """Write the testbed to ``out`` (see the module docstring) and return its build_info."""
    out = Path(out)
    train_file, eval_file = out / "data" / "train.jsonl", out / "data" / "eval.jsonl"
    write_jsonl(generate(task, train_records, seed), train_file)
    write_jsonl(generate(task, eval_records, seed + EVAL_STREAM), eval_file)
    tokenizer = build_tokenizer(task)
    model = base_model(tokenizer, base, seed)
    log = pretrain_base(model, tokenizer, base, str(train_file), seed)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    info = {"settings": settings(seed, task, base, train_records, eval_records),
            "parameters": sum(p.numel() for p in model.parameters()),
            "base_eval_class_loss": class_losses(model, tokenizer, str(eval_file), task.token_classes),
            "chance_lookup_loss": math.log(task.nodes), "pretrain": log}
    (out / "build_info.json").write_text(json.dumps(info, indent=1))
    return info


def settings(seed: int, task, base: BaseSpec, train_records: int, eval_records: int) -> dict:
    """Everything the built files depend on (a rebuild is needed when any of it changes)."""
    return {"seed": seed, "task": {"kind": task.kind, **dataclasses.asdict(task)}, "base": dataclasses.asdict(base),
            "train_records": train_records, "eval_records": eval_records}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dlo.tiny.depth_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="Generate the data and pretrain the one-layer base model.")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--train-records", type=int, default=16000)
    b.add_argument("--eval-records", type=int, default=512)
    b.add_argument("--pretrain-steps", type=int, default=BaseSpec.pretrain_steps)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    info = build(args.out, args.seed, base=BaseSpec(pretrain_steps=args.pretrain_steps),
                 train_records=args.train_records, eval_records=args.eval_records)
    losses = ", ".join(f"{name} {loss:.3f}" for name, loss in info["base_eval_class_loss"].items())
    print(f"built the depth testbed in {args.out}: base {info['parameters']:,} parameters, pretrained in "
          f"{info['pretrain']['seconds']:.0f} s; eval loss per token class: {losses} "
          f"(chance for a lookup: {info['chance_lookup_loss']:.3f})")


if __name__ == "__main__":
    main()
