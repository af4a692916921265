"""GGUF files as model references: dequantised once into a cached safetensors checkpoint.

transformers reads a GGUF file with ``from_pretrained(dir, gguf_file=name)`` and dequantises every tensor
(about 30 s for a 135M model on two CPU cores). The model it returns refuses ``save_pretrained`` (its config
keeps the GGUF ``quantization_config``), so ``gguf_checkpoint`` builds a plain model of the same class from
the config without it, loads the dequantised state dict, and saves that with the tokenizer (chat template
included) and generation config. Every later reference to the same file reads the saved checkpoint.

The cache lives in ``$DLO_CACHE/gguf`` (default ``~/.cache/dlo/gguf``), one directory per file, keyed by the
file's absolute path, size and modification time: a replaced file is converted again, an unchanged one never.
Before anything is loaded, the file's architecture and tensor types are checked against what transformers
and the gguf package can dequantise, so an unsupported file is named in one error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from importlib.metadata import version

from dlo.checkpoints import atomic_output_dir
from dlo.errors import UserError

SOURCE_FILE = "gguf_source.json"  # written last into a converted checkpoint: what it was converted from
# Tensor types transformers reads without the gguf package's dequantiser.
UNQUANTISED_TYPES = ("F32", "F16", "BF16")


def is_gguf_reference(ref: str | os.PathLike) -> bool:
    return os.fspath(ref).lower().endswith(".gguf")


def cache_root() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("DLO_CACHE", "~/.cache/dlo")), "gguf")


def gguf_checkpoint(path: str | os.PathLike, output: str | os.PathLike | None = None, force: bool = False) -> str:
    """The directory of a safetensors checkpoint converted from the GGUF file ``path`` (tokenizer, chat
    template and generation config included), converting on the first call only. ``output``: where to write
    it (default: the cache, ``$DLO_CACHE/gguf``); an ``output`` that holds anything but an earlier conversion
    is replaced only with ``force``. Raises ``UserError`` naming the file for a missing file, a file that is
    not GGUF, or an architecture or quantisation type transformers cannot dequantise."""
    source = gguf_source(path)
    path = source["gguf_file"]
    if output is None:
        key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(path)[: -len(".gguf")])
        output = os.path.join(cache_root(), f"{stem}-{key}")
        force = True  # the cache is dlo's own: an unfinished or stale conversion there is replaced
    output = os.path.abspath(os.fspath(output))
    previous = converted_from(output)
    if previous == source:
        return output
    architecture = check_gguf_file(path)
    with atomic_output_dir(output, force=force or previous is not None, inputs=[path]) as tmp:
        _convert(path, architecture, tmp)
        with open(os.path.join(tmp, SOURCE_FILE), "w", encoding="utf-8") as fh:
            json.dump(source, fh, indent=2)
    return output


def gguf_source(path: str | os.PathLike) -> dict:
    """What identifies a GGUF file's conversion: its absolute path, size and modification time."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(path):
        raise UserError(f"GGUF file {path}: not found")
    stat = os.stat(path)
    return {"gguf_file": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def converted_from(folder: str) -> dict | None:
    """What ``folder`` was converted from (``gguf_source.json``), or ``None`` if it is no finished conversion."""
    try:
        with open(os.path.join(folder, SOURCE_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def check_gguf_file(path: str) -> str:
    """The file's architecture, once the file is known to be GGUF that transformers can dequantise."""
    gguf = _import_gguf()
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise UserError(f"GGUF file {path}: cannot be read as GGUF ({err})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"GGUF file {path}: no general.architecture in its metadata")
    architecture = str(field.contents())
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        known = ", ".join(name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer"))
        raise UserError(f"GGUF file {path}: architecture {architecture!r} cannot be dequantised by transformers "
                        f"(it reads: {known})")
    one_per_type = {tensor.tensor_type.name: tensor for tensor in reader.tensors}
    unreadable = sorted(name for name, tensor in one_per_type.items() if not _dequantisable(gguf, tensor))
    if unreadable:
        raise UserError(f"GGUF file {path}: quantisation type {', '.join(unreadable)} cannot be dequantised by the "
                        f"gguf package {version('gguf')} (choose a file quantised as Q4_0, Q4_1, Q8_0, Q4_K..Q6_K, "
                        "F16 or F32)")
    return architecture


def _dequantisable(gguf, tensor) -> bool:
    """Whether the gguf package dequantises ``tensor``'s type: tried on its first row, which costs nothing."""
    if tensor.tensor_type.name in UNQUANTISED_TYPES:
        return True
    try:
        gguf.quants.dequantize(tensor.data[:1], tensor.tensor_type)
    except NotImplementedError:
        return False
    return True


def _convert(path: str, architecture: str, output: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = os.path.split(path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    # A plain model of the same class: the loaded one keeps the GGUF quantisation config, which save refuses.
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError):
        model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(output)
    print(f"dlo: converted GGUF file {path} ({architecture}); later runs read the checkpoint instead",
          file=sys.stderr)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("reading a GGUF file needs the gguf package: pip install gguf") from None
    return gguf
