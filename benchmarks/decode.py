"""Decode throughput of a routed model against the same model run dense and its unrouted base.

    python benchmarks/decode.py                               # random tiny Llama, every layer routed at c=0.5
    python benchmarks/decode.py --hidden 1024 --layers 8      # bigger random model (weights dominate)
    python benchmarks/decode.py --model runs/tiny-sft/final   # a saved routed model (dlo.load_model)

Three variants with the same weights, greedy generate() with the KV cache:
  routed  calibrated causal thresholds, dlo's RoutedCache (skipped tokens store no K/V)
  dense   the same model under dlo.forced_routing(model, "run"): every token runs every layer
  base    the stock model without routers (stock DynamicCache)
Decode tokens/s = batch * N / (t(generate N+1 tokens) - t(generate 1 token)): prefill excluded.
The variants take turns for --repeats rounds after a warm-up (so load drifts hit all alike); each
figure is the median. An untimed run per batch size counts the share of decode tokens that ran
the routed layers and the share of (layer, step) pairs in which no row ran, i.e. in which the
layer's weights were not read at all. Prints a table and writes --out (JSON).
"""

import argparse
import copy
import os
import statistics
import time

import common
import torch
import transformers

import dlo


def random_models(args, dtype):
    """A random Llama and its routed twin: random routers, thresholds calibrated to --capacity."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.new_tokens + 8, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    base = transformers.LlamaForCausalLM(config).to(dtype).eval()
    layers = "all" if args.routed == "all" else [int(i) for i in args.routed.split(",")]
    routed = dlo.attach_routers(copy.deepcopy(base), dlo.RoutingConfig(layers=layers, capacity=args.capacity))
    for layer in dlo.routed_layers(routed):
        torch.nn.init.normal_(layer.router.weight, std=1.0)  # an untrained router: its thresholds set the capacity
    calibration = torch.randint(3, args.vocab, (8, args.prompt + args.new_tokens))
    dlo.calibrate(routed, [{"input_ids": calibration}], progress=False)
    return routed.eval(), base


def saved_models(path, dtype):
    routed = dlo.load_model(path, dtype=dtype).eval()
    stock = getattr(transformers, routed.config.dlo_routing["base_architecture"])
    base = stock.from_pretrained(path, dtype=dtype).eval()  # the router tensors are left unused
    return routed, base


def generate_seconds(model, ids, new_tokens, **kwargs):
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, use_cache=True, pad_token_id=0, **kwargs)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def dense_seconds(model, ids, new_tokens):
    with dlo.forced_routing(model, "run"):
        return generate_seconds(model, ids, new_tokens)


def decode_tokens_per_second(variants, ids, new_tokens, repeats):
    """{name: tokens/s} for {name: (timer, model)}; the variants take turns so load drifts hit all alike."""
    for timer, model in variants.values():
        timer(model, ids, 2)  # warm-up
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (timer, model) in variants.items():
            samples[name].append(timer(model, ids, new_tokens + 1) - timer(model, ids, 1))
    return {name: ids.shape[0] * new_tokens / statistics.median(times) for name, times in samples.items()}


def decode_routing_shares(model, ids, new_tokens):
    """(share of decode tokens that ran a routed layer, share of layer-steps where no row ran)."""
    ran = steps = idle = 0

    def count(layer, args, kwargs, output):
        nonlocal ran, steps, idle
        selected = kwargs["dlo_routing"].records[layer.layer_index].selected  # (B, T)
        if selected.shape[1] == 1:  # a decode step
            ran += int(selected.sum())
            steps += 1
            idle += int(not selected.any())

    hooks = [layer.register_forward_hook(count, with_kwargs=True) for layer in dlo.routed_layers(model)]
    try:
        generate_seconds(model, ids, new_tokens + 1, output_router_logits=True)  # layers report their decisions
    finally:
        for hook in hooks:
            hook.remove()
    return ran / (steps * ids.shape[0]), idle / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="saved routed model directory; default: a random tiny Llama")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64, help="timed decode steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--routed", default="all", help="random model: 'all' or comma-separated layer indices")
    p.add_argument("--capacity", type=float, default=0.5, help="random model: target share of tokens that run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmark_decode.json")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    routed, base = saved_models(args.model, dtype) if args.model else random_models(args, dtype)
    routed.to(device)
    base.to(device)
    vocab = routed.config.vocab_size
    layers = dlo.routed_layers(routed)
    result = {
        "device": common.device_name(device), "dtype": args.dtype, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": args.model or "random",
        "num_layers": routed.config.num_hidden_layers, "hidden_size": routed.config.hidden_size,
        "routed_layers": [layer.layer_index for layer in layers],
        "granularity": routed.dlo_routing_config.granularity,
        "target_capacity": [layer.target_capacity for layer in layers],
        "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": [],
        "load_average_before": os.getloadavg()[0],  # other processes on the machine skew CPU timings
    }
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ids = torch.randint(3, vocab, (batch, args.prompt), device=device)
        with torch.no_grad():
            ran, idle = decode_routing_shares(routed, ids, args.new_tokens)
            row = {"batch": batch, "decode_run_share": ran, "idle_layer_steps": idle}
            variants = {"routed": (generate_seconds, routed), "dense": (dense_seconds, routed),
                        "base": (generate_seconds, base)}
            row.update(decode_tokens_per_second(variants, ids, args.new_tokens, args.repeats))
        result["rows"].append(row)
    result["load_average_after"] = os.getloadavg()[0]

    print(f"{result['device']} | {args.dtype} | torch {result['torch']} | transformers {result['transformers']} | "
          f"load average {result['load_average_before']:.2f} -> {result['load_average_after']:.2f}")
    print(f"model {result['model']}: {result['num_layers']} layers, d={result['hidden_size']}, routed "
          f"{result['routed_layers']} ({result['granularity']}), prompt {args.prompt}, {args.new_tokens} new tokens")
    print(f"{'batch':>5} {'run share':>9} {'idle steps':>10} {'routed tok/s':>12} {'dense tok/s':>11} "
          f"{'base tok/s':>10} {'routed/dense':>12} {'routed/base':>11}")
    for r in result["rows"]:
        print(f"{r['batch']:>5} {r['decode_run_share']:>9.2f} {r['idle_layer_steps']:>10.2f} {r['routed']:>12.1f} "
              f"{r['dense']:>11.1f} {r['base']:>10.1f} {r['routed'] / r['dense']:>12.2f} "
              f"{r['routed'] / r['base']:>11.2f}")
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
