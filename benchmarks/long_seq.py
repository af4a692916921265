"""A block-routed decoder layer at real sequence lengths, in padded and unpadded training batches.

    python benchmarks/long_seq.py              # CPU: fp32, d=1024, T=2048 and 4096, batch 2; CUDA: bf16, d=4096
    python benchmarks/long_seq.py --quick      # smoke run at tiny sizes

One stock LlamaDecoderLayer (sdpa) in training mode, forward and backward (gradients of the input and every weight):
  dense    the stock layer on every token, with the model's (B, 1, T, T) mask when the batch is padded
  block    dlo block routing at capacity c (top-k per row: k = ceil(c * n) of the row's n real tokens)
  packed   block's limit: the stock layer on an already packed (B, ceil(c * T), d) batch, plain causal
"padded" batches carry 30% padding (row lengths T and 0.4 T, right-padded); the model's mask is built once per
forward for every layer, so it is an input here, not counted. Timing: the candidates take turns in each of
--repeats rounds after --warmup rounds; ratios are medians of per-round ratios to dense (min-max). "saved MB" is what
autograd keeps for backward (parameters, the input and the model's mask excluded), also for "block (mask path)":
block routing with the packed mask gathered from the model's mask (the reference path, dlo/attention.py), not timed.
"""

import argparse
import copy
import math

import common
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dlo
from dlo import attention
from dlo.routing import RoutedDecoderLayer

CAPACITIES = (0.5, 0.25)
PADDINGS = ("unpadded", "padded")
SHORT_ROW = 0.4  # the padded batch's second row: 0.4 T real tokens, so 30% of a batch of two is padding
CPU = dict(d=1024, heads=16, kv_heads=4, batch=2, repeats=3, warmup=1)
CUDA = dict(d=4096, heads=32, kv_heads=8, batch=2, repeats=10, warmup=2)
QUICK = dict(d=64, heads=4, kv_heads=2, batch=2, repeats=1, warmup=1)
SEQS = dict(cpu=[2048, 4096], cuda=[2048, 4096], quick=[64])


def build(args, seq, device, dtype):
    """The stock layer and its block-routed twin (same weights, a random router so scores differ)."""
    config = LlamaConfig(vocab_size=128, hidden_size=args.d, intermediate_size=args.d_ff, num_hidden_layers=1,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=seq, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    twin = dlo.attach_routers(copy.deepcopy(model), dlo.RoutingConfig(layers="all", label="self")).train()
    routed = dlo.routed_layers(twin)[0]
    torch.nn.init.normal_(routed.router.weight, std=args.d**-0.5)
    return model, model.model.layers[0], routed, dlo.routing_state(twin)


def batch_masks(B, T, padded, device):
    """(padding mask (B, T) bool or None, the model's sdpa mask (B, 1, T, T) bool or None)."""
    if not padded:
        return None, None
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    valid[1:, math.ceil(SHORT_ROW * T):] = False
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return valid, causal[None, None] & valid[:, None, None, :]


def cases(stock, routed, state, c, x, pos, pe, valid, model_mask):
    """{name: (fn(h) -> y, input, parameters)} at capacity c; 'packed' gets its own pre-gathered input."""
    with torch.no_grad():
        routed.capacity.fill_(c)
    K = math.ceil(c * x.shape[1])
    idx = torch.sort(torch.randperm(x.shape[1], device=x.device)[:K]).values.expand(x.shape[0], K)  # (B, K)
    x_packed = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])).contiguous()
    pe_packed = tuple(t.expand(x.shape[0], -1, -1).gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
                      for t in pe)

    def block(h):
        inputs = state.inputs(True, h.shape[1], valid, False, h.device)
        return routed(h, attention_mask=model_mask, position_ids=pos, position_embeddings=pe, dlo_routing=inputs)

    return {
        "dense": (lambda h: stock(h, attention_mask=model_mask, position_ids=pos, position_embeddings=pe), x,
                  list(stock.parameters())),
        "block": (block, x, list(routed.parameters())),
        "packed": (lambda h: stock(h, attention_mask=None, position_ids=idx, position_embeddings=pe_packed),
                   x_packed, list(stock.parameters())),
    }


def step(fn, h, params, dy):
    """A closure running fn(h) and the gradients of h and params."""
    h = h.detach().requires_grad_()
    return lambda: torch.autograd.grad(fn(h), [h, *params], dy)


def saved(fn, h, params, model_mask) -> int:
    h = h.detach().requires_grad_()
    extra = [] if model_mask is None else [model_mask]
    return common.saved_bytes(lambda: fn(h), exclude=[h, *params, *extra])


def saved_on_mask_path(fn, h, params, model_mask) -> int:
    """Saved bytes of block routing when it reads the packed mask from the model's mask (the reference path)."""
    original = RoutedDecoderLayer._attention_path
    RoutedDecoderLayer._attention_path = lambda self, *args: attention.REFERENCE
    try:
        return saved(fn, h, params, model_mask)
    finally:
        RoutedDecoderLayer._attention_path = original


