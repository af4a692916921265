"""What similarity labels cost in training, and how close the packed source's labels come to the dense pass's.

    python benchmarks/similarity.py                  # CPU: both settings below, then the label quality
    python benchmarks/similarity.py --quick          # smoke run at tiny sizes
    python benchmarks/similarity.py --settings 512:512:4 --capacities 0.5

Cost (per --settings entry d:T:batch): a random Llama of --layers layers, every layer block-routed, fp32. Each
candidate trains one step per round (forward, task loss + 0.1 x router loss, backward, SGD step; the routing
state's commit is left out, so every round routes at the capacities set), in turns, for
--repeats rounds after --warmup; figures are medians of per-round ratios to the unrouted model (spread min-max).
  dense            the unrouted model
  limit            the packed limit: each layer's stock forward on the first K = ceil(c T) tokens of every row
                   (plain causal attention, no router, no gather or combine), the rest passed through
  self             routed, labels 'self' (no similarity measured)
  cos, cos-global  routed, similarity labels from the packed source (the default, docs/DESIGN.md §2.4)
  cos-global/dense the reference: a no-grad dense pass of every routed layer
"saved MB" is what autograd keeps for backward (parameters excluded), and its ratio to self's.

Label quality: the trained tiny Llama of assets/tiny (every layer routed) on fixed batches of its evaluation
text, random routers, each capacity: per layer, the agreement of the packed source's run/skip decisions with
the dense pass's, both sources' cos-global run shares (what re-allocates capacity) and cut; then --train-steps
of cos-global training from one initialisation on the same batches with each source: per layer, the target
capacities and the inference thresholds reached.
"""

import argparse
import copy
import json
import math

import common
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import dlo
from dlo.losses import global_similarity_cut, label_run_counts, router_labels

CPU = dict(heads=8, kv_heads=4, layers=4, vocab=8192, repeats=3, warmup=1)
CUDA = dict(heads=16, kv_heads=8, layers=8, vocab=32000, repeats=5, warmup=2)
QUICK = dict(heads=4, kv_heads=2, layers=4, vocab=128, repeats=1, warmup=1)
SETTINGS = {"cpu": ["512:512:4", "1024:1024:2"], "cuda": ["2048:2048:4", "4096:4096:1"], "quick": ["64:32:2"]}
ROUTED = (("self", "packed"), ("cos", "packed"), ("cos-global", "packed"), ("cos-global", "dense"))
TINY = "assets/tiny"


class PrefixLayer(torch.nn.Module):
    """The packed limit of one layer: its stock forward on the first ``width`` tokens, the rest passed through."""

    def __init__(self, layer, width: int):
        super().__init__()
        self.layer, self.width = layer, width

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        K = self.width
        cos, sin = position_embeddings
        f = self.layer(hidden_states[:, :K], attention_mask=None, position_ids=position_ids[:, :K],
                       position_embeddings=(cos[:, :K], sin[:, :K]), **kwargs)
        f = f[0] if isinstance(f, tuple) else f
        return torch.cat([f, hidden_states[:, K:]], 1)  # (B, T, d)


def cost_models(args, d: int, seq: int, device, dtype) -> dict:
    d_ff = args.d_ff or 256 * math.ceil(8 * d / 3 / 256)  # Llama's rounding
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=d, intermediate_size=d_ff,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=seq,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    dense = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    models = {"dense": dense, "limit": copy.deepcopy(dense)}
    for label, source in ROUTED:
        routed = dlo.attach_routers(copy.deepcopy(dense), dlo.RoutingConfig(
            layers="all", label=label, similarity_source=source, router_loss_weight=0.1))
        name = label if source == "packed" else f"{label}/{source}"
        if name != "self":  # every candidate routes alike: the routers of the first
            for layer, first in zip(dlo.routed_layers(routed), dlo.routed_layers(models["self"])):
                layer.router.load_state_dict(first.router.state_dict())
        else:
            for layer in dlo.routed_layers(routed):
                torch.nn.init.normal_(layer.router.weight, std=d**-0.5)
        models[name] = routed.train()
    return models


def set_limit_width(model, width: int):
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = PrefixLayer(layer.layer if isinstance(layer, PrefixLayer) else layer, width)


