"""One routed decoder layer against the same layer run dense and against two common peer approaches.

    python benchmarks/layer.py                       # CPU: fp32, d=1024, T=1024, batch 4; CUDA: bf16, d=4096, T=4096
    python benchmarks/layer.py --quick               # smoke run at tiny sizes
    python benchmarks/layer.py --profile 0.5 0.25    # also: where the block-routed layer's time goes

Every approach runs a stock LlamaDecoderLayer (sdpa attention) in training mode, where dlo picks
per sequence the k = ceil(c * T) top-scoring tokens (static shapes, no host sync):
  dense    the stock layer on every token (the baseline of every ratio)
  block    dlo block routing: gather the k tokens, attention + MLP on the packed batch, combine back
  mlp      dlo mlp routing: attention on every token, the MLP on the packed batch
  packed   block's physical limit: the stock layer on an already packed (B, k, d) batch; no router,
           selection, gather or combine
  mask     peer: run every token, multiply the update by the 0/1 decision
  boolidx  peer: per row h[mask] via .nonzero() and counts via .item() (host syncs), rows zero-padded
           to the longest, the layer on that batch, results written back per row
The peers use dlo's router and selection rule, so all approaches do the same routing decisions.
"fwd" is a no-grad forward; "fwd+bwd" a forward and the gradients of the input and every weight.
Candidates take turns in each of --repeats rounds after --warmup rounds; figures are medians,
ratios the median of per-round ratios to dense (spread: min-max). "saved MB" is what autograd
keeps for backward (parameters and the input excluded). Before timing, block and mlp are checked
against independent references (per-row loop; masked mlp). Prints tables, writes --out (JSON).
"""

import argparse
import copy
import math
from collections import defaultdict
from dataclasses import dataclass

import common
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import dlo

CAPACITIES = (1.0, 0.75, 0.5, 0.25, 0.125)
APPROACHES = ("dense", "block", "mlp", "packed", "mask", "boolidx")
MODES = ("fwd", "fwd+bwd")
CPU = dict(d=1024, heads=16, kv_heads=4, seq=1024, batch=4, repeats=5, warmup=1)
CUDA = dict(d=4096, heads=32, kv_heads=8, seq=4096, batch=1, repeats=10, warmup=2)
QUICK = dict(d=64, heads=4, kv_heads=2, seq=32, batch=2, repeats=1, warmup=1)


def top_k(logits: torch.Tensor, capacity: float) -> torch.Tensor:
    """dlo's training selection, re-done here: per row the ceil(c*T) best scores, ties to the earlier token."""
    T = logits.shape[1]
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, : min(T, math.ceil(capacity * T))]
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, True)


def gate(logits: torch.Tensor, beta: float) -> torch.Tensor:
    return 1.0 + beta * (torch.sigmoid(logits) - 0.5)


def mask_peer(stock, router, beta, capacity):
    def run(h, pos, pe):
        logits = router(h).squeeze(-1).float()
        g = (gate(logits, beta) * top_k(logits, capacity)).unsqueeze(-1).to(h.dtype)  # 0 for skipped tokens
        return h + g * (stock(h, position_ids=pos, position_embeddings=pe) - h)
    return run


def boolidx_peer(stock, router, beta, capacity):
    def run(h, pos, pe):
        B, T, d = h.shape
        logits = router(h).squeeze(-1).float()
        keep, g = top_k(logits, capacity), gate(logits, beta)
        width = int(keep.sum(1).max().item())  # host sync
        rows = [keep[b].nonzero().squeeze(1) for b in range(B)]  # a host sync per row
        packed = h.new_zeros(B, width, d)
        positions = torch.zeros(B, width, dtype=torch.long, device=h.device)
        for b, r in enumerate(rows):
            packed[b, : len(r)] = h[b, r]
            positions[b, : len(r)] = pos[0, r]
        cos, sin = pe
        # Top-k gives every row the same count, so no row is padded and plain causal attention is right
        # (a threshold router would leave rows short and need a key-padding mask here).
        f = stock(packed, position_ids=positions, position_embeddings=(cos[0][positions], sin[0][positions]))
        out = h.clone()
        for b, r in enumerate(rows):
            out[b, r] = h[b, r] + g[b, r, None].to(h.dtype) * (f[b, : len(r)] - h[b, r])
        return out
    return run


def mlp_reference(stock, router, beta, capacity):
    """mlp routing computed by masking: dense attention, then the MLP update times the 0/1 decision."""
    def run(h, pos, pe):
        a, _ = stock.self_attn(hidden_states=stock.input_layernorm(h), attention_mask=None, position_ids=pos,
                               position_embeddings=pe)
        x = h + a
        logits = router(x).squeeze(-1).float()
        g = (gate(logits, beta) * top_k(logits, capacity)).unsqueeze(-1).to(h.dtype)
        return x + g * stock.mlp(stock.post_attention_layernorm(x))
    return run


