"""A real model at its own shape: SmolLM2-135M-Instruct expanded 30 -> 36 layers, routed vs dense vs the packed limit.

    python benchmarks/real_model.py --threads 1            # the real model (make real-model), CPU fp32
    python benchmarks/real_model.py --profile --threads 1  # also: per-op self CPU time, routed-all vs limit-all
    python benchmarks/real_model.py --model model.gguf     # another Llama checkpoint or GGUF file
    python benchmarks/real_model.py --quick --model DIR --groups 2   # smoke run: one round, short sequences

--model (dlo.checkpoints.resolve_model_dir: a directory, hub id or GGUF file) is expanded LLaMA-Pro style
(dlo.ExpansionPlan.llama_pro, a zero-init copy after each of --groups groups). Candidates, block granularity,
labels --label, random routers (so selections are not a prefix):
  dense       the expanded model, no routers: the baseline of every ratio
  routed-new  routers on the --groups new layers
  limit-new   routed-new's packed limit: the stock layers it routes run on the first ceil(c T) tokens of every row
              (benchmarks/similarity.py's PrefixLayer: no router, selection, gather or combine), nothing else
              routed; the embedding, the other layers, the LM head and the loss see all T tokens
  routed-all  routers on every layer (what the issue's user tried: c = 0.5, 'self' labels, batch 2 x 256)
  limit-all   routed-all's packed limit: every layer on ceil(c T) tokens
"step" is a training step at each of --capacities: forward, task loss (+ router_loss_weight x the router loss,
which the routed model adds to its loss), backward, AdamW step. The limits share dense's weights and optimizer.
"gap" is routed/dense - limit/dense per round: what routing costs beyond the tokens it skips (target <= 0.05).
Inference at --infer-capacity, thresholds calibrated (dlo.calibrate on --calib-batches random batches), eval mode,
no grad: "prefill" a forward of batch x --prefill-seq tokens with use_cache=True (limits as above); "decode" ms per
new token of greedy generate() with the KV cache (benchmarks/decode.py's timing: (t(N+1 tokens) - t(1 token)) / N
over --new-tokens after a --prompt prompt), no limit. "run share": tokens that ran a routed layer over all its
tokens; "K/T" (prefill) the packed width over T: thresholds give each row its own count and a packed batch is
as wide as its fullest row. --profile: self CPU ms per op of one training step of routed-all and limit-all, the
median of --repeats profiled steps taken in turns. The candidates take turns in every round; figures are medians
over --repeats rounds after --warmup, ratios the median of per-round ratios to dense (spread min-max). Prints a
table with the machine and the load average, and writes --out (JSON).
"""

import argparse
import contextlib
import copy
import os
import statistics
from collections import defaultdict

import common
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import dlo
from dlo.checkpoints import resolve_model_dir
from dlo.routing import packed_width

decode = common.sibling("decode")
PrefixLayer = common.sibling("similarity").PrefixLayer

ROUTED = {"routed-new": "new", "routed-all": "all"}  # candidate -> RoutingConfig.layers
LIMIT = {"routed-new": "limit-new", "routed-all": "limit-all"}
TRAIN = ("dense", "routed-new", "limit-new", "routed-all", "limit-all")
DEFAULTS = dict(seq=256, batch=2, prefill_seq=128, prompt=32, new_tokens=32, batch_sizes=[1, 8], calib_batches=4,
                repeats=3, warmup=1)
QUICK = dict(seq=32, batch=2, prefill_seq=16, prompt=8, new_tokens=4, batch_sizes=[1, 2], calib_batches=1,
             repeats=1, warmup=1)


