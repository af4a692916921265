"""Depth expansion of a checkpoint on disk (what ``dlo expand`` runs; ``expand_model`` does it in memory).

The output is a standard checkpoint (safetensors shards, config.json with the provenance in
``dlo_expansion``, generation config and tokenizer files copied) that plain
``AutoModelForCausalLM.from_pretrained`` loads without custom code. Tensors are streamed layer by
layer from the input shards into output shards, so at most one output shard and a couple of layers
are in memory, never two models. The output is written through ``atomic_output_dir``: a failure
leaves no output behind.

A shared plan (repetitions reusing their source's weights, dlo/sharing.py) copies no tensor: the base is
loaded whole, expanded in memory and saved by ``Dlo<Base>``, each shared tensor once; that checkpoint loads
with ``dlo.load_model`` or ``trust_remote_code=True``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from contextlib import ExitStack

import torch

from dlo.checkpoints import (
    TOKENIZER_FILES,
    atomic_output_dir,
    check_output_dir,
    read_config,
    resolve_model_dir,
    weight_files,
)
from dlo.errors import UserError, warn
from dlo.expansion import ExpansionPlan, check_architecture, expanded_config, init_layer_tensors

MAX_SHARD_BYTES = 5 * 2**30
# Files copied unchanged next to the weights (tokenizer and generation defaults).
SIDE_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
              "merges.txt", "chat_template*")
LAYER_KEY = re.compile(r"^(.*\blayers)\.(\d+)\.(.+)$")


def load_base_config(model_dir: str):
    """The transformers config of a base model to expand, refused unless dlo can expand it."""
    from transformers import AutoConfig

    read_config(model_dir)  # a readable config.json with a model_type, or a message naming the file
    config = AutoConfig.from_pretrained(model_dir)
    check_architecture(config)
    return config


def expand_checkpoint(model: str, plan: ExpansionPlan, output: str, force: bool = False,
                      max_shard_bytes: int = MAX_SHARD_BYTES, revision: str | None = None) -> dict:
    """Write the expansion of the checkpoint ``model`` (a directory or hub id) to ``output``; return parameter
    counts ``{"before": ..., "after": ...}``. The result equals ``expand_model`` + ``save_pretrained``."""
    from safetensors import safe_open

    model_dir = resolve_model_dir(model, revision)
    check_output_dir(output, force, inputs=[model_dir])
    config = load_base_config(model_dir)
    files = weight_files(model_dir)
    prefix, layer_keys = _layer_keys(files, config.num_hidden_layers, model_dir)
    plan.check_base(config.num_hidden_layers)
    casts = [getattr(torch, d) for d in _mergekit_dtypes(plan)]
    if plan.shared:
        return _expand_shared(model_dir, plan, output, force, casts)

    with atomic_output_dir(output, force, inputs=[model_dir]) as tmp, ExitStack() as stack:
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
        _copy_side_files(model_dir, tmp)
    return {"before": before, "after": writer.numel}


def _expand_shared(model_dir: str, plan: ExpansionPlan, output: str, force: bool, casts: list[torch.dtype]) -> dict:
    """A shared expansion copies no tensor: the base is loaded whole (the output's size, not twice it), expanded in
    memory and saved by ``Dlo<Base>``, which writes each shared tensor once (dlo/sharing.py)."""
    from transformers import AutoModelForCausalLM

    from dlo.expansion import expand_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    before = sum(p.numel() for p in model.parameters())
    for dtype in casts:
        model = model.to(dtype)
    model = expand_model(model, plan)
    with atomic_output_dir(output, force, inputs=[model_dir]) as tmp:
        model.save_pretrained(tmp)
        _copy_side_files(model_dir, tmp)
    stored = sum(os.path.getsize(os.path.join(output, name)) for name in os.listdir(output)
                 if name.endswith(".safetensors"))
    return {"before": before, "after": sum(p.numel() for p in model.parameters()), "stored_bytes": stored}


def _copy_side_files(model_dir: str, folder: str):
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        warn(f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}), so none is copied: the expanded "
             "checkpoint cannot read text until the base model's tokenizer is saved next to it")
    for name in sorted(os.listdir(model_dir)):
        if any(fnmatch.fnmatch(name, pattern) for pattern in SIDE_FILES):
            shutil.copy2(os.path.join(model_dir, name), os.path.join(folder, name))


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
        raise UserError(f"{model_dir}: expected one decoder layer stack (e.g. model.layers.N.*) in the weights, "
                        f"found {sorted(prefixes) or 'none'}")
    if sorted(layers) != list(range(num_layers)):
        raise UserError(f"{model_dir}: config.json has num_hidden_layers={num_layers} but the weights hold layers "
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
