"""Decode throughput of a routed model against the same model forced to run every token and the plain model.

    python benchmarks/decode.py --threads 1                   # d=256 and d=1024, batches 1, 8, 32, one run
    python benchmarks/decode.py --sizes 1024 --batch-sizes 8  # one model size, one batch
    python benchmarks/decode.py --model runs/tiny-sft/final   # a saved routed model (dlo.load_model)
    python benchmarks/decode.py --cache static --compile      # GPU: static caches, decode steps compiled

Three variants with the same weights, greedy generate() with the KV cache:
  routed   random routers, thresholds calibrated to --capacity (c = 0.5), every layer routed, dlo's routed cache
           (whole-batch skips read on the host where that is no sync: CPU)
  masked   the same, but no layer is ever skipped whole (skip_idle_layers=False, what accelerators do by default):
           rows that skip run masked; the gap to routed is what whole-batch skips save
  forced   the same model under dlo.forced_routing(model, "run"): every token runs every layer, so what it costs
           beyond plain is the routing machinery alone
  plain    the stock model without routers (stock cache)
Decode tokens/s = batch * N / (t(generate N+1 tokens) - t(generate 1 token)): prefill excluded (t(1 token) the
best of three runs). In every round each variant of a (size, batch) cell runs once, in turn (so load drifts
hit all alike); figures are medians over --repeats rounds, the ratios medians of the per-round ratios. An
untimed run per cell counts the share of decode tokens that ran the routed layers and the share of (layer,
step) pairs in which no row ran, i.e. in which the layer's weights were not read at all, and another the aten
ops each variant dispatches per decode step (what a decode step costs beyond the weights, whatever the load).
--compile hands generate() a CompileConfig(mode="reduce-overhead") (CUDA graphs) for every variant whose cache
is static. Prints a table with the hardware and the load average, and writes --out (JSON).
"""

import argparse
import contextlib
import copy
import math
import os
import statistics
import time

import common
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import dlo
from dlo.static_cache import route_static_cache

# Hidden size -> (MLP width, attention heads, key/value heads, vocabulary): the sizes docs/GENERATION.md reports.
SHAPES = {256: (688, 8, 4, 2048), 1024: (2816, 16, 4, 8192), 4096: (11008, 32, 8, 32000)}
VARIANTS = ("routed", "masked", "forced", "plain")


def shape(hidden: int) -> tuple[int, int, int, int]:
    """SHAPES, or a Llama-like shape for another width (64-wide heads, 4 query heads per key/value head)."""
    if hidden in SHAPES:
        return SHAPES[hidden]
    heads = max(1, hidden // 64)
    return 16 * math.ceil(8 * hidden / 3 / 16), heads, max(1, heads // 4), 2048


def random_models(args, hidden, dtype):
    """A random Llama and its routed twin: random routers, thresholds calibrated to --capacity."""
    intermediate, heads, kv_heads, vocab = shape(hidden)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab or vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=args.prompt + args.new_tokens + 8, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    plain = transformers.LlamaForCausalLM(config).to(dtype).eval()
    routed = dlo.attach_routers(copy.deepcopy(plain), dlo.RoutingConfig(layers="all", capacity=args.capacity))
    for layer in dlo.routed_layers(routed):
        torch.nn.init.normal_(layer.router.weight, std=1.0)  # an untrained router: its thresholds set the capacity
    calibration = torch.randint(3, config.vocab_size, (8, args.prompt + args.new_tokens))
    dlo.calibrate(routed, [{"input_ids": calibration}], progress=False)
    return routed.eval(), plain


def saved_models(path, dtype):
    routed = dlo.load_model(path, dtype=dtype).eval()
    stock = getattr(transformers, routed.config.dlo_routing["base_architecture"])
    plain = stock.from_pretrained(path, dtype=dtype).eval()  # the router tensors are left unused
    return routed, plain


def generation_kwargs(args) -> dict:
    kwargs = {}
    if args.cache == "static":
        kwargs["cache_implementation"] = "static"
        if args.compile:
            kwargs["compile_config"] = transformers.CompileConfig(mode="reduce-overhead")
    return kwargs


def generate_seconds(model, ids, new_tokens, **kwargs):
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, use_cache=True, pad_token_id=0, **kwargs)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def variant_timer(name, model, kwargs, max_cache_len):
    """seconds(ids, new_tokens) of one variant's generate()."""
    def seconds(ids, new_tokens):
        extra = {}
        if name == "masked":  # a fresh cache per call, as generate() would make, with idle checks off
            block = [layer.layer_index for layer in dlo.routed_layers(model) if layer.granularity == "block"]
            if kwargs.get("cache_implementation") == "static":
                stock = transformers.StaticCache(model.config, max_cache_len=max_cache_len)
                extra["cache"] = route_static_cache(stock, block, skip_idle_layers=False)
            else:
                extra["cache"] = dlo.RoutedCache(model.config, block, skip_idle_layers=False)
        given = {k: v for k, v in kwargs.items() if not (extra and k == "cache_implementation")}
        with dlo.forced_routing(model, "run") if name == "forced" else contextlib.nullcontext():
            return generate_seconds(model, ids, new_tokens, **given, **extra)
    return seconds


def decode_seconds(timers, ids, new_tokens, repeats):
    """{name: [seconds per decode step, one per round]}; the variants take turns in every round."""
    for timer in timers.values():
        timer(ids, 2)  # warm-up (compiles, where compiling)
    # The prefill-and-first-token time, the best of three: subtracting one noisy sample of it from one noisy
    # N+1-token run could leave a round with a negative step time on a loaded machine.
    first = {name: min(timer(ids, 1) for _ in range(3)) for name, timer in timers.items()}
    samples = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name].append((timer(ids, new_tokens + 1) - first[name]) / new_tokens)
    return samples


