"""Routed models: attach routers to a *ForCausalLM, save, and load back.

``attach_routers`` swaps the model's class for ``Dlo<Base>`` (a subclass of the stock class, so
the model stays e.g. a ``LlamaForCausalLM``), which knows how to rebuild its routers from the
config, records the padding mask for the routed layers, and saves a ``modeling_dlo.py`` shim so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it too.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
import transformers

from dlo.cache import RoutedCache
from dlo.config import RoutingConfig
from dlo.routing import CACHE_KWARGS, RoutedDecoderLayer, RoutingState, routed_layer_class

ATTENTION_FOR_BLOCK = ("sdpa", "eager")


class DloRoutedMixin:
    """Behaviour added to a stock *ForCausalLM class once routers are attached."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        info = getattr(config, "dlo_routing", None)
        if info is None:
            raise ValueError("config has no 'dlo_routing' entry: this checkpoint carries no routers")
        _install_routers(self, RoutingConfig.from_dict(info["config"]), info["routed_layers"],
                         info["capacities"])

    def forward(self, input_ids=None, attention_mask=None, *args, labels=None, **kwargs):
        # `labels` is named in the signature: HF Trainer looks for it there to compute eval loss.
        state: RoutingState = self._dlo_state
        state.token_mask = attention_mask
        if self.training:
            every = self.dlo_routing_config.similarity_every
            state.similarity_due = self.dlo_routing_config.label != "self" and state.forward_count % every == 0
            state.forward_count += 1
        else:
            state.similarity_due = False
            use_cache = kwargs.get("use_cache")
            no_cache = all(kwargs.get(k) is None for k in CACHE_KWARGS)
            if no_cache and (self.config.use_cache if use_cache is None else use_cache):
                kwargs["cache"] = self._dlo_new_cache()  # the stock DynamicCache would be wrong for block routing
        try:
            return super().forward(input_ids, attention_mask, *args, labels=labels, **kwargs)
        finally:
            state.token_mask = None

    def _dlo_new_cache(self):
        """A RoutedCache when some layer is block-routed, else None (the model makes its stock cache)."""
        block = [layer.layer_index for layer in routed_layers(self) if layer.granularity == "block"]
        return RoutedCache(self.config.get_text_config(decoder=True), block) if block else None

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() decodes block-routed models with a RoutedCache (mlp routing: the stock cache)."""
        if generation_config.use_cache is not False and model_kwargs.get("cache") is None:
            cache = self._dlo_new_cache()
            if cache is not None:
                if generation_config.cache_implementation not in (None, "dynamic"):
                    raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not "
                                     "supported with block routing: dlo.RoutedCache is dynamic")
                model_kwargs["cache"] = cache
                return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        _sync_config(self)
        base = stock_model_class(self)
        self.config.auto_map = {"AutoModelForCausalLM": f"modeling_dlo.{type(self).__name__}"}
        super().save_pretrained(save_directory, *args, **kwargs)
        shim = (
            '"""Loads a dlo routed model through AutoModelForCausalLM(trust_remote_code=True)."""\n\n'
            f"from transformers import {base.__name__}\n\n"
            "from dlo.modeling import routed_model_class\n\n"
            f"{type(self).__name__} = routed_model_class({base.__name__})\n"
        )
        with open(os.path.join(save_directory, "modeling_dlo.py"), "w") as fh:
            fh.write(shim)


_ROUTED_MODEL_CLASSES: dict[type, type] = {}


def routed_model_class(base: type) -> type:
    """``Dlo<Base>``: the routed twin of a stock *ForCausalLM class."""
    if issubclass(base, DloRoutedMixin):
        return base
    if base not in _ROUTED_MODEL_CLASSES:
        no_split = list(getattr(base, "_no_split_modules", None) or [])
        no_split += [f"Routed{name}" for name in no_split]
        _ROUTED_MODEL_CLASSES[base] = type(
            f"Dlo{base.__name__}", (DloRoutedMixin, base), {"__module__": __name__, "_no_split_modules": no_split}
        )
    return _ROUTED_MODEL_CLASSES[base]


def stock_model_class(model) -> type:
    """The stock transformers class under dlo's routed model class (the class itself for plain models)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, DloRoutedMixin))


def decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layer stack (model.get_decoder().layers)")
    return layers


def routed_layers(model) -> list[RoutedDecoderLayer]:
    return [layer for layer in decoder_layers(model) if isinstance(layer, RoutedDecoderLayer)]


def new_layer_indices(config) -> list[int]:
    """Layers recorded as duplicates by dlo's expansion (config.dlo_expansion)."""
    expansion = getattr(config, "dlo_expansion", None) or {}
    return [i for i, entry in enumerate(expansion.get("layers", [])) if entry.get("new")]


