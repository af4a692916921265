"""Training steps compiled vs eager: the default routing config, and the dense model for reference.

    python benchmarks/compiled.py                       # CPU: inductor, the tiny default and a d=512 4-layer Llama
    python benchmarks/compiled.py --quick               # smoke run: tiny sizes, aot_eager
    python benchmarks/compiled.py --device cuda         # GPU: inductor (Triton), bf16

Two models, each trained by four candidates that take turns in every round (one optimizer step each):
  dense     the model without routers, eager
  dense+c   the same under torch.compile(--backend)
  routed    routers attached with the SFT recipe's routing section (recipes/configs/tiny.yaml: cos-global
            labels, similarity every step, capacity annealed 1.0 -> 0.5 over 60 steps, block routing), eager
  routed+c  the same under torch.compile(--backend)
Models: "tiny", the bundled tiny Llama (assets/tiny/base) expanded 6 -> 8 layers as `make demo` does
(LLaMA-Pro, 2 groups, zero-init copies; the two copies routed), on batches of the recipe's SFT data (real
lengths, so T changes from batch to batch); "d512", a random Llama of 2 layers at d=512 expanded LLaMA-Pro
to 4 (copies initialised as copies, the two copies routed, random routers) on random tokens.
A step is forward with labels (the routed loss holds the router loss), backward, AdamW step; the routed
models' RoutingState commits after it, so the timed steps walk through the annealing, and the packed width
changes every step. The first --warmup rounds are untimed (they compile); figures are medians of the timed
rounds, ratios the median of per-round ratios to eager dense. "graphs" counts the graphs dynamo compiled
during each candidate's timed steps (torch._dynamo counters: 0 means no recompile after warm-up), "breaks"
the graph breaks seen over the whole run; "loss diff" the largest |compiled - eager| loss over all steps.
Prints a table and writes --out (JSON).
"""

import argparse
import copy
import dataclasses
import os
import statistics
import time

import common
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import dlo
from dlo.batching import SFTCollator
from dlo.data import build_sft_dataset
from dlo.recipe_config import load_recipe_config

ROOT = os.path.dirname(common.HERE)
RECIPE = os.path.join(ROOT, "recipes", "configs", "tiny.yaml")
CANDIDATES = ("dense", "dense+c", "routed", "routed+c")
CPU = dict(d=512, heads=8, kv_heads=8, seq=256, batch=4, layers=4, vocab=8192, repeats=5, warmup=4)
CUDA = dict(d=512, heads=8, kv_heads=8, seq=1024, batch=16, layers=4, vocab=32000, repeats=10, warmup=4)
QUICK = dict(d=64, heads=4, kv_heads=2, seq=32, batch=2, layers=4, vocab=128, repeats=2, warmup=3)


def tiny_default(args, device, dtype):
    """The demo's expanded tiny model and batches of the recipe's SFT data (each batch its own length)."""
    recipe = load_recipe_config(RECIPE)
    base_dir = os.path.join(ROOT, recipe.model.path)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation="sdpa")
    spec = dict(recipe.model.expansion)
    plan = dlo.ExpansionPlan.build(spec.pop("strategy"), base.config.num_hidden_layers, **spec)
    dense = dlo.expand_model(base, plan)
    batch = 2 if args.quick else recipe.training["per_device_train_batch_size"]
    examples, _ = build_sft_dataset(tokenizer, os.path.join(ROOT, recipe.data.train_file), recipe.data.max_length,
                                    limit=batch * args.batches)
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    batches = [collate(examples[i:i + batch]) for i in range(0, batch * args.batches, batch)]
    return dense, recipe.routing, batches


