"""What the ``report``, ``export`` and ``generate`` subcommands share: finding the model ``--model`` names,
checking options before anything heavy runs, and loading the model and its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dlo.checkpoints import (
    TOKENIZER_FILES,
    adapter_base_dir,
    check_routing_config,
    check_weights,
    read_config,
    resolve_model_dir,
)
from dlo.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Longest default truncation of eval records (a model with fewer positions gets its own limit).
DEFAULT_MAX_LENGTH = 512


def add_model_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="A routed (dlo), plain or exported model, or a LoRA adapter: a local directory or a "
                             "Hugging Face hub id (org/name), resolved like transformers does (offline from the "
                             "cache when HF_HUB_OFFLINE=1).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a hub id --model.")
    parser.add_argument("--gguf-file", default=None,
                        help="A GGUF file inside --model (a directory or hub id); a --model path ending in .gguf "
                             "works too. Converted once into a cached safetensors checkpoint ($DLO_CACHE/gguf).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="Weights dtype (default: float32 on cpu, bfloat16 on cuda).")


@dataclass
class ModelSource:
    """The model ``--model`` names, found and checked (config, weight files) before anything is loaded."""

    ref: str
    dir: str  # what --model resolves to: the model, or a LoRA adapter
    base_dir: str  # whose config and weights build the model: the adapter's base, else ``dir``
    config: dict  # base_dir's config.json

    @property
    def is_adapter(self) -> bool:
        return self.base_dir != self.dir

    @property
    def routed(self) -> bool:
        return "dlo_routing" in self.config

    @property
    def needs_dlo(self) -> bool:
        """Routers or shared repetitions: the model class is dlo's (``dlo.load_model``)."""
        return self.routed or "dlo_repetitions" in self.config

    @property
    def label(self) -> str:
        """How outputs record the model: a local directory's or GGUF file's absolute path, else the hub id as
        given."""
        if os.path.isfile(self.ref):
            return os.path.abspath(self.ref)
        return self.dir if os.path.isdir(self.ref) else self.ref


def find_model(ref: str, revision: str | None = None, gguf_file: str | None = None) -> ModelSource:
    model_dir = resolve_model_dir(ref, revision, gguf_file)
    base_dir = adapter_base_dir(model_dir) or model_dir
    config = read_config(base_dir)
    for folder in dict.fromkeys([model_dir, base_dir]):
        check_weights(folder)
    check_routing_config(base_dir, config)
    return ModelSource(ref, model_dir, base_dir, config)


def check_minimums(args, **minimums: int):
    """Refuse integer options below their minimum (``None``, an option not given, passes)."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')}={value}: must be >= {low}")


def check_data_file(path: str):
    if os.path.isdir(path):
        raise UserError(f"data file {path!r} is a directory; --data takes a JSONL file")
    if not os.path.isfile(path):
        raise UserError(f"data file {path!r} does not exist")


def max_length(requested: int | None, source: ModelSource) -> int:
    """Token limit of eval records: ``--max-length`` within the model's positions, by default
    ``min(512, max_position_embeddings)``."""
    positions = source.config.get("max_position_embeddings")
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    if positions is not None and requested > positions:
        raise UserError(f"--max-length={requested}: the model has max_position_embeddings={positions}; "
                        f"valid: 1..{positions}")
    return requested


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f"--device {device!r}: not a torch device; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise UserError(f"--device {device!r}: this machine has {count} CUDA device(s)"
                            + (f"; valid: cuda:0..cuda:{count - 1}" if count else "; use --device cpu"))
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"--device {device!r}: dlo commands run on cpu, cuda or mps")
    if dtype is None:
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, DTYPES[dtype]


def load_tokenizer(source: ModelSource, required: bool = True):
    """The tokenizer saved with the model (the adapter's, else its base's); ``None`` when there is none and
    it is not ``required``."""
    from transformers import AutoTokenizer

    for folder in dict.fromkeys([source.dir, source.base_dir]):
        if any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
            try:
                return AutoTokenizer.from_pretrained(folder)
            except Exception as err:  # the tokenizers library raises plain Exceptions on broken files
                raise UserError(f"{folder}: the tokenizer files do not load ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if required:
        raise UserError(f"{source.ref}: no tokenizer saved with the model (needed to read the data/prompt)")
    return None


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype):
    """A dlo routed model, a plain *ForCausalLM, or a peft adapter on either, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    import dlo

    try:
        if source.needs_dlo:
            model = dlo.load_model(source.base_dir, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.base_dir, dtype=dtype)
        if source.is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.dir)
    except (OSError, RuntimeError) as err:  # the files passed the cheap checks but disagree with each other
        raise UserError(f"{source.ref}: the checkpoint does not load ({str(err).splitlines()[0]}); "
                        "--debug shows the traceback") from err
    return model.to(device).eval()
