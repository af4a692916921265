"""A frankenmodel on the tiny default: the middle third repeated in place and routed, copied vs shared.

Three SFT runs of recipes/configs/tiny.yaml (same data, steps and seed): the 6-layer base fine-tuned as it is;
slices 0-4,2-6 (layers 2-3 run twice) with the repetitions as zero-init copies; the same map with the
repetitions sharing their source's weights (residual scales 0). Both expansions route the repetitions at
capacity 0.5. Per run: parameters (each tensor once), final checkpoint and optimizer-state bytes on disk,
eval loss and perplexity, training time. The README's frankenmodel figures come from this script.

    python benchmarks/frankenmodel.py --out runs/frankenmodel.json [--steps 150] [--quick]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import common  # noqa: F401  (first: takes benchmarks/ off sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIDDLE = "{strategy: slices, ranges: '0-4,2-6', init: zero%s}"
ARMS = {
    "base": ["model.expansion=null", "routing=null"],
    "copied": [f"model.expansion={MIDDLE % ''}"],
    "shared": [f"model.expansion={MIDDLE % ', shared: true'}"],
}


def run_arm(name: str, workdir: str, steps: int, extra: list[str]) -> dict:
    out = os.path.join(workdir, name)
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "sft.py"), "--config",
           os.path.join(ROOT, "recipes", "configs", "tiny.yaml"), f"output_dir={out}", f"training.max_steps={steps}",
           f"training.save_steps={steps}", "training.disable_tqdm=true", *extra, *ARMS[name]]  # the arm's last
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the recipe failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    final = os.path.join(out, "final")
    with open(os.path.join(final, "summary.json")) as fh:
        summary = json.load(fh)
    return {"parameters": parameters(final),
            "checkpoint_bytes": os.path.getsize(os.path.join(final, "model.safetensors")),
            "optimizer_bytes": os.path.getsize(os.path.join(out, f"checkpoint-{steps}", "optimizer.pt")),
            "eval_loss": summary.get("eval_loss"), "eval_perplexity": summary.get("eval_perplexity"),
            "train_seconds": summary["train_seconds"], "layers": summary.get("layers")}


def parameters(final: str) -> int:
    from transformers import AutoModelForCausalLM

    import dlo
    from dlo.checkpoints import read_config

    config = read_config(final)
    dlo_class = "dlo_routing" in config or "dlo_repetitions" in config
    model = dlo.load_model(final) if dlo_class else AutoModelForCausalLM.from_pretrained(final)
    return sum(p.numel() for p in model.parameters())  # each Parameter once, as an optimizer sees them


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (the tiny config's 150)")
    p.add_argument("--quick", action="store_true", help="4 steps on 64 records: a smoke run")
    args = p.parse_args()
    steps = 4 if args.quick else args.steps
    extra = ["data.max_train_samples=64", "data.max_eval_samples=16", "calibration_samples=16",
             "routing.anneal_steps=2"] if args.quick else []
    with tempfile.TemporaryDirectory() as workdir:
        arms = {name: run_arm(name, workdir, steps, extra) for name in ARMS}
    result = {"environment": common.environment(common.torch.device("cpu"), common.torch.float32),
              "load_average": os.getloadavg(), "steps": steps, "arms": arms}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    for name, arm in arms.items():
        print(f"{name:>7}: {arm['parameters']:>9,} parameters, checkpoint {arm['checkpoint_bytes'] / 2**20:6.2f} MiB, "
              f"optimizer {arm['optimizer_bytes'] / 2**20:6.2f} MiB, eval loss {arm['eval_loss']}, "
              f"ppl {arm['eval_perplexity']}, {arm['train_seconds']} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