def build(args, device):
    """The expanded dense model and its routed twins, fp32, training mode."""
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=torch.float32,
                                                attn_implementation="sdpa")
    plan = dlo.ExpansionPlan.llama_pro(num_layers=base.config.num_hidden_layers, groups=args.groups, init="zero")
    dense = dlo.expand_model(base, plan).to(device).train()
    routed = {}
    for name, layers in ROUTED.items():
        model = dlo.attach_routers(copy.deepcopy(dense), dlo.RoutingConfig(
            layers=layers, granularity="block", label=args.label, router_loss_weight=args.router_loss_weight))
        for layer in dlo.routed_layers(model):
            torch.nn.init.normal_(layer.router.weight, std=model.config.hidden_size**-0.5)
        routed[name] = model.train()
    return dense, routed


def limit_layers(dense, routed, width: int) -> torch.nn.ModuleList:
    """dense's decoder layers, those ``routed`` routes wrapped to run on the first ``width`` tokens only."""
    indices = {layer.layer_index for layer in dlo.routed_layers(routed)}
    return torch.nn.ModuleList(PrefixLayer(layer, width) if i in indices else layer
                               for i, layer in enumerate(dense.model.layers))


@contextlib.contextmanager
def swapped(model, layers: torch.nn.ModuleList | None):
    """``model`` with its decoder layers replaced by ``layers`` (None: as it is) while the block runs."""
    if layers is None:
        yield
        return
    stock, model.model.layers = model.model.layers, layers
    try:
        yield
    finally:
        model.model.layers = stock


def candidates(dense, routed, limits) -> dict:
    """{name: (model, layers to swap in or None)} in TRAIN order; limits: {limit name: layers}."""
    out = {"dense": (dense, None)}
    for name, model in routed.items():
        out[name] = (model, None)
        out[LIMIT[name]] = (dense, limits[LIMIT[name]])
    return out


def training_step(model, layers, optimizer, ids):
    def go():
        with swapped(model, layers):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # routed: task + weighted router loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return go


def per_round_gap(routed: list, limit: list, dense: list) -> float:
    return statistics.median((r - lim) / d for r, lim, d in zip(routed, limit, dense))


def op_times(fns: dict, rounds: int) -> dict:
    """{name: {op: self CPU ms}} of one call of each fn: the median over ``rounds`` profiled calls, taken in
    turns as the timing is (a profile is wall time per op, so load spikes hit single calls)."""
    per = {name: defaultdict(list) for name in fns}
    for _ in range(rounds):
        for name, go in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                go()
            for e in prof.key_averages():
                per[name][e.key].append(e.self_cpu_time_total / 1e3)
    return {name: {op: statistics.median(v + [0.0] * (rounds - len(v))) for op, v in ops.items()}
            for name, ops in per.items()}


def measure_training(args, dense, routed, device) -> tuple[list, dict]:
    ids = torch.randint(3, dense.config.vocab_size, (args.batch, args.seq), device=device)
    optimizers = {"dense": torch.optim.AdamW(dense.parameters(), lr=1e-6)}
    optimizers.update({name: torch.optim.AdamW(m.parameters(), lr=1e-6) for name, m in routed.items()})
    rows, profiles = [], {}
    for c in args.capacities:
        for model in routed.values():
            dlo.set_capacity(model, c)
        width = packed_width(c, args.seq)
        limits = {LIMIT[name]: limit_layers(dense, model, width) for name, model in routed.items()}
        cands = candidates(dense, routed, limits)
        fns = {name: training_step(model, layers, optimizers["dense" if model is dense else name], ids)
               for name, (model, layers) in cands.items()}
        samples = common.time_interleaved(fns, device, args.repeats, args.warmup)
        for name in TRAIN:
            row = dict(capacity=c, candidate=name, width=width, **common.summarize(samples[name], samples["dense"]))
            if name in ROUTED:
                row["gap"] = per_round_gap(samples[name], samples[LIMIT[name]], samples["dense"])
            rows.append(row)
        if args.profile:
            profiles[str(c)] = op_times({name: fns[name] for name in ("routed-all", "limit-all")}, args.repeats)
        print(f"training c={c}: done", flush=True)
    return rows, profiles