def measure_cost(args, setting: str, device, dtype) -> dict:
    d, seq, batch = (int(v) for v in setting.split(":"))
    models = cost_models(args, d, seq, device, dtype)
    ids = torch.randint(0, args.vocab, (batch, seq), device=device)
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.0) for name, m in models.items()}

    states = {name: dlo.routing_state(m) for name, m in models.items() if name not in ("dense", "limit")}

    def step(name):
        def go():
            models[name](input_ids=ids, labels=ids, use_cache=False).loss.backward()
            if name in states:  # no commit: every round routes at the capacities set (cos-global would move them)
                states[name].discard_observations()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return go

    def loss(name):
        return lambda: models[name](input_ids=ids, labels=ids, use_cache=False).loss

    rows = []
    for c in args.capacities:
        set_limit_width(models["limit"], dlo.routing.packed_width(c, seq))
        for name, model in models.items():
            if name not in ("dense", "limit"):
                dlo.set_capacity(model, c)
        samples = common.time_interleaved({name: step(name) for name in models}, device, args.repeats, args.warmup)
        saved = {name: common.saved_bytes(loss(name), exclude=list(m.parameters())) for name, m in models.items()}
        for state in states.values():
            state.discard_observations()
        for name in models:
            rows.append(dict(setting=setting, capacity=c, approach=name, saved_bytes=saved[name],
                             saved_ratio_to_self=saved[name] / saved["self"],
                             **common.summarize(samples[name], samples["dense"])))
        for r in rows[-len(models):]:  # as soon as measured: the label-quality part takes a while more
            print(f"{setting} c={c} {r['approach']:>17}: {common.fmt_ratio(r)} of dense, activation memory "
                  f"{r['saved_ratio_to_self']:.2f} x self's", flush=True)
    return rows


def tiny_batches(count: int, batch: int, seq: int) -> list[torch.Tensor]:
    """Fixed (batch, seq) token batches of the tiny model's evaluation text (user turns, concatenated)."""
    tokenizer = AutoTokenizer.from_pretrained(f"{TINY}/base")
    with open(f"{TINY}/sft/eval.jsonl") as f:
        text = "\n".join(m["content"] for line in f for m in json.loads(line)["messages"] if m["role"] == "user")
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : count * batch * seq]
    return list(ids.view(count, batch, seq))


def tiny_routed(source: str, capacity: float, label: str = "cos-global", **routing):
    torch.manual_seed(0)
    model = dlo.attach_routers(LlamaForCausalLM.from_pretrained(f"{TINY}/base", attn_implementation="sdpa"),
                               dlo.RoutingConfig(layers="all", capacity=capacity, label=label,
                                                 similarity_source=source, **routing))
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=model.config.hidden_size**-0.5)
    return model.train()


def label_agreement(models: dict, ids: torch.Tensor, label: str) -> dict:
    """Packed vs dense decisions and cos-global run shares on one batch (both models route alike)."""
    with torch.no_grad():
        records = {source: m(input_ids=ids, labels=ids).routing for source, m in models.items()}
    for m in models.values():
        dlo.routing_state(m).discard_observations()
    decisions = {source: router_labels(r, label) for source, r in records.items()}
    dense = records["dense"]
    agree = [float(((a == b) & r.valid).sum() / r.valid.sum())
             for a, b, r in zip(decisions["packed"], decisions["dense"], dense)]
    tokens = float(dense[0].valid.sum())
    out = dict(agreement=agree, agreement_mean=sum(agree) / len(agree))
    if label == "cos-global":
        for source, r in records.items():
            out[f"run_share_{source}"] = (label_run_counts(r, decisions[source]) / tokens).tolist()
            out[f"cut_{source}"] = float(global_similarity_cut(r))
    return out


