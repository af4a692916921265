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
--router-loss-weight x the router loss, which the routed model adds to its loss (labels --label; "self"
needs no dense similarity pass),
backward, AdamW step. The candidates take turns in each of --repeats rounds after --warmup rounds;
figures are medians, ratios the median of per-round ratios to dense (spread: min-max). "flops" is
the analytic forward-FLOPs ratio (dlo.flops), the limit the measured ratio would reach if every
FLOP cost the same. "saved MB": what autograd keeps for backward (parameters excluded).
Prints a table and writes --out (JSON).

    python benchmarks/model.py --similarity --d 512 --seq 512 --batch 4 --layers 4

--similarity: what similarity labels cost and how close the packed source's labels come to the dense
pass's. A random Llama of --layers layers, every layer block-routed, trains one step per candidate:
self, cos and cos-global with the packed source (the default) and cos-global with the dense source
(the reference); step ratios to the unrouted model at each capacity, activation memory, and, on the
same batch and weights, the agreement of packed and dense run/skip labels and of the cos-global
capacity shares.
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


SIMILARITY_CANDIDATES = (("self", "packed"), ("cos", "packed"), ("cos-global", "packed"), ("cos-global", "dense"))


def similarity_mode(args, device, dtype):
    """Training-step ratios per label and source at each capacity, and packed-vs-dense label agreement."""
    from dlo.losses import label_run_counts, router_labels

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.d_ff,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    dense = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    models = {"dense": dense}
    for label, source in SIMILARITY_CANDIDATES:
        routed = dlo.attach_routers(copy.deepcopy(dense), dlo.RoutingConfig(
            layers="all", label=label, similarity_source=source, router_loss_weight=args.router_loss_weight))
        for layer, reference in zip(dlo.routed_layers(routed), dlo.routed_layers(models.get("self", routed))):
            if routed is models.get("self", routed):
                torch.nn.init.normal_(layer.router.weight, std=args.d**-0.5)
            else:  # every candidate routes alike: the routers of the first
                layer.router.load_state_dict(reference.router.state_dict())
        models[f"{label}/{source}"] = routed.train()
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.0) for name, m in models.items()}
    timings, memory, quality = [], [], []
    for c in args.capacities:
        for name, model in models.items():
            if name != "dense":
                dlo.set_capacity(model, c)
        fns = {key: fn for key, fn in closures(models, ids, optimizers).items() if key[1] == "step"}
        for name, model in models.items():
            loss = lambda model=model: model(input_ids=ids, labels=ids, use_cache=False).loss
            memory.append(dict(capacity=c, approach=name,
                               saved_bytes=common.saved_bytes(loss, exclude=list(model.parameters()))))
        samples = common.time_interleaved(fns, device, args.repeats, args.warmup)
        for (name, mode), s in samples.items():
            timings.append(dict(capacity=c, approach=name, mode=mode, **common.summarize(s, samples["dense", mode])))
        with torch.no_grad():
            outs = {name: models[name](input_ids=ids, labels=ids, use_cache=False).routing
                    for name in ("cos/packed", "cos-global/packed", "cos-global/dense")}
        dense_records = outs["cos-global/dense"]
        for label in ("cos", "cos-global"):
            packed_records = outs[f"{label}/packed"]
            packed_labels = router_labels(packed_records, label)
            dense_labels = router_labels(dense_records, label)
            agree = [float(((a == b) & r.valid).sum() / r.valid.sum())
                     for a, b, r in zip(packed_labels, dense_labels, dense_records)]
            tokens = float(dense_records[0].valid.sum())
            quality.append(dict(capacity=c, label=label, agreement=agree,
                                run_share_packed=(label_run_counts(packed_records, packed_labels) / tokens).tolist(),
                                run_share_dense=(label_run_counts(dense_records, dense_labels) / tokens).tolist()))
        for model in models.values():
            if model is not dense:
                dlo.routing_state(model).discard_observations()
        print(f"c={c}: done", flush=True)
    result = dict(environment=common.environment(device, dtype),
                  config=dict(mode="similarity", d=args.d, d_ff=args.d_ff, heads=args.heads, kv_heads=args.kv_heads,
                              seq=args.seq, batch=args.batch, layers=args.layers, vocab=args.vocab,
                              repeats=args.repeats, warmup=args.warmup, capacities=args.capacities),
                  timings=timings, memory=memory, label_quality=quality)
    env = result["environment"]
    print(f"{env['device']} | {env['dtype']} | {result['config']}")
    cell = {(r["capacity"], r["approach"]): r for r in timings}
    mem = {(m["capacity"], m["approach"]): m["saved_bytes"] for m in memory}
    print(f"training step, ratio to dense, median (min-max) of {args.repeats} rounds; saved MB (ratio to self)")
    for c in args.capacities:
        for name in models:
            print(f"{c:>6} {name:>18} {cell[c, name]['ms']:>9.0f} ms {common.fmt_ratio(cell[c, name]):>17} "
                  f"{mem[c, name] / 2**20:>9.1f} MB ({mem[c, name] / mem[c, 'self/packed']:.2f})")
    for q in quality:
        print(f"c={q['capacity']} {q['label']}: label agreement per layer {[round(a, 3) for a in q['agreement']]}; "
              f"run share packed {[round(a, 3) for a in q['run_share_packed']]} "
              f"dense {[round(a, 3) for a in q['run_share_dense']]}")
    common.write_json(result, args.out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(p, cpu=CPU, cuda=CUDA)
    p.add_argument("--capacities", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--label", default="self", choices=["self", "cos", "cos-global"])
    p.add_argument("--router-loss-weight", type=float, default=0.1)
    p.add_argument("--similarity", action="store_true",
                   help="compare similarity labels instead: self / cos / cos-global, packed vs dense source")
    p.add_argument("--out", default="benchmark_model.json")
    args = p.parse_args(argv)
    device, dtype = common.resolve_sizes(args, cpu=CPU, cuda=CUDA, quick=QUICK)
    if args.similarity:
        return similarity_mode(args, device, dtype)

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