def build(args, device, dtype):
    """The stock layer and its block- and mlp-routed twins (same weights), routers random so scores differ."""
    config = LlamaConfig(vocab_size=128, hidden_size=args.d, intermediate_size=args.d_ff, num_hidden_layers=1,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.seq, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    routed = {}
    for granularity in ("block", "mlp"):
        twin = dlo.attach_routers(copy.deepcopy(model), dlo.RoutingConfig(layers="all", granularity=granularity,
                                                                          label="self")).train()
        routed[granularity] = RoutedTwin(dlo.routed_layers(twin)[0], dlo.routing_state(twin))
    torch.nn.init.normal_(routed["block"].layer.router.weight, std=args.d**-0.5)
    routed["mlp"].layer.router.load_state_dict(routed["block"].layer.router.state_dict())
    return model, model.model.layers[0], routed


@dataclass
class RoutedTwin:
    """A routed layer and the RoutingState of its one-layer model, which hands it its training inputs."""

    layer: torch.nn.Module
    state: object

    def at_capacity(self, c: float, x: torch.Tensor):
        """The layer and its RoutingInputs for a training forward of ``x`` at capacity ``c``."""
        with torch.no_grad():
            self.layer.capacity.fill_(c)
        return self.layer, self.state.inputs(True, x.shape[1], None, False, x.device)


def approaches(stock, routed, c, x, pos, pe):
    """{name: (fn(h) -> y, input, parameters)} at capacity c; 'packed' gets its own pre-gathered input."""
    (block, block_inputs), (mlp, mlp_inputs) = routed["block"].at_capacity(c, x), routed["mlp"].at_capacity(c, x)
    router, beta = block.router, block.beta
    with torch.no_grad():
        idx = top_k(router(x).squeeze(-1).float(), c).nonzero()[:, 1].view(x.shape[0], -1)  # (B, k) ascending
    x_packed = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])).contiguous()
    pe_packed = tuple(t[0][idx] for t in pe)
    stock_params = list(stock.parameters())
    peer_params = [*stock_params, *router.parameters()]
    call = lambda layer, inputs=None: lambda h: layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe,
                                                       dlo_routing=inputs)

    def peer(make):
        run = make(stock, router, beta, c)
        return lambda h: run(h, pos, pe)

    return {
        "dense": (call(stock), x, stock_params),
        "block": (call(block, block_inputs), x, list(block.parameters())),
        "mlp": (call(mlp, mlp_inputs), x, list(mlp.parameters())),
        "packed": (lambda h: stock(h, attention_mask=None, position_ids=idx, position_embeddings=pe_packed),
                   x_packed, stock_params),
        "mask": (peer(mask_peer), x, peer_params),
        "boolidx": (peer(boolidx_peer), x, peer_params),
    }


def check(stock, routed, c, x, pos, pe):
    """block == per-row loop (boolidx), mlp == masked reference; returns the largest differences."""
    tol = dict(rtol=1e-4, atol=1e-4) if x.dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    diffs = {}
    with torch.no_grad():
        for name, make in (("block", boolidx_peer), ("mlp", mlp_reference)):
            layer, inputs = routed[name].at_capacity(c, x)
            y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe, dlo_routing=inputs)
            ref = make(stock, layer.router, layer.beta, c)(x, pos, pe)
            torch.testing.assert_close(y, ref, **tol, msg=lambda m, name=name: f"{name} at c={c}: {m}")
            diffs[name] = (y - ref).abs().max().item()
    return diffs


def step(fn, h, params, dy, backward):
    """A closure running fn(h), and when ``backward`` the gradients of h and params (fresh, as after zero_grad)."""
    h = h.detach().requires_grad_(backward)

    def go():
        with torch.set_grad_enabled(backward):
            y = fn(h)
            if backward:
                torch.autograd.grad(y, [h, *params], dy)
    return go


def measure(args, device, stock, routed, x, pos, pe):
    timings, memory, checks = [], [], {}
    for c in args.capacities:
        checks[str(c)] = check(stock, routed, c, x, pos, pe)
        cases = approaches(stock, routed, c, x, pos, pe)
        fns = {}
        for name, (fn, h, params) in cases.items():
            dy = torch.randn_like(fn(h.detach())) if name == "packed" else torch.randn_like(x)
            for mode in MODES:
                fns[name, mode] = step(fn, h, params, dy, mode == "fwd+bwd")
            h_grad = h.detach().requires_grad_()
            saved = common.saved_bytes(lambda fn=fn, h_grad=h_grad: fn(h_grad), exclude=[h_grad, *params])
            memory.append(dict(capacity=c, approach=name, saved_bytes=saved,
                               peak_bytes=common.peak_bytes(fns[name, "fwd+bwd"], device)))
        samples = common.time_interleaved(fns, device, args.repeats, args.warmup)
        for (name, mode), s in samples.items():
            timings.append(dict(capacity=c, approach=name, mode=mode, **common.summarize(s, samples["dense", mode])))
        dense_mem = next(m for m in memory if m["capacity"] == c and m["approach"] == "dense")
        for m in memory[-len(cases):]:
            m["saved_ratio"] = m["saved_bytes"] / dense_mem["saved_bytes"]
        print(f"c={c}: done", flush=True)
    return timings, memory, checks