def measure_quality(args) -> dict:
    batches = tiny_batches(args.quality_batches, 4, args.quality_seq)
    result = {"agreement": [], "training": []}
    for c in args.capacities:
        for label in ("cos", "cos-global"):
            models = {source: tiny_routed(source, c, label) for source in ("packed", "dense")}
            for i, ids in enumerate(batches):
                result["agreement"].append(dict(capacity=c, label=label, batch=i,
                                                **label_agreement(models, ids, label)))
        trained = {}
        for source in ("packed", "dense"):
            model = tiny_routed(source, c, anneal_steps=args.train_steps // 2, router_loss_weight=1.0)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for s in range(args.train_steps):
                ids = batches[s % len(batches)]
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            trained[source] = model
            result["training"].append(dict(capacity=c, source=source, steps=args.train_steps,
                                           target_capacity=[layer.target_capacity for layer in
                                                            dlo.routed_layers(model)],
                                           threshold=[float(layer.threshold()) for layer in
                                                      dlo.routed_layers(model)]))
        result["agreement"].append(dict(capacity=c, label="cos-global", batch="after training (packed weights)",
                                        **label_agreement({"packed": trained["packed"],
                                                           "dense": _same_weights(trained["packed"])},
                                                          batches[0], "cos-global")))
        print(f"quality c={c}: done", flush=True)
    return result


def _same_weights(model):
    """A copy of ``model`` whose labels come from the dense pass."""
    twin = copy.deepcopy(model)
    dlo.routing_state(twin).config.similarity_source = "dense"
    return twin


def print_report(result: dict, args):
    env = result["environment"]
    print(f"{env['device']} | {env['dtype']} | {result['config']}")
    print(f"training step, ratio to dense, median (min-max) of {args.repeats} rounds; saved MB (ratio to self)")
    for r in result["cost"]:
        print(f"{r['setting']:>12} c={r['capacity']:<5} {r['approach']:>17} {r['ms']:>9.0f} ms "
              f"{common.fmt_ratio(r):>17} {r['saved_bytes'] / 2**20:>9.1f} MB ({r['saved_ratio_to_self']:.2f})")
    for q in result["quality"]["agreement"]:
        line = f"c={q['capacity']} {q['label']:>10} batch {q['batch']}: agreement {q['agreement_mean']:.3f} " \
               f"per layer {[round(a, 3) for a in q['agreement']]}"
        if q["label"] == "cos-global":
            line += (f"; run share packed {[round(a, 3) for a in q['run_share_packed']]} dense "
                     f"{[round(a, 3) for a in q['run_share_dense']]}; cut {q['cut_packed']:.4f} vs "
                     f"{q['cut_dense']:.4f}")
        print(line)
    for t in result["quality"]["training"]:
        print(f"c={t['capacity']} {t['source']:>6} after {t['steps']} steps: target capacity "
              f"{[round(v, 3) for v in t['target_capacity']]} threshold {[round(v, 3) for v in t['threshold']]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(p, cpu=CPU, cuda=CUDA)
    p.add_argument("--settings", nargs="+", help="d:T:batch per cost setting (default: two per device)")
    p.add_argument("--capacities", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--quality-seq", type=int, default=256, help="tokens per row of the label-quality batches")
    p.add_argument("--quality-batches", type=int, default=2, help="fixed label-quality batches of 4 rows")
    p.add_argument("--train-steps", type=int, default=40, help="cos-global training steps per source")
    p.add_argument("--out", default="benchmark_similarity.json")
    args = p.parse_args(argv)
    d_ff, args.d = args.d_ff, 0  # widths come per setting: --d-ff, when given, fixes the MLP width of all
    device, dtype = common.resolve_sizes(args, cpu=CPU, cuda=CUDA, quick=QUICK)
    args.d_ff = d_ff
    if args.quick:
        args.quality_seq, args.quality_batches, args.train_steps = 32, 1, 4
    settings = args.settings or SETTINGS["quick" if args.quick else device.type]
    cost = [row for setting in settings for row in measure_cost(args, setting, device, dtype)]
    result = dict(environment=common.environment(device, dtype),
                  config=dict(settings=settings, heads=args.heads, kv_heads=args.kv_heads, layers=args.layers,
                              vocab=args.vocab, repeats=args.repeats, warmup=args.warmup, capacities=args.capacities,
                              quality_seq=args.quality_seq, quality_batches=args.quality_batches,
                              train_steps=args.train_steps),
                  cost=cost, quality=measure_quality(args))
    print_report(result, args)
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
