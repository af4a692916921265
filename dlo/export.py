"""Static export (DESIGN.md §5): drop rarely-run routed layers, keep the rest as plain dense layers.

``export_static`` returns a fresh stock ``*ForCausalLM`` (e.g. ``LlamaForCausalLM``) that vanilla
transformers loads without custom code. What it does, in order:

1. merges LoRA adapters if ``model`` is a peft model (in place, as ``merge_and_unload`` does);
2. decides which layers to keep: with ``min_capacity=X`` every routed layer whose capacity is
   below X is dropped (unrouted layers always stay); with ``num_layers=N`` the N layers with the
   highest usage stay, where an unrouted layer's usage is 1.0 and a routed layer's is its
   capacity (so unrouted layers go last). Capacities are the realised ones measured on data
   when ``capacities`` is given, else the routers' targets. Ties are broken by the measured
   similarity cos(h_in, h_out) (lower = the layer changes its tokens more = kept) when
   ``similarity`` is given, else by position (earlier kept). Dropping an unrouted layer needs
   ``similarity``: without routers there is nothing else to rank layers by;
3. copies the kept layers' weights into freshly built stock layers, renumbered 0..N-1, without
   the router tensors. Kept routed layers run every token **ungated** (g = 1): the gate
   1 + β(s − ½) depends on the token and has no dense equivalent; ``export.json`` and the
   before/after loss state what that costs;
4. materialises shared repetitions (dlo/sharing.py) as plain layers with their residual scales
   folded exactly into o_proj/down_proj, as mergekit would write them; with ``keep_shared`` a kept
   repetition of a kept layer stays shared (a ``Dlo<Base>`` checkpoint, loaded by ``dlo.load_model``).
   ``dlo_export.memory`` states parameters and bytes before and after (each tensor once).

With ``mlp`` granularity a routed layer's attention always ran; a stock layer cannot exist
without its MLP, so dropping it removes its attention too (again measured by the loss).

``save_export`` writes the checkpoint (safetensors), tokenizer and ``export.json`` through
``dlo.checkpoints.atomic_output_dir``: a failure or an interruption leaves no output (a SIGKILL can
leave the hidden ``.NAME.tmp-*`` directory).
"""

from __future__ import annotations

import copy
import json
import os
import re

import torch

from dlo.checkpoints import atomic_output_dir
from dlo.config import CAPACITY
from dlo.errors import UserError
from dlo.modeling import STATE_MODULE, decoder_layers, routed_layers, share_repetitions, stock_model_class
from dlo.routing import ROUTING_BUFFERS
from dlo.sharing import CONFIG_KEY, fold_scales, memory, reuses_of, shared_keys, unshare
from dlo.validation import Boolean, ListOf, Number, Optional, check_instance, check_model

# Tensors a routed layer adds to the stock layer's own.
ROUTER_TENSORS = ("router.weight", "router.bias", *ROUTING_BUFFERS)


