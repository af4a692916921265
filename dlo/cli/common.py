"""Loading helpers shared by the ``report``, ``export`` and ``generate`` subcommands."""

from __future__ import annotations

import json
import os

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser):
    parser.add_argument("--model", required=True, help="Model directory: routed (dlo), plain, or a LoRA adapter.")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="Weights dtype (default: float32 on cpu, bfloat16 on cuda).")


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, DTYPES[dtype]


def is_routed_dir(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as fh:
        return "dlo_routing" in json.load(fh)


def load_model_and_tokenizer(path: str, device: torch.device, dtype: torch.dtype, need_tokenizer: bool = True):
    """(model, tokenizer or None): a dlo routed model, a plain *ForCausalLM, or a peft adapter on either.

    The model is returned in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dlo

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    adapter_file = os.path.join(path, "adapter_config.json")
    base_path = path
    if os.path.isfile(adapter_file):
        with open(adapter_file) as fh:
            base_path = json.load(fh).get("base_model_name_or_path") or ""
        if not os.path.isdir(base_path):
            raise FileNotFoundError(f"{path}: LoRA adapter whose base model {base_path!r} is not a local directory")
    if not os.path.isfile(os.path.join(base_path, "config.json")):
        raise FileNotFoundError(f"{base_path}: no config.json (not a saved model directory)")
    if is_routed_dir(base_path):
        model = dlo.load_model(base_path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if base_path != path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    model.to(device).eval()
    tokenizer = None
    for candidate in dict.fromkeys([path, base_path]):
        if any(os.path.isfile(os.path.join(candidate, f)) for f in TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(candidate)
            break
    if tokenizer is None and need_tokenizer:
        raise ValueError(f"{path}: no tokenizer saved with the model (needed to read the data/prompt)")
    return model, tokenizer