def measure(args, seq, device, dtype):
    model, stock, routed, state = build(args, seq, device, dtype)
    B, d = args.batch, args.d
    pos = torch.arange(seq, device=device).unsqueeze(0)
    x = torch.randn(B, seq, d, device=device, dtype=dtype)
    pe = model.model.rotary_emb(x, pos)
    timings, memory = [], []
    for padding in PADDINGS:
        valid, model_mask = batch_masks(B, seq, padding == "padded", device)
        fns = {}
        for c in args.capacities:
            for name, (fn, h, params) in cases(stock, routed, state, c, x, pos, pe, valid, model_mask).items():
                if name == "dense" and "dense" in fns:
                    continue
                key = "dense" if name == "dense" else f"{name} c={c}"
                fns[key] = step(fn, h, params, torch.randn_like(fn(h.detach())))
                row = dict(seq=seq, padding=padding, capacity=None if name == "dense" else c, approach=name,
                           saved_bytes=saved(fn, h, params, model_mask))
                if name == "block":
                    row["saved_bytes_mask_path"] = saved_on_mask_path(fn, h, params, model_mask)
                memory.append(row)
                if name == "block":  # the routed layer's capacity is set per case: time it at this one
                    fns[key] = capacity_step(routed, c, fns[key])
        samples = common.time_interleaved(fns, device, args.repeats, args.warmup)
        for key, s in samples.items():
            name, _, c = key.partition(" c=")
            timings.append(dict(seq=seq, padding=padding, capacity=float(c) if c else None, approach=name,
                                **common.summarize(s, samples["dense"])))
        print(f"T={seq} {padding}: done", flush=True)
    dense = {m["padding"]: m["saved_bytes"] for m in memory if m["approach"] == "dense"}
    for m in memory:
        m["saved_ratio"] = m["saved_bytes"] / dense[m["padding"]]
        if "saved_bytes_mask_path" in m:
            m["saved_ratio_mask_path"] = m["saved_bytes_mask_path"] / dense[m["padding"]]
    return timings, memory


def capacity_step(routed, c, run):
    def go():
        with torch.no_grad():
            routed.capacity.fill_(c)
        return run()
    return go


def targets(timings, memory, seq, c):
    """The two figures the padded case is held to: activation memory and step-time ratio against unpadded."""
    t = {(r["padding"]): r["ratio"] for r in timings
         if r["seq"] == seq and r["approach"] == "block" and r["capacity"] == c}
    m = next(r["saved_ratio"] for r in memory
             if r["seq"] == seq and r["padding"] == "padded" and r["approach"] == "block" and r["capacity"] == c)
    return dict(seq=seq, capacity=c, padded_saved_ratio=m, padded_time_ratio=t["padded"],
                unpadded_time_ratio=t["unpadded"], time_ratio_gap=abs(t["padded"] - t["unpadded"]))


def print_tables(result):
    print(f"{result['environment']['device']} | {result['environment']['dtype']} | {result['config']}")
    cell = {(r["seq"], r["padding"], r["capacity"], r["approach"]): r for r in result["timings"]}
    mem = {(r["seq"], r["padding"], r["capacity"], r["approach"]): r for r in result["memory"]}
    print("\nfwd+bwd: dense ms; ratio to dense, median (min-max); saved for backward: ratio to dense")
    print(f"{'T':>5} {'batch':>9} {'c':>5} {'dense ms':>9} {'block':>17} {'packed':>17} {'block saved':>11} "
          f"{'mask path':>9} {'packed saved':>12}")
    for seq in result["config"]["seqs"]:
        for padding in PADDINGS:
            for c in result["config"]["capacities"]:
                dense = cell[seq, padding, None, "dense"]
                print(f"{seq:>5} {padding:>9} {c:>5} {dense['ms']:>9.0f} "
                      f"{common.fmt_ratio(cell[seq, padding, c, 'block']):>17} "
                      f"{common.fmt_ratio(cell[seq, padding, c, 'packed']):>17} "
                      f"{mem[seq, padding, c, 'block']['saved_ratio']:>11.2f} "
                      f"{mem[seq, padding, c, 'block']['saved_ratio_mask_path']:>9.2f} "
                      f"{mem[seq, padding, c, 'packed']['saved_ratio']:>12.2f}")
    for t in result["targets"]:
        print(f"target T={t['seq']} c={t['capacity']}: padded saved {t['padded_saved_ratio']:.2f} of dense; "
              f"time ratio padded {t['padded_time_ratio']:.2f} vs unpadded {t['unpadded_time_ratio']:.2f} "
              f"(gap {t['time_ratio_gap']:.2f})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(p, cpu=CPU, cuda=CUDA)
    p.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default: 2048 4096)")
    p.add_argument("--capacities", type=float, nargs="+", default=list(CAPACITIES))
    p.add_argument("--out", default="benchmark_long_seq.json")
    args = p.parse_args(argv)
    device, dtype = common.resolve_sizes(args, cpu=CPU, cuda=CUDA, quick=QUICK)
    if args.seqs is None:
        args.seqs = SEQS["quick" if args.quick else device.type]
    timings, memory, done = [], [], []
    for seq in args.seqs:  # the JSON is rewritten after every length: a long run keeps what it measured
        t, m = measure(args, seq, device, dtype)
        timings += t
        memory += m
        done.append(seq)
        result = dict(environment=common.environment(device, dtype),
                      config=dict(d=args.d, d_ff=args.d_ff, heads=args.heads, kv_heads=args.kv_heads, seqs=done,
                                  batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                                  capacities=args.capacities, padded_rows=[1.0, SHORT_ROW]),
                      timings=timings, memory=memory,
                      targets=[targets(timings, memory, s, c) for s in done for c in args.capacities])
        print_tables(result)
        print()
        common.write_json(result, args.out)


if __name__ == "__main__":
    main()