def merge_lora(model):
    """The model with LoRA adapters merged in (peft models), else ``model`` itself."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def layer_usage(model, capacities: dict[int, float] | None = None) -> dict[int, float]:
    """Usage of every routed layer, keyed by layer index: ``capacities`` where given, else the target."""
    usage = {layer.layer_index: float(layer.target_capacity) for layer in routed_layers(model)}
    for i, c in (capacities or {}).items():
        if int(i) not in usage:
            raise ValueError(f"capacities names layer {i}, which is not routed (routed: {sorted(usage)})")
        usage[int(i)] = float(c)
    return usage


def select_layers(num_total: int, usage: dict[int, float], min_capacity: float | None = None,
                  num_layers: int | None = None, similarity: list[float] | None = None) -> list[int]:
    """Indices of the layers to keep (ascending). ``usage`` holds the routed layers' capacities."""
    if (min_capacity is None) == (num_layers is None):
        raise ValueError("give exactly one of min_capacity and num_layers")
    if similarity is not None and len(similarity) != num_total:
        raise ValueError(f"similarity has {len(similarity)} values for {num_total} layers")
    if min_capacity is not None:
        if not usage:
            raise ValueError("the model has no routers, so min_capacity has no capacity to compare with; "
                             "use num_layers=N (with similarity measured on data) instead")
        if not (0.0 < min_capacity <= 1.0):
            raise ValueError(f"min_capacity={min_capacity}: must be in (0, 1]")
        kept = [i for i in range(num_total) if usage.get(i, 1.0) >= min_capacity]
        if not kept:
            caps = ", ".join(f"{i}: {usage[i]:.3f}" for i in sorted(usage))
            raise ValueError(f"min_capacity={min_capacity} would drop every layer (all {num_total} layers are routed, "
                             f"capacities {{{caps}}}); an export needs at least one layer")
        return kept
    if not (1 <= num_layers <= num_total):
        raise ValueError(f"num_layers={num_layers}: must be in [1, {num_total}]")
    unrouted = num_total - len(usage)
    if num_layers < unrouted and similarity is None:
        raise ValueError(f"num_layers={num_layers} would drop unrouted layers ({unrouted} of the {num_total} layers "
                         "carry no router), which can only be ranked by measured similarity; pass similarity= "
                         "(CLI: --data FILE)")

    def rank(i):
        tie = similarity[i] if similarity is not None else 0.0
        return (-usage.get(i, 1.0), i in usage, tie, i)

    return sorted(sorted(range(num_total), key=rank)[:num_layers])


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def shared_repetitions(model) -> dict[int, int]:
    """{repetition: the layer it reuses} of a model with shared repetitions (dlo/sharing.py), else {}."""
    record = getattr(model.config, CONFIG_KEY, None)
    return reuses_of(record) if record else {}