def prefill_shares(model, ids) -> tuple[float, float]:
    """(share of tokens that ran, packed width K / T), means over the routed layers. Thresholds give each row
    its own count, and a packed batch is as wide as its fullest row: K / T is what the layers computed."""
    records = model(input_ids=ids, use_cache=True, output_router_logits=True).routing
    run = statistics.mean(float(r.selected[r.valid].float().mean()) for r in records)
    width = statistics.mean(float(r.selected.sum(1).max()) / r.selected.shape[1] for r in records)
    return run, width


def measure_inference(args, dense, routed, device) -> tuple[list, list]:
    vocab = dense.config.vocab_size
    calibration = [{"input_ids": torch.randint(3, vocab, (4, args.prefill_seq))} for _ in range(args.calib_batches)]
    dense.eval()
    for model in routed.values():
        model.eval()
        dlo.set_capacity(model, args.infer_capacity)
        dlo.calibrate(model, calibration, progress=False)
    width = packed_width(args.infer_capacity, args.prefill_seq)
    cands = candidates(dense, routed, {LIMIT[name]: limit_layers(dense, model, width)
                                       for name, model in routed.items()})
    prefill, decoding = [], []
    with torch.no_grad():
        for b in args.batch_sizes:
            ids = torch.randint(3, vocab, (b, args.prefill_seq), device=device)

            def forward(model, layers, ids=ids):
                def go():
                    with swapped(model, layers):
                        model(input_ids=ids, use_cache=True)
                return go

            samples = common.time_interleaved({name: forward(*cand) for name, cand in cands.items()}, device,
                                              args.repeats, args.warmup)
            for name in TRAIN:
                row = dict(batch=b, candidate=name, **common.summarize(samples[name], samples["dense"]))
                if name in ROUTED:
                    row["gap"] = per_round_gap(samples[name], samples[LIMIT[name]], samples["dense"])
                    row["run_share"], row["packed_share"] = prefill_shares(routed[name], ids)
                prefill.append(row)

            prompt = torch.randint(3, vocab, (b, args.prompt), device=device)
            models = {"dense": dense, **routed}
            timers = {name: lambda ids, n, model=model: decode.generate_seconds(model, ids, n)
                      for name, model in models.items()}
            samples = decode.decode_seconds(timers, prompt, args.new_tokens, args.repeats)
            for name in models:
                row = dict(batch=b, candidate=name, **common.summarize(samples[name], samples["dense"]))
                if name in ROUTED:
                    row["run_share"], row["idle_layer_steps"] = decode.decode_routing_shares(
                        routed[name], prompt, args.new_tokens, {})
                decoding.append(row)
            print(f"inference batch {b}: done", flush=True)
    return prefill, decoding


