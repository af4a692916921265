"""``dlo expand``: grow a checkpoint's depth by duplicating layers (DESIGN.md §2.1, dlo/expansion.py).

The output is a standard checkpoint (safetensors shards, config.json with the provenance in
``dlo_expansion``, generation config and tokenizer files copied) that plain
``AutoModelForCausalLM.from_pretrained`` loads without custom code. Tensors are streamed layer by
layer from the input shards into output shards, so at most one output shard and a couple of layers
are in memory, never two models. Everything is written into a hidden temporary directory next to
the output and renamed into place at the end: a failure leaves no output behind.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from contextlib import ExitStack

import torch

from dlo.expansion import (
    DEFAULT_INIT,
    INITS,
    STRATEGIES,
    ExpansionPlan,
    check_architecture,
    expanded_config,
    init_layer_tensors,
)

MAX_SHARD_BYTES = 5 * 2**30
# Files copied unchanged next to the weights (tokenizer and generation defaults).
SIDE_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
              "merges.txt", "chat_template*")
LAYER_KEY = re.compile(r"^(.*\blayers)\.(\d+)\.(.+)$")
# Which command-line options each strategy takes (argparse dest names).
STRATEGY_OPTIONS = {"llama-pro": ("groups",), "dus": ("overlap",), "idus": ("overlap", "group_size"),
                    "slices": ("slices",)}
OPTION_FLAGS = {"groups": "--groups G", "overlap": "--overlap M", "group_size": "--group-size g",
                "slices": "--slices A-B,..."}


def add_parser(subparsers):
    p = subparsers.add_parser("expand", help="Expand a model's depth (LLaMA-Pro, DUS, interlocked DUS, slices).",
                              description=__doc__)
    p.add_argument("--model", required=True, help="Directory of a Llama/Mistral/Qwen2 checkpoint (safetensors).")
    p.add_argument("--strategy", help=f"One of {', '.join(STRATEGIES)} (default with --mergekit: slices).")
    p.add_argument("--groups", type=int, help="llama-pro: number of equal groups G (must divide the depth).")
    p.add_argument("--overlap", type=int, help="dus/idus: layers m dropped from each copy, 0 <= m < n/2.")
    p.add_argument("--group-size", type=int, help="idus: chunk size g of the interleaved halves.")
    p.add_argument("--slices", help="slices: half-open base-layer ranges, e.g. 0-16,8-24,16-32.")
    p.add_argument("--mergekit", metavar="FILE", help="Read the slices from a mergekit passthrough YAML.")
    p.add_argument("--init", help=f"Init of duplicated layers: {', '.join(INITS)} "
                                  "(default: zero for llama-pro, copy otherwise).")
    p.add_argument("--output", required=True, help="Directory of the expanded checkpoint (written atomically).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty output directory.")


def run(args):
    from dlo.export import check_output

    # Cheap checks first: a call that must fail fails before anything is read or written.
    output = os.path.abspath(args.output)
    check_output(output, args.force)
    config = load_config(args.model)
    check_architecture(config)
    plan = plan_from_args(args, config.num_hidden_layers)
    print(plan.to_table())
    counts = expand_checkpoint(args.model, plan, output, force=args.force)
    before, after = counts["before"], counts["after"]
    print(f"parameters: {before:,} -> {after:,} ({(after - before) / before:+.1%})")
    print(f"wrote {output} ({len(plan.layers)} layers; loads with AutoModelForCausalLM.from_pretrained, "
          "no custom code)")


def plan_from_args(args, num_layers: int) -> ExpansionPlan:
    """The ExpansionPlan the command line asks for, for a base model of ``num_layers`` layers."""
    strategy = args.strategy or ("slices" if args.mergekit else None)
    if strategy is None:
        raise ValueError(f"--strategy is required (one of {', '.join(STRATEGIES)}), or --mergekit FILE")
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: unknown strategy; valid: {', '.join(STRATEGIES)}")
    if args.mergekit and strategy != "slices":
        raise ValueError(f"--mergekit describes slices; it cannot be combined with --strategy {strategy}")
    wanted = () if args.mergekit else STRATEGY_OPTIONS[strategy]
    given = [name for name in OPTION_FLAGS if getattr(args, name) is not None]
    extra = [OPTION_FLAGS[name].split()[0] for name in given if name not in wanted]
    if extra:
        takes = ", ".join(OPTION_FLAGS[n] for n in wanted) or "only --init"
        raise ValueError(f"{', '.join(extra)} does not apply to {'--mergekit' if args.mergekit else strategy} "
                         f"(it takes {takes})")
    missing = [OPTION_FLAGS[name] for name in wanted if name not in given]
    if missing:
        raise ValueError(f"--strategy {strategy} needs {' and '.join(missing)}")
    init = args.init or DEFAULT_INIT[strategy]
    if args.mergekit:
        if not os.path.isfile(args.mergekit):
            raise FileNotFoundError(f"mergekit config {args.mergekit!r} does not exist")
        return ExpansionPlan.from_mergekit(args.mergekit, init=init, num_layers=num_layers)
    params = {("ranges" if name == "slices" else name): getattr(args, name) for name in wanted}
    return ExpansionPlan.build(strategy, num_layers, init=init, **params)


def load_config(model_dir: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir!r}: no config.json (not a saved model directory)")
    return AutoConfig.from_pretrained(model_dir)


def weight_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file path, for a single-file or sharded checkpoint."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            return {k: os.path.join(model_dir, f) for k, f in json.load(fh)["weight_map"].items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as fh:
            return dict.fromkeys(fh.keys(), single)
    raise FileNotFoundError(f"{model_dir!r}: no model.safetensors(.index.json); dlo expand streams safetensors "
                            "checkpoints (re-save the model with save_pretrained(safe_serialization=True))")


def expand_checkpoint(model_dir: str, plan: ExpansionPlan, output: str, force: bool = False,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write the expansion of the checkpoint in ``model_dir`` to ``output``; return parameter counts
    ``{"before": ..., "after": ...}``. The result equals ``expand_model`` + ``save_pretrained``."""
    from safetensors import safe_open

    from dlo.export import check_output

    output = os.path.abspath(output)
    check_output(output, force)
    config = load_config(model_dir)
    check_architecture(config)
    files = weight_files(model_dir)
    prefix, layer_keys = _layer_keys(files, config.num_hidden_layers, model_dir)
    plan.check_base(config.num_hidden_layers)
    casts = [getattr(torch, d) for d in _mergekit_dtypes(plan)]

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        with ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in set(files.values())}
            before = sum(_numel(handles[f].get_slice(k).get_shape()) for k, f in files.items())

            def read_layer(i: int) -> dict[str, torch.Tensor]:
                return {rest: handles[files[key]].get_tensor(key) for rest, key in layer_keys[i].items()}

            writer = ShardWriter(tmp, max_shard_bytes, casts)
            in_layers = {key for keys in layer_keys.values() for key in keys.values()}
            for key in sorted(set(files) - in_layers):
                writer.add(key, handles[files[key]].get_tensor(key))
            for j, (i, init, is_new) in enumerate(plan.layers):
                tensors = read_layer(i)
                if is_new:  # own storage: safetensors may hand out views of one mmap for repeated reads
                    previous = read_layer(i - 1) if init in ("merge-linear", "slerp") else None
                    tensors = init_layer_tensors(init, tensors, previous)
                for rest, tensor in tensors.items():
                    writer.add(f"{prefix}.{j}.{rest}", tensor)
            writer.close()
        expanded_config(config, plan, config.num_hidden_layers)
        if casts:
            config.dtype = casts[-1]
        config.save_pretrained(tmp)
        for name in sorted(os.listdir(model_dir)):
            if any(fnmatch.fnmatch(name, pattern) for pattern in SIDE_FILES):
                shutil.copy2(os.path.join(model_dir, name), os.path.join(tmp, name))
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"before": before, "after": writer.numel}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mergekit_dtypes(plan: ExpansionPlan) -> list[str]:
    """The casts a mergekit config asks for, in mergekit's order: compute dtype, then out_dtype."""
    info = plan.params.get("mergekit") or {}
    return [info[k] for k in ("dtype", "out_dtype") if k in info]