def decode_routing_shares(model, ids, new_tokens, kwargs):
    """(share of decode tokens that ran a routed layer, share of layer-steps where no row ran)."""
    ran = steps = idle = 0

    def count(layer, args, layer_kwargs, output):
        nonlocal ran, steps, idle
        selected = layer_kwargs["dlo_routing"].records[layer.layer_index].selected  # (B, T)
        if selected.shape[1] == 1:  # a decode step
            ran += int(selected.sum())
            steps += 1
            idle += int(not selected.any())

    hooks = [layer.register_forward_hook(count, with_kwargs=True) for layer in dlo.routed_layers(model)]
    try:  # eager: records are read on the host
        uncompiled = {k: v for k, v in kwargs.items() if k != "compile_config"}
        generate_seconds(model, ids, new_tokens + 1, output_router_logits=True, **uncompiled)
    finally:
        for hook in hooks:
            hook.remove()
    return ran / (steps * ids.shape[0]), idle / steps


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active: each costs a launch on a GPU and a dispatch on a CPU."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def decode_ops(timer, ids, new_tokens):
    """Aten ops per decode step of one variant (untimed, load-independent): ops(N+1 tokens) - ops(1 token), / N."""
    counts = []
    for tokens in (1, new_tokens + 1):
        with OpCounter() as counter:
            timer(ids, tokens)
        counts.append(counter.ops)
    return (counts[1] - counts[0]) / new_tokens


def measure_cell(routed, plain, batch, args, device):
    """One (model, batch) row: routing shares, tokens/s per variant, and per-round step-time ratios to plain."""
    vocab = routed.config.vocab_size
    ids = torch.randint(3, vocab, (batch, args.prompt), device=device)
    kwargs = generation_kwargs(args)
    with torch.no_grad():
        ran, idle = decode_routing_shares(routed, ids, args.new_tokens, kwargs)
        room = args.prompt + args.new_tokens + 1
        timers = {name: variant_timer(name, plain if name == "plain" else routed, kwargs, room) for name in VARIANTS}
        samples = decode_seconds(timers, ids, args.new_tokens, args.repeats)
        # Compiled steps run as graphs, whose ops a dispatch mode does not see one by one: counted eager only.
        ops = {name: None if args.compile else decode_ops(timer, ids, min(args.new_tokens, 8))
               for name, timer in timers.items()}
    row = {"batch": batch, "decode_run_share": ran, "idle_layer_steps": idle}
    for name, seconds in samples.items():
        row[f"{name}_tokens_per_s"] = batch / statistics.median(seconds)
        row[f"{name}_step_ms"] = [1e3 * s for s in seconds]
        row[f"{name}_ops_per_step"] = ops[name]
    for name in ("routed", "masked", "forced"):  # > 1: faster than plain
        row[f"{name}_speed_vs_plain"] = statistics.median(p / s for p, s in zip(samples["plain"], samples[name]))
    return row


