"""A routed checkpoint's own modeling code (docs/DESIGN.md §11).

A routed checkpoint carries the code that runs it, as Hub custom-code models do: loading it with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` needs transformers and torch only
(the routed layers then gather and combine rows with the torch twins of the kernels); with dlo installed
the checkpoint's entry module uses dlo's own classes, Triton kernels included.

The files are dlo's own modules, copied with their ``dlo.`` imports made relative (``dlo/routing.py``
becomes ``dlo_routing.py`` next to the weights). ``config.json`` names a model type of its own
(``dlo_<base type>``) and maps AutoConfig / AutoModelForCausalLM to these files, so a load without
``trust_remote_code`` stops with transformers' request for it instead of silently building the stock model
without its routers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# The modules a routed model needs at run time (the closure of dlo/modeling.py's imports, this one included:
# a model loaded through its checkpoint's code saves the same way).
MODULES = ("modeling", "routing", "attention", "exploration", "cache", "state", "losses", "config", "validation",
           "distributed", "errors", "families", "schedules", "ops", "checkpoints", "remote_code", "sharing",
           "static_cache", "gguf")
TWINS_FILE = "dlo_kernels_reference.py"  # the kernels' torch twins (triton_kernels/reference.py) in a checkpoint
ENTRY = "modeling_dlo"
CONFIGURATION = "configuration_dlo"
# Only `from dlo.X import ...` is rewritten: it becomes `from .dlo_X import ...`, the one form of relative import
# transformers follows when it copies a checkpoint's code (`from . import X` it would not copy).
_IMPORT_FROM = re.compile(r"^(\s*)from dlo\.(\w+) import ", re.M)


def model_type(base_type: str) -> str:
    """The model type a routed checkpoint's config.json names (its own: plain transformers does not know it)."""
    return f"dlo_{base_type}"


def register_config_types(base_types):
    """Teach AutoConfig the routed model types of ``base_types`` in this process, so that AutoConfig and
    AutoTokenizer read a routed checkpoint without asking to run its code. AutoModelForCausalLM still asks
    (the routed model class is the checkpoint's code, or ``dlo.load_model``)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for base_type in base_types:
        base = CONFIG_MAPPING[base_type]
        routed = type(f"{base.__name__}Dlo", (base,), {"model_type": model_type(base_type),
                                                       "__module__": __name__})
        AutoConfig.register(routed.model_type, routed, exist_ok=True)


def _relative(source: str) -> str:
    if re.search(r"^\s*(from dlo import|import dlo\b)", source, re.M):
        raise ValueError("a module a checkpoint carries must import dlo's modules as `from dlo.X import ...`")
    return _IMPORT_FROM.sub(r"\1from .dlo_\2 import ", source)


def _twins_source() -> str:
    here = Path(__file__).resolve().parent
    if (here / TWINS_FILE).is_file():  # this module is itself a checkpoint's copy
        return (here / TWINS_FILE).read_text()
    try:
        import dlo_kernels
    except ImportError as err:
        raise FileNotFoundError("the torch twins of dlo's kernels (dlo_kernels.reference) are not installed") from err
    return (Path(dlo_kernels.__file__).parent / "reference.py").read_text()


def _module_source(name: str) -> str:
    """dlo/<name>.py, or its copy dlo_<name>.py when this module runs from a checkpoint."""
    here = Path(__file__).resolve().parent
    path = here / f"{name}.py"
    return _relative((path if path.is_file() else here / f"dlo_{name}.py").read_text())


def write_remote_code(directory: str, model_class: str, base_class: str, config_class: str, base_type: str):
    """Write the modeling files into ``directory`` and point its config.json at them."""
    for name in MODULES:
        (Path(directory) / f"dlo_{name}.py").write_text(_module_source(name))
    (Path(directory) / TWINS_FILE).write_text(_twins_source())
    own_type = model_type(base_type)
    (Path(directory) / f"{ENTRY}.py").write_text(
        f'"""Runs this dlo routed checkpoint: AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)."""\n\n'
        f"from transformers import {base_class}\n\n"
        "try:  # dlo installed: its own classes, with the Triton kernels on CUDA\n"
        "    from dlo.modeling import routed_model_class\n"
        "except ImportError:  # transformers and torch only: the copy saved with the weights\n"
        "    from .dlo_modeling import routed_model_class\n\n"
        f"from .{CONFIGURATION} import {config_class}Dlo\n\n\n"
        f"class {model_class}(routed_model_class({base_class})):\n"
        f"    config_class = {config_class}Dlo\n"
    )
    (Path(directory) / f"{CONFIGURATION}.py").write_text(
        '"""The configuration class of this dlo routed checkpoint (the base config under a model type of its own)."""'
        f"\n\nfrom transformers import {config_class}\n\n\n"
        f"class {config_class}Dlo({config_class}):\n"
        f'    model_type = "{own_type}"\n'
    )
    config_file = os.path.join(directory, "config.json")
    with open(config_file) as fh:
        config = json.load(fh)
    config["model_type"] = own_type
    config["auto_map"] = {"AutoConfig": f"{CONFIGURATION}.{config_class}Dlo",
                          "AutoModelForCausalLM": f"{ENTRY}.{model_class}"}
    with open(config_file, "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