def print_report(result):
    env, cfg = result["environment"], result["config"]
    print(f"{env['device']} | {env['dtype']} | torch {env['torch']} | transformers {env['transformers']} | load "
          f"average {result['load_average_before']:.2f} -> {result['load_average_after']:.2f}")
    print(f"{cfg['model']}: {cfg['base_layers']} -> {cfg['layers']} layers, routed-new layers {cfg['new_layers']}; "
          f"ratios to dense, median (min-max) of {cfg['repeats']} rounds; gap = routed - limit")
    print(f"training step, batch {cfg['batch']} x {cfg['seq']}, labels {cfg['label']}")
    print(f"{'c':>5} {'candidate':>11} {'ms':>9} {'ratio':>17} {'gap':>6}")
    for r in result["training"]:
        gap = f"{r['gap']:>6.3f}" if "gap" in r else ""
        print(f"{r['capacity']:>5} {r['candidate']:>11} {r['ms']:>9.0f} {common.fmt_ratio(r):>17} {gap}")
    print(f"prefill, {cfg['prefill_seq']} tokens per row, c={cfg['infer_capacity']} calibrated")
    print(f"{'batch':>5} {'candidate':>11} {'ms':>9} {'ratio':>17} {'gap':>6} {'run share':>9} {'K/T':>5}")
    for r in result["prefill"]:
        extra = f"{r['gap']:>6.3f} {r['run_share']:>9.2f} {r['packed_share']:>5.2f}" if "gap" in r else ""
        print(f"{r['batch']:>5} {r['candidate']:>11} {r['ms']:>9.1f} {common.fmt_ratio(r):>17} {extra}")
    print(f"decode, ms per new token, prompt {cfg['prompt']}, {cfg['new_tokens']} new tokens")
    print(f"{'batch':>5} {'candidate':>11} {'ms':>9} {'ratio':>17} {'run share':>9} {'idle steps':>10}")
    for r in result["decode"]:
        extra = f"{r['run_share']:>9.2f} {r['idle_layer_steps']:>10.2f}" if "run_share" in r else ""
        print(f"{r['batch']:>5} {r['candidate']:>11} {r['ms']:>9.2f} {common.fmt_ratio(r):>17}        {extra}")
    for c, per in result["profile"].items():
        routed, limit = per["routed-all"], per["limit-all"]
        total = sum(routed.values())
        print(f"\nprofile, training step at c={c}: self CPU ms per op (median of {cfg['repeats']}), the 15 largest "
              f"routed-all - limit-all, and that difference's share of routed-all's total")
        print(f"{'op':<44} {'routed-all':>10} {'limit-all':>10} {'diff':>8} {'share':>6}")
        for op in sorted(set(routed) | set(limit), key=lambda k: -(routed.get(k, 0.0) - limit.get(k, 0.0)))[:15]:
            r, lim = routed.get(op, 0.0), limit.get(op, 0.0)
            print(f"{op[:44]:<44} {r:>10.1f} {lim:>10.1f} {r - lim:>8.1f} {(r - lim) / total:>6.1%}")
        print(f"{'total':<44} {total:>10.1f} {sum(limit.values()):>10.1f} {total - sum(limit.values()):>8.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/models/smollm2-135m-instruct",
                   help="a Llama checkpoint directory, hub id or GGUF file (make real-model writes the default)")
    p.add_argument("--groups", type=int, default=6, help="LLaMA-Pro groups: one zero-init copy after each")
    p.add_argument("--capacities", type=float, nargs="+", default=[0.5, 0.25], help="training-step capacities")
    p.add_argument("--infer-capacity", type=float, default=0.5, help="prefill and decode capacity")
    p.add_argument("--label", default="self", choices=["self", "cos", "cos-global"])
    p.add_argument("--router-loss-weight", type=float, default=0.1)
    for name, value in DEFAULTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, nargs="+" if isinstance(value, list) else None,
                       help=f"default: {value} ({QUICK[name]} with --quick)")
    p.add_argument("--profile", action="store_true", help="also profile one training step of routed-all and "
                   "limit-all per capacity (self CPU time per op)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="short sequences, one timed round: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmark_real_model.json")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    load_before = os.getloadavg()[0]  # other processes on the machine skew CPU timings
    dense, routed = build(args, device)
    new_layers = [layer.layer_index for layer in dlo.routed_layers(routed["routed-new"])]
    training, profiles = measure_training(args, dense, routed, device)
    prefill, decoding = measure_inference(args, dense, routed, device)
    result = dict(environment=common.environment(device, torch.float32), load_average_before=load_before,
                  load_average_after=os.getloadavg()[0],
                  config=dict(model=args.model, base_layers=dense.config.num_hidden_layers - args.groups,
                              layers=dense.config.num_hidden_layers, new_layers=new_layers,
                              hidden_size=dense.config.hidden_size, vocab=dense.config.vocab_size,
                              label=args.label, router_loss_weight=args.router_loss_weight,
                              capacities=args.capacities, infer_capacity=args.infer_capacity,
                              **{name: getattr(args, name) for name in DEFAULTS}),
                  training=training, prefill=prefill, decode=decoding, profile=profiles)
    print_report(result)
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
