"""Row kernels and a routed MLP layer, timed against the device's copy bandwidth and the dense layer.

    python benchmarks/kernels.py                         # CUDA, bf16, d=4096, 4096 tokens
    python benchmarks/kernels.py --device cpu --d 256 --tokens 512 --repeats 5   # torch path smoke run

Runs whatever backend dlo.ops picks (Triton on CUDA, torch on CPU; DLO_KERNELS overrides).
Every figure is the median of --repeats timed runs after warm-up; on CUDA the L2 cache is flushed
before each run so bandwidths are DRAM figures. Prints a table and writes --out (JSON).
"""

import argparse
import math
import statistics
import time
from functools import partial

import common
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from dlo import ops

CAPACITIES = (1.0, 0.75, 0.5, 0.25, 0.125)


def make_timer(device: torch.device, repeats: int, warmup: int = 3):
    """Median seconds of fn() over `repeats` runs, warm-up runs excluded."""
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # larger than any L2

        def run_once(fn):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run_once(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    def timed(fn):
        for _ in range(warmup):
            run_once(fn)
        return statistics.median(run_once(fn) for _ in range(repeats))

    return timed


def active_rows(M: int, capacity: float, device) -> torch.Tensor:
    """ceil(c*M) unique rows, ascending (as the routers hand them over), chosen at random."""
    n = math.ceil(capacity * M)
    return torch.sort(torch.randperm(M, device=device)[:n]).values  # (N,)


def bench_ops(x, timed, copy_gbps):
    """Achieved bandwidth of gather/combine (forward and backward) at each capacity."""
    M, d = x.shape
    es, backend = x.element_size(), ops.kernel_backend(x)
    rows = []
    for c in CAPACITIES:
        index = active_rows(M, c, x.device)
        N = index.numel()
        f = torch.randn(N, d, device=x.device, dtype=x.dtype)
        gate = torch.rand(N, device=x.device)
        # Bytes each op must move at least (row data only; the int index/gate vectors are < 1%).
        cases = {
            "gather fwd": (partial(torch.ops.dlo.gather_rows, x, index, backend), 2 * N * d * es),
            "gather bwd": (partial(torch.ops.dlo.gather_rows_backward, f, index, M, backend), (M + N) * d * es),
            "combine fwd": (partial(torch.ops.dlo.scatter_combine, x, f, gate, index, backend), (2 * M + N) * d * es),
            "combine bwd": (partial(torch.ops.dlo.scatter_combine_backward, x, x, f, gate, index, backend),
                            (2 * M + 3 * N) * d * es),
        }
        for name, (fn, nbytes) in cases.items():
            sec = timed(fn)
            gbps = nbytes / sec / 1e9
            rows.append(dict(op=name, capacity=c, active_rows=N, bytes=nbytes, ms=sec * 1e3, gbps=gbps,
                             vs_copy=gbps / copy_gbps))
    return rows


def _layer_step(fn, x, params, dy):
    """One forward of fn(x), and its backward when x requires grad; returned as a closure to time."""
    def go():
        with torch.set_grad_enabled(x.requires_grad):
            y = fn(x)
            if x.requires_grad:
                torch.autograd.grad(y, [x, *params], dy)
    return go


def bench_layer(x, timed, d_ff):
    """MLP half of a stock LlamaDecoderLayer: dense on all rows vs gather -> layer -> combine."""
    M, d = x.shape
    config = LlamaConfig(hidden_size=d, intermediate_size=d_ff, num_attention_heads=max(1, d // 128),
                         num_key_value_heads=max(1, d // 128), num_hidden_layers=1)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device=x.device, dtype=x.dtype)
    params = [*layer.mlp.parameters(), *layer.post_attention_layernorm.parameters()]
    block = lambda h: h + layer.mlp(layer.post_attention_layernorm(h))  # F(h): (rows, d) -> (rows, d)
    dy = torch.randn_like(x)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        step = partial(_layer_step, x=x.detach().requires_grad_(mode == "fwd+bwd"), params=params, dy=dy)
        dense = timed(step(block))
        for c in CAPACITIES:
            index = active_rows(M, c, x.device)
            gate = torch.full((index.numel(),), 1.0, device=x.device)  # the router's cost is not timed
            routed = lambda h, index=index, gate=gate: ops.scatter_combine(
                h, block(ops.gather_rows(h, index)), gate, index)
            sec = timed(step(routed))
            rows.append(dict(mode=mode, capacity=c, dense_ms=dense * 1e3, routed_ms=sec * 1e3,
                             routed_over_dense=sec / dense))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--d", type=int, default=4096, help="hidden size")
    p.add_argument("--d-ff", type=int, default=None, help="MLP width; default Llama's 256-rounded 8d/3")
    p.add_argument("--tokens", type=int, default=4096, help="rows M = batch * sequence length")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="benchmark_kernels.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    d_ff = args.d_ff or 256 * math.ceil(8 * args.d / 3 / 256)
    torch.manual_seed(0)
    timed = make_timer(device, args.repeats)
    x = torch.randn(args.tokens, args.d, device=device, dtype=dtype)  # (M, d)
    copy_out = torch.empty_like(x)
    copy_gbps = 2 * x.numel() * x.element_size() / timed(lambda: copy_out.copy_(x)) / 1e9

    result = dict(device=common.device_name(device), backend=ops.kernel_backend(x),
                  dtype=str(dtype).removeprefix("torch."),
                  d=args.d, d_ff=d_ff, tokens=args.tokens, repeats=args.repeats, torch=torch.__version__,
                  copy_gbps=copy_gbps, ops=bench_ops(x, timed, copy_gbps), layer=bench_layer(x, timed, d_ff))

    print(f"{result['device']} | backend {result['backend']} | {result['dtype']} | d={args.d} d_ff={d_ff} "
          f"tokens={args.tokens} | median of {args.repeats}")
    print(f"copy: {copy_gbps:.1f} GB/s")
    print(f"{'op':<12} {'capacity':>8} {'rows':>7} {'ms':>9} {'GB/s':>8} {'vs copy':>8}")
    for r in result["ops"]:
        print(f"{r['op']:<12} {r['capacity']:>8} {r['active_rows']:>7} {r['ms']:>9.3f} {r['gbps']:>8.1f} "
              f"{r['vs_copy']:>8.2f}")
    print(f"{'layer':<8} {'capacity':>8} {'dense ms':>9} {'routed ms':>10} {'routed/dense':>12}")
    for r in result["layer"]:
        print(f"{r['mode']:<8} {r['capacity']:>8} {r['dense_ms']:>9.3f} {r['routed_ms']:>10.3f} "
              f"{r['routed_over_dense']:>12.2f}")
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