def category(name: str, shapes) -> str:
    if "scaled_dot_product" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):  # the router's matmuls have a dimension of 1
        return "router matmuls" if any(len(s) == 2 and 1 in s for s in shapes) else "matmuls"
    if name in ("aten::sort", "aten::topk"):
        return "sort"
    if name in ("aten::index_select", "aten::index_copy", "aten::index_copy_", "aten::gather", "aten::scatter_",
                "aten::scatter", "aten::index", "aten::index_put_"):
        return "gather/scatter"
    return "elementwise, copies, rest"


def profile_block(args, stock, routed, x, pos, pe, steps=2):
    """Self CPU time per op category of one fwd+bwd: dense, packed (the limit) and block, per capacity."""
    out = {}
    for c in args.profile:
        cases = approaches(stock, routed, c, x, pos, pe)
        out[str(c)] = {}
        for name in ("dense", "packed", "block"):
            fn, h, params = cases[name]
            go = step(fn, h, params, torch.randn_like(fn(h.detach())), backward=True)
            go()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(steps):
                    go()
            cats = defaultdict(float)
            for e in prof.key_averages(group_by_input_shape=True):
                cats[category(e.key, e.input_shapes)] += e.self_cpu_time_total / 1e3 / steps
            out[str(c)][name] = dict(cats)
    return out


def print_tables(result):
    caps = result["config"]["capacities"]
    cell = {(r["capacity"], r["approach"], r["mode"]): r for r in result["timings"]}
    print(f"{result['environment']['device']} | {result['environment']['dtype']} | backend "
          f"{result['environment']['backend']} | {result['config']}")
    for mode in MODES:
        print(f"\n{mode}: ms of dense; ratio to dense, median (min-max) of {result['config']['repeats']} rounds")
        print(f"{'c':>6} {'dense ms':>9} " + " ".join(f"{a:>17}" for a in APPROACHES[1:]))
        for c in caps:
            print(f"{c:>6} {cell[c, 'dense', mode]['ms']:>9.1f} "
                  + " ".join(f"{common.fmt_ratio(cell[c, a, mode]):>17}" for a in APPROACHES[1:]))
    mem = {(m["capacity"], m["approach"]): m for m in result["memory"]}
    print("\nsaved for backward: MB (ratio to dense)")
    print(f"{'c':>6} " + " ".join(f"{a:>14}" for a in APPROACHES))
    for c in caps:
        print(f"{c:>6} " + " ".join(f"{mem[c, a]['saved_bytes'] / 2**20:>7.1f} ({mem[c, a]['saved_ratio']:.2f})"
                                    for a in APPROACHES))
    for c, per in result.get("profile", {}).items():
        cats = sorted({k for v in per.values() for k in v}, key=lambda k: -per["block"].get(k, 0.0))
        print(f"\nprofile fwd+bwd at c={c}: self CPU ms per category")
        print(f"{'category':<28} " + " ".join(f"{n:>8}" for n in per))
        for k in cats:
            print(f"{k:<28} " + " ".join(f"{v.get(k, 0.0):>8.1f}" for v in per.values()))
        print(f"{'total':<28} " + " ".join(f"{sum(v.values()):>8.1f}" for v in per.values()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(p, cpu=CPU, cuda=CUDA)
    p.add_argument("--capacities", type=float, nargs="+", default=list(CAPACITIES))
    p.add_argument("--profile", type=float, nargs="*", default=[], metavar="C",
                   help="also profile fwd+bwd of dense, packed and block at these capacities (CPU op time)")
    p.add_argument("--out", default="benchmark_layer.json")
    args = p.parse_args(argv)
    device, dtype = common.resolve_sizes(args, cpu=CPU, cuda=CUDA, quick=QUICK)

    model, stock, routed = build(args, device, dtype)
    x = torch.randn(args.batch, args.seq, args.d, device=device, dtype=dtype)
    pos = torch.arange(args.seq, device=device).unsqueeze(0)  # what LlamaModel passes: (1, T) positions,
    pe = model.model.rotary_emb(x, pos)  # their cos/sin, and no mask (sdpa, nothing padded: plain causal)
    timings, memory, checks = measure(args, device, stock, routed, x, pos, pe)
    result = dict(environment=common.environment(device, dtype),
                  config=dict(d=args.d, d_ff=args.d_ff, heads=args.heads, kv_heads=args.kv_heads, seq=args.seq,
                              batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                              capacities=args.capacities),
                  timings=timings, memory=memory, checks_max_abs_diff=checks)
    if args.profile:
        result["profile"] = profile_block(args, stock, routed, x, pos, pe)
    print_tables(result)
    print()
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
