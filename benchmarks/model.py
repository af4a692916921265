"""A whole small routed model against the same model without routers: forward+backward and a training step.

    python benchmarks/model.py             # CPU: fp32, 8 layers, d=1024, T=1024, batch 2
    python benchmarks/model.py --quick     # smoke run at tiny sizes
    python benchmarks/model.py --device cuda   # GPU defaults: bf16, d=4096, T=4096, Triton kernels

A random Llama of --layers/2 layers is expanded LLaMA-Pro style (a zero-init copy after every
layer, dlo.ExpansionPlan.llama_pro) to --layers layers; routers go on the copies (half the layers).
  dense    the expanded model, no routers
  block    routers on the copies, block granularity, capacity c
  mlp      the same with mlp granularity
"fwd+bwd" is the task loss's forward and backward; "step" a training step: forward, task loss plus
--router-loss-weight x the router loss, which the routed model adds to its loss (labels --label), backward,
AdamW step. The candidates take turns in each of --repeats rounds after --warmup rounds;
figures are medians, ratios the median of per-round ratios to dense (spread: min-max). "flops" is
the analytic forward-FLOPs ratio (dlo.flops), the limit the measured ratio would reach if every
FLOP cost the same. "saved MB": what autograd keeps for backward (parameters excluded).
Prints a table and writes --out (JSON).

What similarity labels cost, and their quality against the dense pass: benchmarks/similarity.py.
"""

import argparse
import copy

import common
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dlo
from dlo.flops import model_flops

APPROACHES = ("dense", "block", "mlp")
MODES = ("fwd+bwd", "step")
CPU = dict(d=1024, heads=16, kv_heads=4, seq=1024, batch=2, layers=8, vocab=8192, repeats=3, warmup=1)
CUDA = dict(d=4096, heads=32, kv_heads=8, seq=4096, batch=1, layers=8, vocab=32000, repeats=5, warmup=2)
QUICK = dict(d=64, heads=4, kv_heads=2, seq=32, batch=2, layers=4, vocab=128, repeats=1, warmup=1)


def build(args, device, dtype):
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.d_ff,
                         num_hidden_layers=args.layers // 2, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    plan = dlo.ExpansionPlan.llama_pro(num_layers=args.layers // 2, groups=args.layers // 2)
    dense = dlo.expand_model(base, plan).to(device=device, dtype=dtype).train()
    models = {"dense": dense}
    for granularity in ("block", "mlp"):
        routed = dlo.attach_routers(copy.deepcopy(dense), dlo.RoutingConfig(
            layers="new", granularity=granularity, label=args.label, router_loss_weight=args.router_loss_weight))
        for layer in dlo.routed_layers(routed):  # random routers, so scores differ and selections are not a prefix
            torch.nn.init.normal_(layer.router.weight, std=args.d**-0.5)
        models[granularity] = routed.train()
    return models


def closures(models, ids, optimizers):
    """{(approach, mode): fn} running one fwd+bwd or one training step of each model."""
    def fwd_bwd(model):
        def go():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return go

    def train_step(model, opt):
        def go():
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # routed: task + weighted router loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        return go

    fns = {}
    for name, model in models.items():
        fns[name, "fwd+bwd"] = fwd_bwd(model)
        fns[name, "step"] = train_step(model, optimizers[name])
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(p, cpu=CPU, cuda=CUDA)
    p.add_argument("--capacities", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--label", default="self", choices=["self", "cos", "cos-global"])
    p.add_argument("--router-loss-weight", type=float, default=0.1)
    p.add_argument("--out", default="benchmark_model.json")
    args = p.parse_args(argv)
    device, dtype = common.resolve_sizes(args, cpu=CPU, cuda=CUDA, quick=QUICK)
    models = build(args, device, dtype)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-6) for name, m in models.items()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    dense_flops = model_flops(models["dense"].config, args.seq)["total"]
    routed_layers = [layer.layer_index for layer in dlo.routed_layers(models["block"])]
    timings, memory = [], []
    for c in args.capacities:
        for name in ("block", "mlp"):
            dlo.set_capacity(models[name], c)
        fns = closures(models, ids, optimizers)
        for name, model in models.items():
            loss = lambda model=model: model(input_ids=ids, labels=ids, use_cache=False).loss
            flops = dense_flops if name == "dense" else model_flops(
                model.config, args.seq, routed=dict.fromkeys(routed_layers, c), granularity=name)["total"]
            memory.append(dict(capacity=c, approach=name, flops_ratio=flops / dense_flops,
                               saved_bytes=common.saved_bytes(loss, exclude=list(model.parameters())),
                               peak_bytes=common.peak_bytes(fns[name, "step"], device)))
        samples = common.time_interleaved(fns, device, args.repeats, args.warmup)
        for (name, mode), s in samples.items():
            timings.append(dict(capacity=c, approach=name, mode=mode, **common.summarize(s, samples["dense", mode])))
        for m in memory[-len(models):]:
            m["saved_ratio"] = m["saved_bytes"] / memory[-len(models)]["saved_bytes"]
        print(f"c={c}: done", flush=True)

    result = dict(environment=common.environment(device, dtype),
                  config=dict(d=args.d, d_ff=args.d_ff, heads=args.heads, kv_heads=args.kv_heads, seq=args.seq,
                              batch=args.batch, layers=args.layers, routed_layers=routed_layers, vocab=args.vocab,
                              label=args.label, router_loss_weight=args.router_loss_weight, repeats=args.repeats,
                              warmup=args.warmup, capacities=args.capacities),
                  timings=timings, memory=memory)
    env, cfg = result["environment"], result["config"]
    print(f"{env['device']} | {env['dtype']} | backend {env['backend']} | {cfg}")
    cell = {(r["capacity"], r["approach"], r["mode"]): r for r in timings}
    mem = {(m["capacity"], m["approach"]): m for m in memory}
    print(f"ratio to dense, median (min-max) of {args.repeats} rounds; saved MB for backward (ratio to dense)")
    print(f"{'c':>6} {'approach':>8} {'flops':>6} " + " ".join(f"{m + ' ms':>11} {m + ' ratio':>17}" for m in MODES)
          + f" {'saved MB':>16}")
    for c in args.capacities:
        for name in APPROACHES:
            m = mem[c, name]
            print(f"{c:>6} {name:>8} {m['flops_ratio']:>6.2f} "
                  + " ".join(f"{cell[c, name, mode]['ms']:>11.0f} {common.fmt_ratio(cell[c, name, mode]):>17}"
                             for mode in MODES)
                  + f" {m['saved_bytes'] / 2**20:>9.1f} ({m['saved_ratio']:.2f})")
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
