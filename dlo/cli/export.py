"""``dlo export``: drop rarely-run routed layers and save a plain dense checkpoint (see dlo/export.py)."""

from __future__ import annotations

import datetime

from dlo.cli.common import (
    add_model_arguments,
    check_data_file,
    check_minimums,
    find_model,
    load_model,
    load_tokenizer,
    max_length,
    resolve_device,
)
from dlo.errors import UserError, warn


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
    p.add_argument("--max-samples", type=int, default=None, help="Read at most N records of --data (N >= 1).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="Default: min(512, max_position_embeddings).")
    p.add_argument("--keep-shared", action="store_true",
                   help="Keep shared repetitions shared (a dlo checkpoint: dlo.load_model or trust_remote_code); by "
                        "default they are materialised as plain layers any tool loads.")
    p.add_argument("--force", action="store_true", help="Replace a non-empty output directory.")


def run(args):
    from dlo.checkpoints import check_output_dir
    from dlo.evaluation import evaluate, load_batches, read_eval_records
    from dlo.export import export_static, save_export
    from dlo.model_card import write_model_card

    # Cheap checks first: nothing is loaded for a call that must fail.
    check_minimums(args, num_layers=1, max_samples=1, batch_size=1, max_length=1)
    if args.min_capacity is not None and not 0.0 < args.min_capacity <= 1.0:
        raise UserError(f"--min-capacity={args.min_capacity}: must be in (0, 1]")
    data = [args.data] if args.data is not None else []
    if args.data is not None:
        check_data_file(args.data)
    output = check_output_dir(args.output, args.force, inputs=data)
    device, dtype = resolve_device(args.device, args.dtype)
    source = find_model(args.model, args.revision, args.gguf_file)
    check_output_dir(output, args.force, inputs=[*data, source.dir, source.base_dir])
    depth = source.config.get("num_hidden_layers")
    if args.num_layers is not None and depth is not None and args.num_layers > depth:
        raise UserError(f"--num-layers={args.num_layers}: {args.model} has {depth} layers; valid: 1..{depth}")
    if args.keep_shared and "dlo_repetitions" not in source.config:
        raise UserError(f"--keep-shared: {args.model} has no shared repetitions (config.json has no dlo_repetitions)")
    if args.min_capacity is not None and not source.routed:
        raise UserError(f"{args.model} has no routers, so --min-capacity has nothing to compare with; "
                        "use --num-layers N (with --data to rank the layers)")
    unrouted = depth - len(source.config.get("dlo_routing", {}).get("routed_layers", [])) if depth else 0
    if args.num_layers is not None and args.num_layers < unrouted and args.data is None:
        raise UserError(f"--num-layers={args.num_layers} would drop unrouted layers ({unrouted} of the {depth} "
                        "layers carry no router), which only measured similarity can rank: add --data FILE")
    if args.data is not None:
        length = max_length(args.max_length, source)
        read_eval_records(args.data, args.max_samples)
    tokenizer = load_tokenizer(source, required=args.data is not None)
    model = load_model(source, device, dtype)
    before = capacities = similarity = batches = None
    if args.data is not None:
        batches = load_batches(args.data, tokenizer, args.batch_size, length, args.max_samples)
        before = evaluate(model, batches, desc="evaluating before export")
        capacities, similarity = before.capacity or None, before.similarity
    exported = export_static(model, min_capacity=args.min_capacity, num_layers=args.num_layers,
                             capacities=capacities, similarity=similarity, keep_shared=args.keep_shared)
    after = evaluate(exported, batches, desc="evaluating the export") if batches else None
    info = exported.config.dlo_export
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source.label, "data": args.data, **info,
        "eval": None if before is None else {
            "tokens": before.loss_tokens,
            "before": {"loss": before.loss, "perplexity": before.perplexity},
            "after": {"loss": after.loss, "perplexity": after.perplexity},
        },
    }
    if tokenizer is None:
        warn(f"{args.model} has no tokenizer, so none is copied: the export is saved without one")
    path = save_export(exported, output, tokenizer, record, force=args.force)
    write_model_card(path)
    print(summary(record))
    if (record.get("repetitions") or {}).get("shared"):
        print(f"wrote {path} (shared repetitions: loads with dlo.load_model, or trust_remote_code=True)")
    else:
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
    repetitions = record.get("repetitions")
    if repetitions:
        still = {int(j): k for j, k in repetitions["shared"].items()}
        lines.append(f"  shared repetitions: materialised {repetitions['materialised']}, still shared {still}")
    source, export = record["memory"]["source"], record["memory"]["export"]
    lines.append(f"memory: {source['parameters']:,} parameters ({source['bytes'] / 2**20:.1f} MiB) -> "
                 f"{export['parameters']:,} ({export['bytes'] / 2**20:.1f} MiB), each tensor once")
    if record["eval"]:
        b, a = record["eval"]["before"], record["eval"]["after"]
        lines.append(f"eval on {record['eval']['tokens']} predicted tokens: loss {b['loss']:.4f} -> {a['loss']:.4f}, "
                     f"ppl {b['perplexity']:.2f} -> {a['perplexity']:.2f}")
    else:
        lines.append("eval: no --data given, quality cost not measured")
    return "\n".join(lines)