def describe(model) -> dict:
    layers = dlo.routed_layers(model)
    return {"num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "intermediate_size": model.config.intermediate_size, "heads": model.config.num_attention_heads,
            "kv_heads": model.config.num_key_value_heads, "vocab": model.config.vocab_size,
            "routed_layers": [layer.layer_index for layer in layers],
            "granularity": model.dlo_routing_config.granularity,
            "target_capacity": [layer.target_capacity for layer in layers]}


def print_table(result):
    print(f"{result['device']} | {result['dtype']} | torch {result['torch']} | transformers {result['transformers']} | "
          f"cache {result['cache']}{' compiled' if result['compile'] else ''} | load average "
          f"{result['load_average_before']:.2f} -> {result['load_average_after']:.2f}")
    print(f"prompt {result['prompt_tokens']}, {result['new_tokens']} new tokens, median of {result['repeats']} rounds")
    print(f"{'d':>5} {'batch':>5} {'run share':>9} {'idle steps':>10} {'routed tok/s':>12} {'masked tok/s':>12} "
          f"{'forced tok/s':>12} {'plain tok/s':>11} {'routed/plain':>12} {'masked/plain':>12} {'forced/plain':>12}")
    rows = [(m, r) for m in result["models"] for r in m["rows"]]
    for m, r in rows:
        print(f"{m['hidden_size']:>5} {r['batch']:>5} {r['decode_run_share']:>9.2f} {r['idle_layer_steps']:>10.2f} "
              f"{r['routed_tokens_per_s']:>12.1f} {r['masked_tokens_per_s']:>12.1f} "
              f"{r['forced_tokens_per_s']:>12.1f} {r['plain_tokens_per_s']:>11.1f} "
              f"{r['routed_speed_vs_plain']:>12.3f} {r['masked_speed_vs_plain']:>12.3f} "
              f"{r['forced_speed_vs_plain']:>12.3f}")
    print("aten ops per decode step (load-independent):")
    for m, r in rows if not result["compile"] else ():
        print(f"{m['hidden_size']:>5} {r['batch']:>5}  " + "  ".join(f"{name} {r[name + '_ops_per_step']:.0f}"
                                                         for name in VARIANTS))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="saved routed model directory; default: random Llamas of --sizes")
    p.add_argument("--sizes", default="256,1024", help="random models: comma-separated hidden sizes")
    p.add_argument("--layers", type=int, default=8, help="random models: decoder layers")
    p.add_argument("--vocab", type=int, default=None, help="random models: vocabulary (default: per size)")
    p.add_argument("--capacity", type=float, default=0.5, help="random models: target share of tokens that run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=32, help="timed decode steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"],
                   help="generate()'s cache: dynamic (routed models: dlo.RoutedCache) or static")
    p.add_argument("--compile", action="store_true",
                   help="with --cache static: compile decode steps, mode='reduce-overhead' (CUDA graphs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmark_decode.json")
    args = p.parse_args(argv)
    if args.compile and args.cache != "static":
        p.error("--compile needs --cache static (generate() compiles decode steps over a static cache only)")

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {
        "device": common.device_name(device), "dtype": args.dtype, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": args.model or "random", "cache": args.cache,
        "compile": args.compile, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "models": [],
        "load_average_before": os.getloadavg()[0],  # other processes on the machine skew CPU timings
    }
    if args.model:
        pairs = [saved_models(args.model, dtype)]
    else:
        pairs = [random_models(args, int(d), dtype) for d in args.sizes.split(",")]
    for routed, plain in pairs:
        routed.to(device)
        plain.to(device)
        rows = [measure_cell(routed, plain, int(b), args, device) for b in args.batch_sizes.split(",")]
        result["models"].append({**describe(routed), "rows": rows})
    result["load_average_after"] = os.getloadavg()[0]
    print_table(result)
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