def attach_routers(model, config: RoutingConfig | None = None):
    """Wrap the chosen decoder layers of ``model`` in per-token routers (in place; returns the model)."""
    config = config or RoutingConfig()
    layers = decoder_layers(model)
    if routed_layers(model) or isinstance(model, DloRoutedMixin):
        raise ValueError("model already has routers attached; attaching twice would nest them")
    if config.granularity == "block":
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in ATTENTION_FOR_BLOCK:
            raise ValueError(
                f"granularity='block' needs attn_implementation in {ATTENTION_FOR_BLOCK}, got {impl!r} "
                "(packed sub-batches carry their own 4-D masks); use granularity='mlp' or load with "
                "attn_implementation='sdpa'"
            )
    indices = config.resolve_layers(len(layers), new_layer_indices(model.config))
    capacities = config.resolve_capacities(len(indices))
    _install_routers(model, config, indices, capacities)
    model.__class__ = routed_model_class(type(model))
    _sync_config(model)
    return model


def _install_routers(model, config: RoutingConfig, indices: list[int], capacities: list[float]):
    layers = decoder_layers(model)
    bad = [i for i in indices if not (0 <= i < len(layers))]
    if bad:
        raise ValueError(f"routed layer indices {bad} out of range [0, {len(layers) - 1}]")
    state = RoutingState()
    for routed_index, (i, capacity) in enumerate(zip(indices, capacities)):
        stock = layers[i]
        cls = routed_layer_class(type(stock))
        layers[i] = cls(stock, layer_index=i, routed_index=routed_index, capacity=capacity,
                        granularity=config.granularity, beta=config.beta, state=state)
    model._dlo_state = state
    model.dlo_routing_config = config


def _sync_config(model):
    """Mirror routing config, per-layer capacities and thresholds into model.config (JSON-safe)."""
    layers = routed_layers(model)
    model.config.dlo_routing = {
        "config": model.dlo_routing_config.to_dict(),
        "routed_layers": [layer.layer_index for layer in layers],
        "capacities": [float(layer.capacity) for layer in layers],
        "thresholds": [float(layer.threshold()) for layer in layers],
        # The stock class, so readers know what to build without our code.
        "base_architecture": stock_model_class(model).__name__,
    }


def load_model(path: str, capacity: float | list[float] | None = None, **kwargs):
    """Load a routed checkpoint saved by dlo. ``capacity`` overrides the per-layer targets.

    Extra keyword arguments go to ``from_pretrained`` (e.g. ``dtype``, ``device_map``).
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json (not a saved model directory)")
    with open(config_file) as fh:
        raw = json.load(fh)
    info = raw.get("dlo_routing")
    if info is None:
        raise ValueError(f"{path}: config has no 'dlo_routing' (no routers); load it with AutoModelForCausalLM")
    base_name = info["base_architecture"]
    base = getattr(transformers, base_name, None)
    if base is None:
        raise ValueError(f"{path}: unknown base architecture {base_name!r}")
    model, loading = routed_model_class(base).from_pretrained(path, output_loading_info=True, **kwargs)
    router_problems = [k for k in [*loading["missing_keys"], *loading["unexpected_keys"]]
                       if ".router." in k or k.endswith((".capacity", ".score_quantiles"))]
    if router_problems:
        raise ValueError(
            f"{path}: routing config disagrees with the weights (routed layers {info['routed_layers']}); "
            f"mismatched router tensors: {router_problems[:6]}"
        )
    for layer in routed_layers(model):
        layer.target_capacity = float(layer.capacity)
    if capacity is not None:
        set_capacity(model, capacity)
    return model


def set_capacity(model, capacity: float | list[float]):
    """Set per-layer target capacities (one value or one per routed layer); thresholds follow."""
    layers = routed_layers(model)
    values = capacity if isinstance(capacity, (list, tuple)) else [capacity] * len(layers)
    if len(values) != len(layers):
        raise ValueError(f"capacity has {len(values)} values for {len(layers)} routed layers")
    for layer, c in zip(layers, values):
        if not (0.0 < float(c) <= 1.0):
            raise ValueError(f"capacity={c}: must be in (0, 1]")
        layer.set_target_capacity(c)


@contextmanager
def forced_routing(model, mode: str | None):
    """Temporarily force every routed layer to run ('run') or skip ('skip') all tokens."""
    if mode not in ("run", "skip", None):
        raise ValueError(f"mode={mode!r}: expected 'run', 'skip' or None")
    state: RoutingState = model._dlo_state
    previous, state.force = state.force, mode
    try:
        yield model
    finally:
        state.force = previous
