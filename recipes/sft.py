"""Supervised fine-tuning with dlo routing (expand -> route -> train -> calibrate -> save).

    accelerate launch recipes/sft.py --config recipes/configs/tiny.yaml [key=value ...]

Overrides use dotted keys into the YAML sections, e.g. ``routing.capacity=0.25``,
``training.max_steps=100``, ``output_dir=runs/x``; ``resume=true`` continues the run in
``output_dir`` from its last checkpoint (a run stopped with SIGTERM saves one before exiting).
The final model is written to ``<output_dir>/final``: a ``dlo.load_model`` checkpoint (or a
plain one when routing is off) with the tokenizer, calibrated thresholds and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import yaml
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

import dlo
from dlo.checkpoints import check_weights, read_config, resolve_model_dir
from dlo.data import SFTCollator, build_sft_dataset
from dlo.modeling import routed_layers
from dlo.recipe_config import RecipeConfig, load_recipe_config
from dlo.trainer import CapacityImageCallback, DloTrainer

RUN_CONFIG_FILE = "recipe_config.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (see recipes/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys into sections")
    return parser.parse_args(argv)


def check_output_dir(cfg: RecipeConfig, resume: bool):
    """Refuse to mix two runs in one directory (every rank checks before anyone writes)."""
    path = os.path.join(cfg.output_dir, RUN_CONFIG_FILE)
    if os.path.isdir(cfg.output_dir) and os.listdir(cfg.output_dir) and not resume:
        found = "a dlo run" if os.path.isfile(path) else "other files"
        raise ValueError(
            f"output_dir {cfg.output_dir!r} already holds {found}; pass resume=true to continue it "
            "or choose another output_dir"
        )
    if resume and not os.path.isfile(path):
        raise ValueError(f"resume=true but {cfg.output_dir!r} holds no dlo run to resume")


def record_run_config(cfg: RecipeConfig):
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, RUN_CONFIG_FILE), "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


def expansion_plan(spec: dict, num_layers: int):
    from dlo.expansion import ExpansionPlan

    spec = dict(spec)
    if "strategy" not in spec:
        raise ValueError("model.expansion needs a 'strategy' (llama-pro, dus, idus or slices)")
    return ExpansionPlan.build(spec.pop("strategy"), num_layers, **spec)


def load_model(cfg: RecipeConfig):
    dtype = getattr(torch, cfg.model.dtype)
    model_dir = resolve_model_dir(cfg.model.path)  # a directory, or a hub id (offline from the cache)
    already_routed = "dlo_routing" in read_config(model_dir)
    check_weights(model_dir)  # a truncated or corrupt weight file is named before transformers reads it
    if already_routed:
        model = dlo.load_model(model_dir, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                     attn_implementation=cfg.model.attn_implementation)
    if cfg.model.expansion:
        if already_routed:
            raise ValueError("model.expansion is set but the model already has routers; expand before routing")
        from dlo.expansion import expand_model

        model = expand_model(model, expansion_plan(cfg.model.expansion, model.config.num_hidden_layers))
    if cfg.routing is not None and not already_routed:
        model = dlo.attach_routers(model, cfg.routing)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model, cfg: RecipeConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
                      # Routers are small and new: they always train fully and are saved with the adapters.
                      modules_to_save=["router"] if routed_layers(model) else None)
    return get_peft_model(model, lora)


def calibration_batches(examples: list[dict], collator: SFTCollator, n: int, batch_size: int = 8):
    picked = examples[:n]
    return [
        {k: v for k, v in collator(picked[i:i + batch_size]).items() if k != "labels"}
        for i in range(0, len(picked), batch_size)
    ]


def print_summary(summary: dict):
    print("\n== dlo sft summary ==")
    for key in ("steps", "train_task_loss", "eval_loss", "eval_perplexity", "train_seconds"):
        if summary.get(key) is not None:
            print(f"{key:>18}: {summary[key]}")
    if summary.get("layers"):
        print(f"{'layer':>6} {'target':>8} {'realised':>9} {'threshold':>10}")
        for row in summary["layers"]:
            print(f"{row['layer']:>6} {row['target_capacity']:>8.3f} {row['realised_capacity']:>9.3f} "
                  f"{row['threshold']:>10.4f}")
    print(f"final model: {summary['final_dir']}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = [o for o in args.overrides if not o.startswith("resume=")]
    resume = any(o in ("resume=true", "resume=True", "resume=1") for o in args.overrides)
    cfg = load_recipe_config(args.config, overrides)
    is_main = int(os.environ.get("RANK", "0")) == 0
    check_output_dir(cfg, resume)
    set_seed(cfg.seed)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(cfg.output_dir, "tb"))

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg.model.path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(cfg)
    train = build_sft_dataset(tokenizer, cfg.data.train_file, cfg.data.max_length, cfg.data.max_train_samples,
                              cfg.data.packing)
    evaluation = None
    if cfg.data.eval_file:
        evaluation = build_sft_dataset(tokenizer, cfg.data.eval_file, cfg.data.max_length,
                                       cfg.data.max_eval_samples)
    collator = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    if cfg.lora is not None:
        model = add_lora(model, cfg)

    training = {"report_to": ["tensorboard"], "save_strategy": "steps", "ddp_find_unused_parameters": False,
                **cfg.training}
    targs = TrainingArguments(output_dir=cfg.output_dir, seed=cfg.seed, remove_unused_columns=False, **training)
    PartialState().wait_for_everyone()  # every rank has checked output_dir before the main one writes there
    if is_main and not resume:
        record_run_config(cfg)
    trainer = DloTrainer(model=model, args=targs, train_dataset=train, eval_dataset=evaluation,
                         data_collator=collator, processing_class=tokenizer)
    trainer.add_callback(CapacityImageCallback(os.environ["TENSORBOARD_LOGGING_DIR"],
                                               every=max(targs.logging_steps, 1) * 5))
    checkpoint = get_last_checkpoint(cfg.output_dir) if resume else None
    if resume and checkpoint is None:
        raise ValueError(f"resume=true but {cfg.output_dir!r} has no checkpoint-* directory")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    stopped = trainer.state.global_step < trainer.state.max_steps
    if stopped:
        if is_main:
            print(f"stopped at step {trainer.state.global_step}; checkpoint saved. Resume with: "
                  f"accelerate launch recipes/sft.py --config {args.config} {' '.join(args.overrides)} resume=true")
        return 0
    finish(cfg, trainer, tokenizer, train, evaluation, collator, result, is_main)
    return 0


def finish(cfg, trainer, tokenizer, train, evaluation, collator, result, is_main):
    model = trainer.model
    if cfg.lora is not None and cfg.lora.merge:
        model = model.merge_and_unload()
    routed = routed_layers(model)
    summary = {"steps": trainer.state.global_step, "train_seconds": round(result.metrics["train_runtime"], 1),
               "train_task_loss": next((h["task_loss"] for h in reversed(trainer.state.log_history)
                                        if "task_loss" in h), None)}
    if routed and cfg.calibration_samples > 0:
        # Calibrate on training text; realised capacity is then measured on held-out text.
        batches = calibration_batches(train, collator, cfg.calibration_samples)
        dlo.calibrate(model, batches, progress=is_main)
    if evaluation is not None:
        metrics = trainer.evaluate()
        summary["eval_loss"] = round(metrics["eval_loss"], 4)
        summary["eval_perplexity"] = round(float(torch.exp(torch.tensor(metrics["eval_loss"]))), 3)
    if routed:
        realised = _realised_capacity(model, evaluation or train, collator)
        summary["layers"] = [
            {"layer": layer.layer_index, "target_capacity": round(layer.target_capacity, 4),
             "realised_capacity": round(r, 4), "threshold": round(float(layer.threshold()), 5)}
            for layer, r in zip(routed, realised)
        ]
    final_dir = os.path.join(cfg.output_dir, "final")
    summary["final_dir"] = final_dir
    if is_main:
        model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        with open(os.path.join(final_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        print_summary(summary)


@torch.no_grad()
def _realised_capacity(model, examples, collator, n: int = 64) -> list[float]:
    """Share of valid tokens each routed layer runs at inference (causal thresholds), on ``examples``."""
    model.eval()
    layers = routed_layers(model)
    ran = torch.zeros(len(layers))
    total = torch.zeros(len(layers))
    device = next(model.parameters()).device
    for batch in calibration_batches(examples, collator, n):
        records = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False,
                        output_router_logits=True).routing
        for i, record in enumerate(records):
            ran[i] += (record.selected & record.valid).sum().item()
            total[i] += record.valid.sum().item()
    return (ran / total.clamp(min=1)).tolist()


if __name__ == "__main__":
    sys.exit(main())