def export_static(model, min_capacity: float | None = None, num_layers: int | None = None,
                  capacities: dict[int, float] | None = None, similarity: list[float] | None = None,
                  keep_shared: bool = False):
    """A plain stock model with the chosen layers (see the module docstring). ``model`` keeps its weights, except
    that a peft model's shared repetitions are first given their own weights (scales folded) so that each merges
    its own adapters.

    The arguments are checked before anything is merged or copied: ``TypeError`` for a model that is not one, a
    ``min_capacity``/``num_layers`` that is not a number, ``capacities`` that is not a mapping {layer index:
    capacity in [0, 1]}, ``similarity`` that is not a list of numbers, ``keep_shared`` that is not a bool;
    ``ValueError`` for values out of range.

    Shared repetitions are materialised as plain layers, scales folded into their o_proj/down_proj (a stock model,
    as mergekit writes it); with ``keep_shared`` a kept repetition whose source layer is kept stays a repetition
    (a ``Dlo<Base>`` model that stores it once), the others are materialised.
    """
    check_model(model)
    min_capacity = Optional(CAPACITY)("min_capacity", min_capacity)
    num_layers = Optional(Number(low=1, integer=True))("num_layers", num_layers)
    if capacities is not None:
        check_instance("capacities", capacities, dict, "a mapping {layer index: realised capacity in [0, 1]}")
        for i, c in capacities.items():
            Number(low=0, integer=True)("capacities key", i)
            Number(low=0, high=1)(f"capacities[{i}]", c)
    if similarity is not None:
        ListOf(Number())("similarity", similarity)
    Boolean()("keep_shared", keep_shared)
    source_memory = memory(model)
    repetitions = shared_repetitions(model)
    if repetitions and hasattr(model, "merge_and_unload"):
        if keep_shared:
            raise UserError("keep_shared with LoRA adapters: merging a repetition's own adapters gives it weights of "
                            "its own; export with materialised repetitions (keep_shared=False)")
        unshare(decoder_layers(model))
    model = merge_lora(model)
    layers = decoder_layers(model)
    granularity = model.dlo_routing_config.granularity if routed_layers(model) else None
    usage = layer_usage(model, capacities)
    kept = select_layers(len(layers), usage, min_capacity, num_layers, similarity)
    dropped = [i for i in range(len(layers)) if i not in kept]
    new_index = {old: new for new, old in enumerate(kept)}
    still_shared = {j: k for j, k in repetitions.items() if keep_shared and j in new_index and k in new_index}

    stock = stock_model_class(model)
    # The stock config class (a model loaded through its checkpoint's own code has a dlo model type).
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("dlo_routing", CONFIG_KEY, "auto_map", "model_type")}
    config = stock.config_class.from_dict(fields)
    config._attn_implementation = model.config._attn_implementation
    config.architectures = [stock.__name__]
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    previous = getattr(config, "dlo_export", None)  # exporting an export: keep the chain
    config.dlo_export = {
        **({"previous": previous} if previous else {}),
        "source_num_layers": len(layers),
        "kept": kept,
        "dropped": dropped,
        "criterion": {"min_capacity": min_capacity} if min_capacity is not None else {"num_layers": num_layers},
        "usage": {str(i): u for i, u in sorted(usage.items())},
        "usage_source": "measured" if capacities else "target",
        "granularity": granularity,
        "kept_routed_layers_run_ungated": granularity is not None,
    }
    if repetitions:
        config.dlo_export["repetitions"] = {
            "shared": {str(new_index[j]): new_index[k] for j, k in sorted(still_shared.items())},
            "materialised": [new_index[j] for j in sorted(repetitions) if j in new_index and j not in still_shared],
        }

    prefix = _layers_prefix(model)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")

    def rename(key: str) -> str | None:
        """Key in the exported model, or None when the tensor does not go there."""
        if key.split(".")[0] == STATE_MODULE:  # the routing step: training state of the routed model only
            return None
        match = pattern.match(key)
        if match is None:
            return key
        old, rest = int(match.group(1)), match.group(2)
        if old not in new_index or rest in ROUTER_TENSORS:
            return None
        return f"{prefix}.{new_index[old]}.{rest}"

    # What stays shared is tied after loading; every other repetition gets its own tensors, scales folded in.
    left_out = set(shared_keys(model, prefix, still_shared))
    source_state = fold_scales(model.state_dict(), keep=tuple(f"{prefix}.{j}." for j in still_shared))
    state = {}
    for key, tensor in source_state.items():
        target = rename(key)
        if target is not None and key not in left_out:
            state[target] = tensor.detach().clone()
    with torch.device("meta"):  # no throw-away random init of a possibly large model
        exported = stock(config)
    if still_shared:
        share_repetitions(exported, {new_index[j]: new_index[k] for j, k in still_shared.items()},
                          dict.fromkeys((new_index[j] for j in still_shared), 0.0))
    missing, unexpected = exported.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != {rename(key) for key in left_out}:
        raise RuntimeError(f"export state does not fit the exported model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    # Non-persistent buffers (rotary inv_freq, ...) are not in the state dict: take the source's.
    source_buffers = dict(model.named_buffers())
    source_of = {rename(k): k for k in source_buffers}
    for name, buffer in list(exported.named_buffers()):
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            exported.get_submodule(module_name)._buffers[attr] = source_buffers[source_of[name]].clone()
    exported.tie_weights(recompute_mapping=not still_shared)  # the recorded mapping holds the repetitions' ties
    still_meta = [n for n, p in [*exported.named_parameters(), *exported.named_buffers()] if p.is_meta]
    if still_meta:
        raise RuntimeError(f"export left tensors without data: {still_meta[:5]}")
    exported.generation_config = copy.deepcopy(model.generation_config)
    config.dlo_export["memory"] = {"source": source_memory, "export": memory(exported)}
    return exported.eval()


def save_export(model, output: str, tokenizer=None, record: dict | None = None, force: bool = False) -> str:
    """Write ``model`` (+ tokenizer, + ``export.json`` from ``record``) to ``output`` atomically."""
    with atomic_output_dir(output, force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if record is not None:
            with open(os.path.join(tmp, "export.json"), "w") as fh:
                json.dump(record, fh, indent=2)
    return os.path.abspath(output)
