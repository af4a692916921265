"""``dlo export``: drop rarely-run routed layers and save a plain dense checkpoint (see dlo/export.py)."""

from __future__ import annotations

import datetime
import os

from dlo.cli.common import add_model_arguments, load_model_and_tokenizer, resolve_device


def add_parser(subparsers):
    p = subparsers.add_parser("export", help="Export a statically pruned dense model.", description=__doc__)
    add_model_arguments(p)
    p.add_argument("--output", required=True, help="Directory of the exported checkpoint (written atomically).")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--min-capacity", type=float, help="Drop routed layers whose capacity is below X, in (0, 1].")
    rule.add_argument("--num-layers", type=int,
                      help="Keep the N most-used layers (unrouted layers count as always used).")
    p.add_argument("--data", default=None,
                   help="JSONL to measure realised capacities (used instead of the targets) and the loss before/after.")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="Default: min(512, max_position_embeddings).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty output directory.")


def run(args):
    from dlo.evaluation import evaluate, load_batches
    from dlo.export import check_output, export_static, save_export
    from dlo.modeling import routed_layers

    # Cheap checks first: nothing is loaded for a call that must fail.
    if args.data is not None and not os.path.isfile(args.data):
        raise FileNotFoundError(f"data file {args.data!r} does not exist")
    check_output(os.path.abspath(args.output), args.force)
    device, dtype = resolve_device(args.device, args.dtype)
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype, need_tokenizer=args.data is not None)
    if not routed_layers(model) and args.min_capacity is not None:
        raise ValueError(f"{args.model} has no routers, so --min-capacity has nothing to compare with; "
                         "use --num-layers N (with --data to rank the layers)")
    before = capacities = similarity = batches = None
    if args.data is not None:
        max_length = args.max_length or min(512, getattr(model.config, "max_position_embeddings", 512))
        batches = load_batches(args.data, tokenizer, args.batch_size, max_length, args.max_samples)
        before = evaluate(model, batches, desc="evaluating before export")
        capacities, similarity = before.capacity or None, before.similarity
    exported = export_static(model, min_capacity=args.min_capacity, num_layers=args.num_layers,
                             capacities=capacities, similarity=similarity)
    after = evaluate(exported, batches, desc="evaluating the export") if batches else None
    info = exported.config.dlo_export
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": os.path.abspath(args.model), "data": args.data, **info,
        "eval": None if before is None else {
            "tokens": before.loss_tokens,
            "before": {"loss": before.loss, "perplexity": before.perplexity},
            "after": {"loss": after.loss, "perplexity": after.perplexity},
        },
    }
    if tokenizer is None:
        print(f"note: {args.model} has no tokenizer; the export is saved without one")
    path = save_export(exported, args.output, tokenizer, record, force=args.force)
    print(summary(record))
    print(f"wrote {path} (loads with AutoModelForCausalLM.from_pretrained, no custom code)")


def summary(record: dict) -> str:
    usage = record["usage"]
    lines = [f"layers: {record['source_num_layers']} -> {len(record['kept'])} "
             f"(usage from {record['usage_source']} capacities)",
             f"  kept    {record['kept']}",
             f"  dropped {record['dropped']}"]
    for i in record["dropped"]:
        if str(i) in usage:
            lines.append(f"    layer {i}: routed, capacity {usage[str(i)]:.3f}")
        else:
            lines.append(f"    layer {i}: unrouted (ranked by measured similarity)")
    if usage and all(str(i) not in usage for i in record["kept"]):
        lines.append("  every routed layer dropped: the export holds the unrouted layers only")
    elif record["kept_routed_layers_run_ungated"]:
        lines.append("  kept routed layers now run every token, ungated")
    if not record["dropped"]:
        lines.append("  nothing dropped: the export only removes the routers")
    if record["eval"]:
        b, a = record["eval"]["before"], record["eval"]["after"]
        lines.append(f"eval on {record['eval']['tokens']} predicted tokens: loss {b['loss']:.4f} -> {a['loss']:.4f}, "
                     f"ppl {b['perplexity']:.2f} -> {a['perplexity']:.2f}")
    else:
        lines.append("eval: no --data given, quality cost not measured")
    return "\n".join(lines)
