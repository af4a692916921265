"""``dlo report``: evaluate and time a model on data; write report.json, PNG plots and tensorboard scalars."""

from __future__ import annotations

import os

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


def add_parser(subparsers):
    p = subparsers.add_parser("report", help="Efficiency report: realised capacity, FLOPs, wall-clock, loss.",
                              description=__doc__)
    add_model_arguments(p)
    p.add_argument("--data", required=True,
                   help="JSONL with 'messages' (chat), 'prompt'/'completion' or 'text' records.")
    p.add_argument("--output", required=True,
                   help="Directory for report.json, *.png and tb/ (written atomically; must be new or empty).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty output directory (an older report).")
    p.add_argument("--max-samples", type=int, default=None, help="Read at most N records (N >= 1).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="Truncate records to this many tokens (default: min(512, max_position_embeddings)).")
    p.add_argument("--examples", type=int, default=4, help="Sequences shown in the run/skip heatmap (0: none).")
    p.add_argument("--repeats", type=int, default=3, help="Timed repetitions (the median is reported).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed repetitions before timing.")


def run(args):
    from dlo.checkpoints import atomic_output_dir, check_output_dir
    from dlo.evaluation import load_batches, read_eval_records
    from dlo.export import merge_lora
    from dlo.report import build_report, format_summary, write_report

    # Cheap checks first: nothing is loaded for a call that must fail.
    check_minimums(args, max_samples=1, batch_size=1, max_length=1, examples=0, repeats=1, warmup=0)
    check_data_file(args.data)
    output = check_output_dir(args.output, args.force, inputs=[args.data])
    device, dtype = resolve_device(args.device, args.dtype)
    source = find_model(args.model, args.revision, args.gguf_file)
    inputs = [args.data, source.dir, source.base_dir]
    check_output_dir(output, args.force, inputs)
    length = max_length(args.max_length, source)
    read_eval_records(args.data, args.max_samples)
    tokenizer = load_tokenizer(source)
    model = merge_lora(load_model(source, device, dtype)).eval()  # the report describes the deployed model
    batches = load_batches(args.data, tokenizer, args.batch_size, length, args.max_samples)
    report, result = build_report(model, batches, model_path=source.label, data_path=args.data,
                                  batch_size=args.batch_size, max_length=length, num_examples=args.examples,
                                  warmup=args.warmup, repeats=args.repeats)
    with atomic_output_dir(output, args.force, inputs) as tmp:
        plots = write_report(report, result, tmp, tokenizer)
    print(format_summary(report))
    print(f"\nwrote {os.path.join(output, 'report.json')}, {', '.join(plots)} and tb/ in {output}")