def d512(args, device, dtype):
    """A random Llama of --layers/2 layers expanded LLaMA-Pro to --layers (copies initialised as copies)."""
    recipe = load_recipe_config(RECIPE)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.d_ff,
                         num_hidden_layers=args.layers // 2, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    plan = dlo.ExpansionPlan.llama_pro(num_layers=args.layers // 2, groups=args.layers // 2, init="copy")
    dense = dlo.expand_model(LlamaForCausalLM(config).to(dtype), plan)
    ids = torch.randint(0, args.vocab, (args.batches, args.batch, args.seq))
    batches = [{"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)} for x in ids]
    return dense, recipe.routing, batches


MODELS = {"tiny": tiny_default, "d512": d512}


def candidates(dense, routing, backend, random_routers: bool, anneal_steps: int | None):
    """{name: (model to call, model whose parameters train)} for the four candidates."""
    if anneal_steps is not None:
        routing = dataclasses.replace(routing, anneal_steps=anneal_steps)
    routed = dlo.attach_routers(copy.deepcopy(dense), routing)
    if random_routers:  # scores differ, so selections are not a prefix of the sequence
        for layer in dlo.routed_layers(routed):
            torch.nn.init.normal_(layer.router.weight, std=layer.router.weight.shape[-1] ** -0.5)
    models = {"dense": dense, "dense+c": copy.deepcopy(dense), "routed": routed, "routed+c": copy.deepcopy(routed)}
    return {name: (torch.compile(m, backend=backend) if name.endswith("+c") else m, m.train())
            for name, m in models.items()}


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def run_model(name, args, device, dtype):
    dense, routing, batches = MODELS[name](args, device, dtype)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    torch._dynamo.reset()
    counters.clear()
    models = candidates(dense.to(device), routing, args.backend, random_routers=name == "d512",
                        anneal_steps=args.anneal_steps)
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, (_, m) in models.items()}
    seconds = {n: [] for n in models}
    graphs = {n: 0 for n in models}
    losses = {n: [] for n in models}
    for r in range(args.warmup + args.repeats):
        batch = batches[r % len(batches)]
        for n, (call, _) in models.items():
            before = unique_graphs()
            common._sync(device)
            t0 = time.perf_counter()
            out = call(**batch, use_cache=False)
            out.loss.backward()
            optimizers[n].step()
            optimizers[n].zero_grad(set_to_none=True)
            common._sync(device)
            elapsed = time.perf_counter() - t0
            losses[n].append(out.loss.item())
            if r >= args.warmup:
                seconds[n].append(elapsed)
                graphs[n] += unique_graphs() - before
            elif r == 0:
                print(f"{name} {n}: first step {elapsed:.1f} s", flush=True)
    base = seconds["dense"]
    rows = []
    for n in models:
        row = dict(model=name, candidate=n, **common.summarize(seconds[n], base), graphs_after_warmup=graphs[n])
        if n.endswith("+c"):
            eager = n.removesuffix("+c")
            row["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(losses[n], losses[eager]))
        rows.append(row)
    routed_state = dlo.routing_state(models["routed+c"][1])
    info = dict(model=name, layers=dense.config.num_hidden_layers, hidden=dense.config.hidden_size,
                routed_layers=[layer.layer_index for layer in dlo.routed_layers(models["routed"][1])],
                batch_shapes=[list(b["input_ids"].shape) for b in batches], routing_steps=int(routed_state.step),
                graph_breaks=sum(counters["graph_break"].values()),
                # Past torch._dynamo.config.recompile_limit a function silently runs eagerly from then on.
                recompile_limit_hits=sum(n for msg, n in counters["unimplemented"].items()
                                         if "recompile limit" in msg),
                graph_break_reasons=sorted({msg.splitlines()[0] for msg in counters["graph_break"]}))
    return rows, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(p, cpu=CPU, cuda=CUDA)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--backend", help="torch.compile backend (default: inductor; aot_eager with --quick)")
    p.add_argument("--batches", type=int, default=2, help="distinct batches the rounds cycle through")
    p.add_argument("--anneal-steps", type=int,
                   help="routing.anneal_steps (default: the recipe's 60; 8 with --quick, so that at its short "
                        "sequences the packed width changes every step from the first)")
    p.add_argument("--out", default="benchmark_compiled.json")
    args = p.parse_args(argv)
    device, dtype = common.resolve_sizes(args, cpu=CPU, cuda=CUDA, quick=QUICK)
    args.backend = args.backend or ("aot_eager" if args.quick else "inductor")
    if args.anneal_steps is None and args.quick:
        args.anneal_steps = 8
    rows, models = [], []
    for name in args.models:
        model_rows, info = run_model(name, args, device, dtype)
        rows += model_rows
        models.append(info)
    load = os.getloadavg()
    result = dict(environment=dict(common.environment(device, dtype), load_average=load),
                  config=dict(backend=args.backend, anneal_steps=args.anneal_steps, repeats=args.repeats,
                              warmup=args.warmup, batches=args.batches,
                              d512=dict(d=args.d, d_ff=args.d_ff, heads=args.heads, kv_heads=args.kv_heads,
                                        seq=args.seq, batch=args.batch, layers=args.layers, vocab=args.vocab)),
                  models=models, timings=rows)
    env = result["environment"]
    print(f"{env['device']} | {env['dtype']} | backend {args.backend} | load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}")
    print(f"training step, median of {args.repeats} rounds after {args.warmup} warm-up; ratio to eager dense")
    print(f"{'model':>6} {'candidate':>9} {'ms':>9} {'ratio':>17} {'graphs':>6} {'loss diff':>9}")
    for row in rows:
        diff = f"{row['loss_max_abs_diff']:.1e}" if "loss_max_abs_diff" in row else "-"
        print(f"{row['model']:>6} {row['candidate']:>9} {row['ms']:>9.1f} {common.fmt_ratio(row):>17} "
              f"{row['graphs_after_warmup']:>6} {diff:>9}")
    for info in models:
        print(f"{info['model']}: batches {info['batch_shapes']}, graph breaks {info['graph_breaks']}, "
              f"recompile limit hits {info['recompile_limit_hits']}, "
              f"routing steps committed {info['routing_steps']}")
    for info in models:  # routed compiled vs eager: the speedup compiling buys
        by = {r["candidate"]: r for r in rows if r["model"] == info["model"]}
        ratios = [c / e for c, e in zip(by["routed+c"]["samples_ms"], by["routed"]["samples_ms"])]
        print(f"{info['model']}: routed compiled / eager {statistics.median(ratios):.2f}")
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
