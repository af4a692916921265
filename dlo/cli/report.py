"""``dlo report``: evaluate and time a model on data; write report.json, PNG plots and tensorboard scalars."""

from __future__ import annotations

import os

from dlo.cli.common import add_model_arguments, load_model_and_tokenizer, resolve_device


def add_parser(subparsers):
    p = subparsers.add_parser("report", help="Efficiency report: realised capacity, FLOPs, wall-clock, loss.",
                              description=__doc__)
    add_model_arguments(p)
    p.add_argument("--data", required=True,
                   help="JSONL with 'messages' (chat), 'prompt'/'completion' or 'text' records.")
    p.add_argument("--output", required=True, help="Directory for report.json, *.png and tb/.")
    p.add_argument("--max-samples", type=int, default=None, help="Read at most N records.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="Truncate records to this many tokens (default: min(512, max_position_embeddings)).")
    p.add_argument("--examples", type=int, default=4, help="Sequences shown in the run/skip heatmap.")
    p.add_argument("--repeats", type=int, default=3, help="Timed repetitions (the median is reported).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed repetitions before timing.")


def run(args):
    from dlo.evaluation import load_batches
    from dlo.export import merge_lora
    from dlo.report import build_report, format_summary, write_report

    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"data file {args.data!r} does not exist")
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    device, dtype = resolve_device(args.device, args.dtype)
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    model = merge_lora(model).eval()  # the report describes the model as it would be deployed
    max_length = args.max_length or min(512, getattr(model.config, "max_position_embeddings", 512))
    batches = load_batches(args.data, tokenizer, args.batch_size, max_length, args.max_samples)
    report, result = build_report(model, batches, model_path=args.model, data_path=args.data,
                                  batch_size=args.batch_size, max_length=max_length, num_examples=args.examples,
                                  warmup=args.warmup, repeats=args.repeats)
    plots = write_report(report, result, args.output, tokenizer)
    print(format_summary(report))
    print(f"\nwrote {os.path.join(args.output, 'report.json')}, {', '.join(plots)} and tb/ in {args.output}")
