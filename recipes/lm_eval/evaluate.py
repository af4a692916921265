"""lm-eval on a dlo checkpoint with the routed layers' capacity set first, which lm-eval's own CLI cannot do.

    python recipes/lm_eval/evaluate.py --model runs/demo/sft/final --capacity 0.25 [--tasks dlo_tiny]

Run it from the repository root (the task files name their data relative to it). A routed checkpoint
loads with ``dlo.load_model(capacity=...)``: one capacity for every routed layer, or one per routed layer
(``0.3,0.6``); any other checkpoint with ``AutoModelForCausalLM``. The model then goes to lm-eval's
``HFLM`` as an object, and the task definitions next to this script (``tiny/``) are available by name.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

TASKS = Path(__file__).resolve().parent / "tiny"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (routed, expanded, exported or plain)")
    parser.add_argument("--capacity", help="target capacity of the routed layers: one value, or one per routed layer")
    parser.add_argument("--tasks", default="dlo_tiny", help="comma-separated lm-eval task or tag names")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--output", default=None, help="write lm-eval's results as JSON here")
    return parser.parse_args(argv)


def load(path: str, capacity: str | None, device: str | None):
    from transformers import AutoModelForCausalLM

    import dlo
    from dlo.cli.common import resolve_device

    dev, dtype = resolve_device(device, None)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    routed = "dlo_routing" in config
    if capacity is not None and not routed:
        raise SystemExit(f"--capacity: {path} has no routers (it is not a routed dlo checkpoint)")
    if "dlo_repetitions" in config and not routed:  # shared repetitions: dlo's model class restores the sharing
        model = dlo.load_model(path, dtype=dtype)
    elif routed:
        values = [float(c) for c in capacity.split(",")] if capacity else None
        one_for_all = values is not None and len(values) == 1
        model = dlo.load_model(path, capacity=values[0] if one_for_all else values, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(dev).eval()


def task_manager(names: list[str]):
    """The task definitions next to this script, and lm-eval's own only when ``names`` needs them: indexing
    the thousands of built-in task files takes seconds."""
    from lm_eval.tasks import TaskManager

    ours = TaskManager(include_path=str(TASKS), include_defaults=False)
    if all(name in ours.all_tasks for name in names):
        return ours
    return TaskManager(include_path=str(TASKS))


def main(argv=None) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable, make_table
    from transformers import AutoTokenizer

    args = parse_args(argv)
    model = load(args.model, args.capacity, args.device)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(args.model), batch_size=args.batch_size)
    tasks = args.tasks.split(",")
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, task_manager=task_manager(tasks))
    print(make_table(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump({"model": args.model, "capacity": args.capacity, "results": results["results"]}, fh,
                      indent=2, default=handle_non_serializable)
    return results


if __name__ == "__main__":
    main()
