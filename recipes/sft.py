"""Supervised fine-tuning with dlo routing (expand -> route -> train -> calibrate -> save).

    accelerate launch recipes/sft.py --config recipes/configs/tiny.yaml [key=value ...]

Overrides use dotted keys into the YAML sections, e.g. ``routing.capacity=0.25``,
``training.max_steps=100``, ``output_dir=runs/x``; ``resume=true`` continues the run in
``output_dir`` from its newest complete checkpoint (a run stopped with SIGTERM saves one before
exiting) when the settings that shape training are those the run was started with.
The final model is written to ``<output_dir>/final``: a ``dlo.load_model`` checkpoint (or a
plain one when routing is off) with the tokenizer, calibrated thresholds and ``summary.json``.

Config, data, model and output_dir are all checked before anything is written; a mistake in any
of them exits with ``sft.py: error: <message>`` and code 2 (``DLO_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from typing import NamedTuple

import torch
import yaml
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.trainer import TRAINER_STATE_NAME

import dlo
from dlo.batching import MODEL_INPUTS, SFTCollator, batches, pad_token_id
from dlo.checkpoints import atomic_output_dir, check_routing_config, check_weights, read_config, resolve_model_dir
from dlo.comparison import comparison_table, measure
from dlo.data import DataCounts, build_sft_dataset, overlap_warning
from dlo.distributed import save_pretrained_gathered
from dlo.errors import EXIT_USER_ERROR, USER_ERRORS, UserError, debug_enabled, run_entry_point
from dlo.evaluation import evaluate, load_batches
from dlo.export import shared_repetitions
from dlo.model_card import write_model_card
from dlo.modeling import decoder_layers, materialise_repetitions, new_layer_indices, routed_layers
from dlo.recipe_config import (
    RESUME_SAFE_KEYS,
    RecipeConfig,
    changed_settings,
    load_recipe_config,
    parse_scalar,
    training_arguments,
)
from dlo.sharing import unshare
from dlo.trainer import CapacityImageCallback, DloTrainer
from dlo.validation import Boolean

RUN_CONFIG_FILE = "recipe_config.yaml"
FINAL_DIR = "final"
LOG_HISTORY_FILE = "log_history.json"  # in final/: the Trainer's log history
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MEASURE_BATCH = 8  # batch size of calibration and of the realised-capacity measurement
REALISED_SAMPLES = 64  # examples the realised capacity is measured on


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (see recipes/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys into sections")
    return parser.parse_args(argv)


def split_resume(overrides: list[str]) -> tuple[bool, list[str]]:
    """``resume=true|false`` (not a config key) and the other overrides."""
    resume, rest = False, []
    for item in overrides:
        if item.startswith("resume="):
            resume = Boolean()("resume", parse_scalar(item.split("=", 1)[1]))
        else:
            rest.append(item)
    return resume, rest


@contextlib.contextmanager
def reported_by_first_local_process():
    """Every process checks the same inputs; a mistake in them is reported once per machine, by local rank 0."""
    try:
        yield
    except USER_ERRORS:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 or debug_enabled():
            raise
        raise SystemExit(EXIT_USER_ERROR) from None


def is_complete(checkpoint: str) -> bool:
    """Saving finished: the Trainer writes trainer_state.json last, after weights, optimizer, scheduler and RNG."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as fh:
            json.load(fh)
    except (OSError, ValueError):
        return False
    return True


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest complete ``checkpoint-N`` of ``output_dir`` and the newer ones whose saving was cut off."""
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name)))
    incomplete = []
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete(path):
            return path, incomplete
        incomplete.append(name)
    return None, incomplete


def check_output_dir(cfg: RecipeConfig, resume: bool) -> str | None:
    """The checkpoint to resume from (None: train from step 0), once ``output_dir`` may hold this run.

    Every rank checks before anyone writes. A run that saved neither a complete checkpoint nor a final model
    left nothing to keep: a rerun, or ``resume=true``, starts it again.
    """
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output_dir {out!r} is a file, not a directory")
    entries = os.listdir(out) if os.path.isdir(out) else []
    if not os.path.isfile(os.path.join(out, RUN_CONFIG_FILE)):
        if resume:
            raise UserError(f"resume=true but {out!r} holds no dlo run to resume (no {RUN_CONFIG_FILE})")
        if entries:
            raise UserError(f"output_dir {out!r} already holds other files; choose another output_dir")
        return None
    checkpoint, incomplete = newest_complete_checkpoint(out)
    finished = os.path.isdir(os.path.join(out, FINAL_DIR))
    if not resume:
        if checkpoint or finished:
            held = os.path.basename(checkpoint) if checkpoint else f"{FINAL_DIR}/"
            raise UserError(f"output_dir {out!r} already holds a dlo run ({held}); pass resume=true to continue "
                            "it or choose another output_dir")
        PartialState().print(f"output_dir {out!r} holds a run that saved no checkpoint: starting it again")
        return None
    if checkpoint is None:
        if finished:
            raise UserError(f"resume=true but {out!r} holds a finished run ({FINAL_DIR}/) and no complete "
                            "checkpoint to continue from")
        PartialState().print(f"resume=true: {out!r} holds no complete checkpoint; training from step 0")
        return None
    refuse_changed_settings(cfg)
    if incomplete:
        PartialState().print(f"skipping {', '.join(incomplete)}: saving was cut off before {TRAINER_STATE_NAME}")
    return checkpoint


def refuse_changed_settings(cfg: RecipeConfig):
    """A resumed run trains on with the weights, buffers and optimizer of its checkpoint: settings that shape
    them must be those the run was started with."""
    path = os.path.join(cfg.output_dir, RUN_CONFIG_FILE)
    try:
        with open(path) as fh:
            recorded = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: the run's recorded config cannot be read ({err})") from err
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: the run's recorded config is not a YAML mapping")
    changed = changed_settings(recorded, cfg)
    if changed:
        listed = "; ".join(f"{key}: {before!r} -> {after!r}" for key, before, after in changed)
        raise UserError(f"resume=true but settings differ from the run in {cfg.output_dir!r} ({listed}); resume "
                        f"with the run's settings ({path}) or start a new run in another output_dir. May change "
                        f"on resume: {', '.join(RESUME_SAFE_KEYS)}")


def record_run_config(cfg: RecipeConfig):
    """Write the run's settings (replacing them at once, so a kill never leaves half a file)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, RUN_CONFIG_FILE)
    with open(path + ".tmp", "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(path + ".tmp", path)


def expansion_plan(spec: dict, num_layers: int):
    from dlo.expansion import ExpansionPlan

    spec = dict(spec)  # the recipe config has checked that it names a strategy
    try:
        return ExpansionPlan.build(spec.pop("strategy"), num_layers, **spec)
    except (TypeError, ValueError) as err:  # a parameter the strategy does not take, or a bad value
        raise UserError(f"model.expansion: {err}") from err


def model_directory(cfg: RecipeConfig) -> str:
    """The checkpoint directory ``model.path`` names: a directory, a hub id (offline from the cache), or a GGUF
    file's converted checkpoint. The first local process converts a GGUF file; the others then find it cached."""
    with PartialState().local_main_process_first():
        return resolve_model_dir(cfg.model.path, gguf_file=cfg.model.gguf_file)


def load_model(cfg: RecipeConfig):
    dtype = getattr(torch, cfg.model.dtype)
    model_dir = model_directory(cfg)
    raw = read_config(model_dir)
    already_routed = "dlo_routing" in raw
    check_weights(model_dir)  # a truncated or corrupt weight file is named before transformers reads it
    check_routing_config(model_dir, raw)
    if already_routed or "dlo_repetitions" in raw:  # routers or shared repetitions: dlo's model class
        model = dlo.load_model(model_dir, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                     attn_implementation=cfg.model.attn_implementation)
    if cfg.model.expansion:
        if already_routed:
            raise ValueError("model.expansion is set but the model already has routers; expand before routing")
        from dlo.expansion import expand_model

        model = expand_model(model, expansion_plan(cfg.model.expansion, model.config.num_hidden_layers))
    sharded = [name for var, name in SHARDED_LAUNCHES.items() if os.environ.get(var, "false").lower() == "true"]
    if sharded and shared_repetitions(model):
        raise UserError(f"shared repetitions under {sharded[0]}: sharding units that hold the same tensor twice is not "
                        "verified; train them unsharded (one process or DDP), or use model.expansion.shared: false")
    if cfg.routing is not None and not already_routed:
        model = dlo.attach_routers(model, cfg.routing)
    if cfg.model.trainable_layers == "new":
        freeze_base(model)
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def freeze_base(model):
    """LLaMA-Pro's recipe: only the layers expansion inserted train (their routers too, and every router)."""
    new = new_layer_indices(model.config)
    if not new:
        raise UserError("model.trainable_layers=new: the model records no inserted layers (config.dlo_expansion); "
                        "set model.expansion or load an expanded checkpoint")
    model.requires_grad_(False)
    layers = decoder_layers(model)
    for index in new:
        layers[index].requires_grad_(True)
    for layer in routed_layers(model):
        layer.router.requires_grad_(True)


def new_modules(model) -> list[str]:
    """The modules dlo adds, trained fully under LoRA: routers, and the residual scales of shared repetitions."""
    names = ["router"] if routed_layers(model) else []
    if any(name.endswith(".residual_scale") for name, _ in model.named_modules()):
        names.append("residual_scale")
    return names


def add_lora(model, cfg: RecipeConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
                      # Routers and the residual scales of shared repetitions are small and new: they always train
                      # fully and are saved with the adapters.
                      modules_to_save=new_modules(model) or None)
    return get_peft_model(model, lora)


def print_summary(summary: dict):
    print("\n== dlo sft summary ==")
    for key in ("steps", "train_task_loss", "eval_loss", "eval_perplexity", "train_seconds"):
        if summary.get(key) is not None:
            print(f"{key:>18}: {summary[key]}")
    if summary.get("parameters"):
        print(f"{'parameters':>18}: {summary['parameters']['total']:,} ({summary['parameters']['trainable']:,} "
              "trainable)")
    for split, c in summary.get("data", {}).items():
        print(f"{split + '_examples':>18}: {c['examples']} of {c['records']} records "
              f"({c['dropped_too_long']} dropped as too long, {c['truncated']} truncated)")
    if summary.get("layers"):
        print(f"{'layer':>6} {'target':>8} {'realised':>9} {'threshold':>10}")
        for row in summary["layers"]:
            print(f"{row['layer']:>6} {row['target_capacity']:>8.3f} {row['realised_capacity']:>9.3f} "
                  f"{row['threshold']:>10.4f}")
    print(f"final model: {summary['final_dir']}")


def data_line(path: str, counts: DataCounts, max_length: int) -> str:
    line = f"data: {path}: {counts.records} records -> {counts.examples} examples"
    if counts.dropped_too_long:
        line += f", {counts.dropped_too_long} dropped (no answer token within max_length={max_length})"
    if counts.truncated:
        line += f", {counts.truncated} truncated to {max_length} tokens"
    if counts.packed_blocks is not None:
        line += f", packed into {counts.packed_blocks} blocks"
    return line


# Variables accelerate's launchers set for what the accelerate config asks, and the names messages use.
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}
CPU_LAUNCH = "accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/sft.py ..."