def _layer_keys(files: dict[str, str], num_layers: int, model_dir: str) -> tuple[str, dict[int, dict[str, str]]]:
    """(prefix, {layer index: {key relative to the layer: full key}}) of the decoder layers."""
    layers, prefixes = {}, set()
    for key in files:
        match = LAYER_KEY.match(key)
        if match:
            prefixes.add(match.group(1))
            layers.setdefault(int(match.group(2)), {})[match.group(3)] = key
    if len(prefixes) != 1:
        raise ValueError(f"{model_dir!r}: expected one decoder layer stack (e.g. model.layers.N.*), "
                         f"found {sorted(prefixes) or 'none'}")
    if sorted(layers) != list(range(num_layers)):
        raise ValueError(f"{model_dir!r}: config.num_hidden_layers={num_layers} but the weights hold layers "
                         f"{sorted(layers)}")
    return prefixes.pop(), layers


class ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_bytes`` (a bigger tensor gets its own
    shard), written as they fill; ``close`` names them as transformers expects."""

    def __init__(self, folder: str, max_bytes: int, casts: list[torch.dtype] = ()):
        self.folder, self.max_bytes, self.casts = folder, max_bytes, casts
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = self.numel = 0
        self.shards: list[tuple[str, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor):
        if tensor.is_floating_point():
            for dtype in self.casts:
                tensor = tensor.to(dtype)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size
        self.numel += tensor.numel()

    def _flush(self):
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards)}.partial"
        save_file(self.pending, os.path.join(self.folder, name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            os.rename(os.path.join(self.folder, self.shards[0][0]), os.path.join(self.folder, "model.safetensors"))
            return
        weight_map = {}
        for k, (name, keys) in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.rename(os.path.join(self.folder, name), os.path.join(self.folder, final))
            weight_map.update(dict.fromkeys(keys, final))
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, fh, indent=2)


def _replace_dir(tmp: str, output: str):
    """Move the finished ``tmp`` to ``output``, replacing what is there (already checked against --force)."""
    if not os.path.exists(output):
        os.rename(tmp, output)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
    os.rename(output, os.path.join(old, "previous"))
    os.rename(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