def check_launch(targs):
    """Refuse a launch that accelerate would quietly run as something else (every rank checks, before loading).

    accelerate enables FSDP and DeepSpeed on GPUs only (on the CPU it trains unsharded DDP copies); its simple
    launcher starts one process for a multi-process config it cannot start itself (MULTI_CPU without mpirun);
    ZeRO-3's partitioned loading leaves the layers empty when dlo expands them and sizes the routers.
    """
    asked = [name for var, name in SHARDED_LAUNCHES.items() if os.environ.get(var, "false").lower() == "true"]
    if asked and targs.device.type == "cpu":
        where = "training.use_cpu=true" if targs.use_cpu else "no GPU is visible"
        raise UserError(f"the accelerate config asks for {asked[0]}, which accelerate sets up on GPUs only, and this "
                        f"run is on the CPU ({where}): it would train unsharded copies instead. Run it on GPUs with "
                        f"training.use_cpu=false, or two CPU processes with: {CPU_LAUNCH}")
    plugin = getattr(targs, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero3_init_flag:
        raise UserError("the DeepSpeed config sets zero3_init_flag: true: ZeRO-3 would partition the weights while "
                        "they load, before dlo expands the layers and sizes the routers from them; set "
                        "zero3_init_flag: false (recipes/accelerate/zero3.yaml): the weights are partitioned when "
                        "training starts")
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and "MASTER_ADDR" in os.environ and PartialState().num_processes == 1:
        raise UserError(f"accelerate started one process for a config that asks for several (a MULTI_CPU config "
                        f"expects mpirun to start them); two CPU processes: {CPU_LAUNCH}")


def launch_line(trainer) -> str:
    accelerator = trainer.accelerator
    return (f"launch: {accelerator.num_processes} process(es), {accelerator.distributed_type.value} "
            f"on {accelerator.device.type}")


class TrainedRun(NamedTuple):
    model: torch.nn.Module  # the final model, as saved in final/ (thresholds calibrated, adapters merged)
    tokenizer: object
    evaluation: list[dict] | None  # the held-out examples, tokenised as training tokenises them
    summary: dict


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with reported_by_first_local_process():
        resume, overrides = split_resume(args.overrides)
        cfg = load_recipe_config(args.config, overrides)
    rerun = f"accelerate launch recipes/sft.py --config {args.config} {' '.join(overrides)} resume=true"
    run = train_run(cfg, resume, rerun)
    if run is not None and cfg.compare is not None:
        compare(cfg, run, rerun)
    return 0


def train_run(cfg: RecipeConfig, resume: bool, rerun: str) -> TrainedRun | None:
    """One training run into ``cfg.output_dir``: its final model, or ``None`` when it stopped early (checkpoint
    saved; ``rerun`` resumes it)."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    with reported_by_first_local_process():
        targs = training_arguments(cfg)
        check_launch(targs)
        checkpoint = check_output_dir(cfg, resume)
        set_seed(cfg.seed)
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(cfg.output_dir, "tb"))

        tokenizer = AutoTokenizer.from_pretrained(model_directory(cfg))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        train, train_counts = build_sft_dataset(tokenizer, cfg.data.train_file, cfg.data.max_length,
                                                cfg.data.max_train_samples, cfg.data.packing)
        counts = {"train": train_counts}
        evaluation = None
        if cfg.data.eval_file:
            evaluation, counts["eval"] = build_sft_dataset(tokenizer, cfg.data.eval_file, cfg.data.max_length,
                                                           cfg.data.max_eval_samples)
            overlap_warning(cfg.data.train_file, cfg.data.eval_file, cfg.data.max_train_samples,
                            cfg.data.max_eval_samples)
        if is_main:
            print(data_line(cfg.data.train_file, train_counts, cfg.data.max_length))
            if evaluation is not None:
                print(data_line(cfg.data.eval_file, counts["eval"], cfg.data.max_length))
        model = load_model(cfg)
        if cfg.data.packing:  # transformers keeps a packed row's examples apart only in forwards without a KV cache
            model.config.use_cache = False
        collator = SFTCollator(pad_token_id=tokenizer.pad_token_id)
        if cfg.lora is not None:
            model = add_lora(model, cfg)

    # What training holds, counted before the trainer wraps or shards the model (FSDP, ZeRO-3) and before adapters
    # merge: model.parameters() yields a shared repetition's tensors once.
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    PartialState().wait_for_everyone()  # every rank has checked its inputs before the main one writes
    if is_main:
        record_run_config(cfg)
    trainer = DloTrainer(model=model, args=targs, train_dataset=train, eval_dataset=evaluation,
                         data_collator=collator, processing_class=tokenizer)
    trainer.add_callback(CapacityImageCallback(os.environ["TENSORBOARD_LOGGING_DIR"],
                                               every=max(targs.logging_steps, 1) * 5))
    if is_main:
        print(launch_line(trainer))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    stopped = trainer.state.global_step < trainer.state.max_steps
    if stopped:
        if is_main:
            print(f"stopped at step {trainer.state.global_step}; checkpoint saved. Resume with: {rerun}")
        return None
    model, summary = finish(cfg, trainer, tokenizer, train, evaluation, collator, result, counts, parameters,
                            is_main)
    return TrainedRun(model, tokenizer, evaluation, summary)


def finish(cfg, trainer, tokenizer, train, evaluation, collator, result, counts: dict[str, DataCounts],
           parameters: dict[str, int], is_main):
    model = trainer.model
    if cfg.lora is not None and cfg.lora.merge:
        # Each shared repetition's adapters merge into its own copy of the weights: the repetitions stop sharing.
        repeated = shared_repetitions(model)
        if repeated:
            unshare(decoder_layers(model))
        model = model.merge_and_unload()
        if repeated:
            materialise_repetitions(model)
    routed = routed_layers(model)
    summary = {"steps": trainer.state.global_step, "train_seconds": round(result.metrics["train_runtime"], 1),
               "parameters": parameters,
               "train_task_loss": next((h["task_loss"] for h in reversed(trainer.state.log_history)
                                        if "task_loss" in h), None),
               "data": {split: dataclasses.asdict(c) for split, c in counts.items()}}
    if routed and cfg.calibration_samples > 0:
        # Calibrate on training text; realised capacity is then measured on held-out text.
        picked = train[:cfg.calibration_samples]
        dlo.calibrate(model, batches(picked, MEASURE_BATCH, collator.pad_token_id, MODEL_INPUTS), progress=is_main)
    if evaluation is not None:
        metrics = trainer.evaluate()
        summary["eval_loss"] = round(metrics["eval_loss"], 4)
        summary["eval_perplexity"] = round(float(torch.exp(torch.tensor(metrics["eval_loss"]))), 3)
    if routed:
        # Share of valid tokens each routed layer runs at inference (causal thresholds).
        picked = (evaluation or train)[:REALISED_SAMPLES]
        realised = evaluate(model, batches(picked, MEASURE_BATCH, collator.pad_token_id), progress=False).capacity
        summary["layers"] = [
            {"layer": layer.layer_index, "target_capacity": round(layer.target_capacity, 4),
             "realised_capacity": round(realised[layer.layer_index], 4),
             "threshold": round(float(layer.threshold()), 5)}
            for layer in routed
        ]
    final_dir = os.path.join(cfg.output_dir, FINAL_DIR)
    summary["final_dir"] = final_dir
    if cfg.data.packing:
        model.config.use_cache = True  # off for packed training only: the saved model generates with its cache
    # final/ appears whole or not at all (an interrupted save leaves no final/ that would mark the run finished):
    # the main process writes into a hidden sibling that becomes final/ once every file is in.
    writing = atomic_output_dir(final_dir) if is_main else contextlib.nullcontext(final_dir)
    with writing as target:
        save_pretrained_gathered(model, target)  # every rank: FSDP shards and ZeRO-3 partitions are gathered
        if is_main:
            tokenizer.save_pretrained(target)
            with open(os.path.join(target, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
            # Every training log (the routing terms of dlo.trainer included), for curves after the run: the
            # checkpoints' trainer_state.json that also holds it is pruned or never written.
            with open(os.path.join(target, LOG_HISTORY_FILE), "w") as fh:
                json.dump(trainer.state.log_history, fh)
            write_model_card(target, base_model=cfg.model.path, extra={"training data": cfg.data.train_file},
                             location=final_dir)
    if is_main:
        print_summary(summary)
    return model, summary


DENSE_DIR = "dense"
EXPORTED_DIR = "exported"
COMPARISON_FILE = "comparison.json"


def compare(cfg: RecipeConfig, run: TrainedRun, rerun: str):
    """The ``compare`` section: the base model, the dense twin, the trained model (routed: with its thresholds and
    with every layer run) and its static export, measured on the same held-out data; a table and comparison.json."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    pad_id = pad_token_id(run.tokenizer)
    answers = batches(run.evaluation, MEASURE_BATCH, pad_id)
    texts = None
    if cfg.compare.text_file:
        texts = load_batches(cfg.compare.text_file, run.tokenizer, MEASURE_BATCH, cfg.data.max_length,
                             cfg.compare.max_text_samples)
    rows = []
    if cfg.compare.base:
        as_loaded = dataclasses.replace(cfg.model, expansion=None, trainable_layers="all")
        base = load_model(dataclasses.replace(cfg, model=as_loaded, routing=None, lora=None, compare=None))
        rows.append(measure("base (as loaded)", base.eval(), answers, texts))
        del base
    if cfg.compare.dense and cfg.routing is not None:
        dense = dense_twin(cfg, rerun)
        if dense is None:
            return
        rows.append(measure("dense expanded, trained", dense.eval(), answers, texts))
        del dense
    model = run.model.eval()
    if routed_layers(model):
        rows.append(measure("routed", model, answers, texts))
        rows.append(measure("routed, every layer run", model, answers, texts, run_every_layer=True))
    else:
        rows.append(measure("trained", model, answers, texts))
    if cfg.compare.export_layers is not None:
        rows.append(measure_export(cfg, run, answers, texts, is_main))
    if is_main:
        print("\n== comparison on the held-out data ==")
        print(comparison_table(rows))
        path = os.path.join(cfg.output_dir, COMPARISON_FILE)
        with open(path + ".tmp", "w") as fh:
            json.dump({"eval_file": cfg.data.eval_file, "text_file": cfg.compare.text_file,
                       "models": [row.to_dict() for row in rows]}, fh, indent=2)
        os.replace(path + ".tmp", path)


def dense_twin(cfg: RecipeConfig, rerun: str):
    """The same run without routing, in ``<output_dir>/dense``: trained (or resumed) once, read back after."""
    dense_cfg = dataclasses.replace(cfg, routing=None, compare=None, output_dir=os.path.join(cfg.output_dir, DENSE_DIR))
    final = os.path.join(dense_cfg.output_dir, FINAL_DIR)
    if os.path.isfile(os.path.join(final, "summary.json")):
        PartialState().print(f"dense twin: reading the finished run {final}")
        return AutoModelForCausalLM.from_pretrained(final, dtype=getattr(torch, cfg.model.dtype))
    PartialState().print(f"\n== dense twin: the same training without routing, in {dense_cfg.output_dir} ==")
    started = os.path.isfile(os.path.join(dense_cfg.output_dir, RUN_CONFIG_FILE))
    dense = train_run(dense_cfg, resume=started, rerun=rerun)
    return None if dense is None else dense.model


def measure_export(cfg: RecipeConfig, run: TrainedRun, answers, texts, is_main):
    """The routed model pruned to ``compare.export_layers`` layers by realised usage, saved and measured."""
    layers = cfg.compare.export_layers
    usage = {row["layer"]: row["realised_capacity"] for row in run.summary.get("layers", [])}
    exported = dlo.export_static(run.model, num_layers=layers, capacities=usage or None)
    if is_main:
        with atomic_output_dir(os.path.join(cfg.output_dir, EXPORTED_DIR), force=True) as target:
            exported.save_pretrained(target)
            run.tokenizer.save_pretrained(target)
    return measure(f"static export ({layers} layers)", exported.eval(), answers, texts)


if __name__ == "__main__":
    sys.exit(run_entry_point(main, prog="sft.py"))
