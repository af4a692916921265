"""Routed models: attach routers to a *ForCausalLM, run them, save, and load back.

``attach_routers`` swaps the model's class for ``Dlo<Base>`` (a subclass of the stock class, so the
model stays e.g. a ``LlamaForCausalLM``); so does a shared-weight expansion (dlo/sharing.py), whose
repetitions ``Dlo<Base>`` stores once and ties back on load, with or without routers. Its forward
follows the convention of transformers' routed (MoE) models: the padding mask and this forward's
routing inputs reach each routed layer as an input, the layers' decisions come back in the output,
and in training with ``labels`` the output's ``loss`` already holds
``task_loss + router_loss_weight * router_loss`` (both also returned apart). Any training loop
therefore trains a routed model correctly.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from dlo.attention import check_block_attention, packed_examples
from dlo.cache import RoutedCache
from dlo.checkpoints import check_routing_config, check_weights, read_config, resolve_model_dir
from dlo.config import CAPACITIES, LOW_CAPACITY, RoutingConfig, warn_low_capacity
from dlo.distributed import all_reduce_sum, world_size
from dlo.errors import UserError
from dlo.families import MODEL_TYPES, check_causal_lm
from dlo.losses import router_loss
from dlo.remote_code import register_config_types, write_remote_code
from dlo.routing import (
    CACHE_KWARGS,
    FORCE_MODES,
    RoutedDecoderLayer,
    RouterRecord,
    RoutingInputs,
    routed_layer_class,
)
from dlo.sharing import CONFIG_KEY, config_record, plain_projections, reuses_of, share_layers, shared_keys, unshare
from dlo.state import RoutingState
from dlo.static_cache import route_static_cache
from dlo.validation import ListOf, Number, check_instance, check_model

register_config_types(MODEL_TYPES)
STATE_MODULE = "dlo_routing_state"


@dataclass
class RoutedCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the routing terms (set in training, or with ``output_router_logits``).

    loss: task_loss + router_loss_weight * (router loss normalised like the task loss under gradient
    accumulation and across ranks). task_loss: the stock model's loss. router_loss: this forward's
    router BCE, mean over routed layers and valid tokens (what is logged). router_logits: (B, T) per
    routed layer. routing: what each routed layer decided (``dlo.routing.RouterRecord``), in layer order.
    """

    task_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    routing: tuple[RouterRecord, ...] | None = None


class DloRoutedMixin:
    """Behaviour added to a stock *ForCausalLM class once routers are attached or layers are shared."""

    _dlo_base_class: type

    @property
    def dlo_routing_config(self) -> RoutingConfig:
        """The routing configuration (owned by the model's RoutingState)."""
        return getattr(self, STATE_MODULE).config

    @dlo_routing_config.setter
    def dlo_routing_config(self, config: RoutingConfig):
        getattr(self, STATE_MODULE).config = config

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        info = getattr(config, "dlo_routing", None)
        repetitions = getattr(config, CONFIG_KEY, None)
        if info is None and repetitions is None:
            raise ValueError(f"config has no 'dlo_routing' or '{CONFIG_KEY}' entry: this checkpoint carries no "
                             "routers and no shared layers")
        if repetitions is not None:  # the scales' values come with the weights
            reuses = reuses_of(repetitions)
            share_layers(decoder_layers(self), reuses, dict.fromkeys(reuses, 0.0))
        if info is not None:
            _install_routers(self, RoutingConfig.from_dict(info["config"]), info["routed_layers"], info["capacities"])
        if repetitions is not None:
            _register_shared_keys(self)

    def forward(self, input_ids=None, attention_mask=None, *args, labels=None, output_router_logits=None,
                num_items_in_batch=None, **kwargs):
        # `labels` is named in the signature: HF Trainer looks for it there to compute eval loss.
        if not hasattr(self, STATE_MODULE):  # shared layers, no routers: the stock forward
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return super().forward(input_ids, attention_mask, *args, labels=labels, **kwargs)
        if not self.training:
            kwargs = _with_routed_cache(self, kwargs)
        routing = _routing_inputs(self, getattr(self, STATE_MODULE), input_ids, attention_mask, kwargs,
                                  bool(output_router_logits))
        if labels is not None or kwargs.get("shift_labels") is not None:
            routing.label_tokens = _label_tokens(labels, kwargs.get("shift_labels"))
        routing.num_items_in_batch = num_items_in_batch
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        out = super().forward(input_ids, attention_mask, *args, labels=labels, dlo_routing=routing, **kwargs)
        if not routing.collect:
            return out
        records = _records(routing, getattr(self, STATE_MODULE))
        result = RoutedCausalLMOutput(**out, task_loss=out.loss, router_logits=tuple(r.logits for r in records),
                                      routing=records)
        rl = routing.router_loss
        if rl is not None:
            result.router_loss = rl.loss
            label_tokens = routing.label_tokens if routing.label_tokens is not None else rl.loss.new_zeros(())
            task_mean = None
            if out.loss is not None:
                # The router term already trains through the decoder's output (see _AttachRouterLoss); the loss
                # shows its value so what is logged is task + weight * router.
                result.loss = out.loss + rl.weighted_term.detach()
                scale = num_items_in_batch / label_tokens.clamp(min=1) if num_items_in_batch is not None else 1.0
                task_mean = out.loss.detach() * scale
            getattr(self, STATE_MODULE).observe(list(records), rl.labels, rl.loss, task_mean, label_tokens)
        return result

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The stock checkpoint plus routing config and state, and the code that runs it (dlo/remote_code.py).
        A shared repetition's tensors are its source's: they are left out, the config says which layer it reuses."""
        if hasattr(self, STATE_MODULE):
            _sync_config(self)
        base = stock_model_class(self)
        if getattr(self.config, CONFIG_KEY, None) is not None:
            state = kwargs.get("state_dict")
            state = self.state_dict() if state is None else dict(state)
            for key in _shared_keys(self):
                state.pop(key, None)
            kwargs["state_dict"] = state
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            # Named from the stock class, not type(self): a sharding wrapper (FSDP2's FSDPDlo...) subclasses it.
            write_remote_code(save_directory, routed_model_class(base).__name__, base.__name__,
                              base.config_class.__name__, base.config_class.model_type)


class DloBackboneMixin:
    """Behaviour added to the decoder (e.g. ``LlamaModel``) of a routed model.

    The routing of one forward is decided here, where every caller passes: the causal LM head, and code that
    runs the decoder on its own (TRL's fused LM head computes its loss from the decoder's hidden states).
    In training the router loss is computed from the layers' records and attached to the decoder's output,
    so it trains with whatever loss is computed from that output.
    """

    _dlo_state: RoutingState  # the routed model's RoutingState (a reference, not a submodule)

    def forward(self, input_ids=None, attention_mask=None, *args, dlo_routing: RoutingInputs | None = None,
                **kwargs):
        state = self._dlo_state
        routing = dlo_routing
        if routing is None:  # called directly, not through the routed causal LM
            if not self.training:
                kwargs = _with_routed_cache(self, kwargs)
            routing = _routing_inputs(self, state, input_ids, attention_mask, kwargs, False)
        out = super().forward(input_ids, attention_mask, *args, dlo_routing=routing, **kwargs)
        records = _records(routing, state)
        if routing.training and records and len(records) == len(state.layers):
            rl = router_loss(list(records), state.config)
            term = _normalised_router_term(rl, records, routing.label_tokens, routing.num_items_in_batch)
            rl.weighted_term = state.config.router_loss_weight * term
            out.last_hidden_state = _AttachRouterLoss.apply(out.last_hidden_state, rl.weighted_term)
            routing.router_loss = rl
            if dlo_routing is None:
                state.observe(list(records), rl.labels, rl.loss, None, rl.loss.new_zeros(()))
        return out


class _AttachRouterLoss(torch.autograd.Function):
    """Identity on the decoder's hidden states whose backward also sends gradient 1 to the weighted router loss.

    The router loss then trains exactly once with any loss computed from the hidden states (the stock LM head,
    a custom head, a fused one), without that loss having to know about it.
    """

    @staticmethod
    def forward(ctx, hidden, weighted_router_loss):
        ctx.loss_dtype, ctx.loss_device = weighted_router_loss.dtype, weighted_router_loss.device
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        return grad_hidden, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


def _routing_inputs(model, state, input_ids, attention_mask, kwargs, collect) -> RoutingInputs:
    if model.training:
        _check_checkpointing(model)
    embeds = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    routing = state.inputs(model.training, embeds.shape[1], attention_mask, collect, embeds.device)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        routing.example_ids = packed_examples(position_ids.expand(embeds.shape[0], -1), attention_mask)
    return routing


def _records(routing: RoutingInputs, state: RoutingState) -> tuple[RouterRecord, ...]:
    return tuple(routing.records[layer.layer_index] for layer in state.layers if layer.layer_index in routing.records)


def _label_tokens(labels, shift_labels) -> torch.Tensor:
    """Tokens that carry a task label in this forward, counted as causal LM losses count them (shifted)."""
    if shift_labels is not None:
        return (shift_labels != -100).sum()
    return (labels[..., 1:] != -100).sum()


def _normalised_router_term(rl, records, label_tokens, num_items_in_batch) -> torch.Tensor:
    """The router loss as it trains, normalised the way the task loss is.

    Without ``num_items_in_batch`` the task loss is this batch's mean: so is the router term (DDP then
    averages the ranks' gradients). With it (HF Trainer: label tokens of the whole optimizer step, summed over
    ranks; the Trainer multiplies the task loss by the number of ranks before DDP averages) the term is this
    micro-batch's token-sum over the tokens of every rank, weighted by the micro-batch's share of label tokens
    and scaled like the task loss, so the terms of one step add up to the mean one process with the whole batch
    computes.
    """
    if num_items_in_batch is None or label_tokens is None:
        return rl.loss
    counts = torch.stack([records[0].valid.sum(), label_tokens]).to(rl.loss.device, torch.float64)
    valid_all, labels_all = _all_reduce_counts(counts)
    share = labels_all / torch.as_tensor(num_items_in_batch, device=rl.loss.device).float()
    return rl.token_loss_sum / valid_all.clamp(min=1) * share * world_size()


@torch.compiler.disable
def _all_reduce_counts(counts: torch.Tensor):
    total = all_reduce_sum(counts)
    return total[0].float(), total[1].float()


def _check_checkpointing(model):
    for layer in routed_layers(model):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if layer.gradient_checkpointing and getattr(func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "gradient checkpointing with use_reentrant=True runs layers under no_grad, so the router loss "
                "would get no gradient; enable it with gradient_checkpointing_kwargs={'use_reentrant': False} "
                "(transformers' default)"
            )


def _with_routed_cache(model, kwargs: dict) -> dict:
    """Inference kwargs whose KV cache suits block routing: a RoutedCache where the model would build a stock
    cache, an empty stock DynamicCache (generate's, or the caller's) made routed in place, and a StaticCache's
    block-routed layers made RoutedStaticLayers in place."""
    block = [layer.layer_index for layer in routed_layers(model) if layer.granularity == "block"]
    if not block:
        return kwargs
    name = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    cache = kwargs.get(name) if name else None
    if isinstance(cache, RoutedCache):
        return kwargs
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if model.config.use_cache if use_cache is None else use_cache:
            kwargs = {**kwargs, "cache": RoutedCache(model.config.get_text_config(decoder=True), block)}
        return kwargs
    if type(cache) is DynamicCache and cache.get_seq_length() == 0:
        RoutedCache.adopt(cache, block)
        return kwargs
    if type(cache) is StaticCache:  # generate(cache_implementation="static"), or the caller's
        implementation = model.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"a static cache under block routing runs with attn_implementation 'sdpa' or 'eager', "
                             f"got {implementation!r}; use the dynamic cache (generate's default) with it")
        route_static_cache(cache, block)
        return kwargs
    kind = type(cache).__name__ if isinstance(cache, Cache) else repr(cache)
    state = "holding tokens" if type(cache) is DynamicCache else "of this kind"
    raise ValueError(
        f"a {kind} {state} cannot hold the keys/values of block-routed layers {block} (each keeps only the "
        "tokens it ran); use the dynamic cache (generate's default, or none: dlo makes it a dlo.RoutedCache) or "
        "the static one (cache_implementation='static')"
    )


_ROUTED_MODEL_CLASSES: dict[type, type] = {}


def routed_model_class(base: type) -> type:
    """``Dlo<Base>``: the routed twin of a stock *ForCausalLM class."""
    if issubclass(base, DloRoutedMixin):
        return base
    if base not in _ROUTED_MODEL_CLASSES:
        no_split = list(getattr(base, "_no_split_modules", None) or [])
        no_split += [f"Routed{name}" for name in no_split]
        _ROUTED_MODEL_CLASSES[base] = type(
            f"Dlo{base.__name__}", (DloRoutedMixin, base),
            {"__module__": __name__, "_no_split_modules": no_split, "_dlo_base_class": base},
        )
    return _ROUTED_MODEL_CLASSES[base]


_ROUTED_BACKBONE_CLASSES: dict[type, type] = {}


def routed_backbone_class(base: type) -> type:
    """``DloBackbone<Base>``: the decoder class (e.g. ``LlamaModel``) of a routed model."""
    if issubclass(base, DloBackboneMixin):
        return base
    if base not in _ROUTED_BACKBONE_CLASSES:
        _ROUTED_BACKBONE_CLASSES[base] = type(f"DloBackbone{base.__name__}", (DloBackboneMixin, base),
                                              {"__module__": __name__})
    return _ROUTED_BACKBONE_CLASSES[base]


def stock_model_class(model) -> type:
    """The stock transformers class of ``model``: the one its routed class was made from (wrappers such as
    FSDP's, which subclass the routed class, are looked through)."""
    if isinstance(model, DloRoutedMixin):
        return type(model)._dlo_base_class
    return type(model)


def decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None) if decoder is not None else getattr(model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layer stack (model.get_decoder().layers)")
    return layers


def routed_layers(model) -> list[RoutedDecoderLayer]:
    return [layer for layer in decoder_layers(model) if isinstance(layer, RoutedDecoderLayer)]


def routing_state(model) -> RoutingState:
    """The RoutingState of a routed model (also under peft / DDP / accelerate wrappers)."""
    for module in model.modules():
        if isinstance(module, RoutingState):
            return module
    raise ValueError(f"{type(model).__name__} has no routers; call dlo.attach_routers first")


def new_layer_indices(config) -> list[int]:
    """Layers recorded as duplicates by dlo's expansion (config.dlo_expansion)."""
    expansion = getattr(config, "dlo_expansion", None) or {}
    return [i for i, entry in enumerate(expansion.get("layers", [])) if entry.get("new")]


def _shared_keys(model) -> dict[str, str]:
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return shared_keys(model, prefix, reuses_of(getattr(model.config, CONFIG_KEY)))


def _register_shared_keys(model):
    """Declare the repetitions' tensors tied to their sources: transformers then neither initialises nor moves
    them when a checkpoint leaves them out, and ties them back to the loaded source tensors."""
    model.all_tied_weights_keys.update(_shared_keys(model))


def share_repetitions(model, reuses: dict[int, int], scales: dict[int, float]):
    """Make ``layers[j]`` a repetition of ``layers[reuses[j]]`` (dlo/sharing.py) in place; the model becomes
    ``Dlo<Base>``, which stores the shared tensors once and ties them back on load."""
    share_layers(decoder_layers(model), reuses, scales)
    base = stock_model_class(model)
    setattr(model.config, CONFIG_KEY, config_record(reuses, base.__name__))
    model.__class__ = routed_model_class(base)
    _register_shared_keys(model)
    return model


def materialise_repetitions(model):
    """Make every shared repetition a plain layer with its own tensors, scales folded in, in place: the model then
    is what a copied expansion is (routers, if any, stay). What merging per-repetition LoRA adapters leaves, once
    ``dlo.sharing.unshare`` gave each repetition its own weights before the merge."""
    if getattr(model.config, CONFIG_KEY, None) is None:
        return model
    for key in _shared_keys(model):
        model.all_tied_weights_keys.pop(key, None)
    layers = decoder_layers(model)
    unshare(layers)
    plain_projections(layers)
    delattr(model.config, CONFIG_KEY)
    if not hasattr(model, STATE_MODULE):
        model.__class__ = stock_model_class(model)
    return model


def attach_routers(model, config: RoutingConfig | None = None):
    """Wrap the chosen decoder layers of ``model`` in per-token routers (in place; returns the model).

    Raises ``TypeError`` unless ``model`` is a transformers model and ``config`` a ``RoutingConfig`` (or None:
    the defaults), ``ValueError`` when its layers or capacities do not fit the model.
    """
    check_model(model)
    if config is not None:
        check_instance("config", config, RoutingConfig, "a dlo.RoutingConfig (e.g. dlo.RoutingConfig(capacity=0.5); "
                                                        "a dict: dlo.RoutingConfig(**d)) or None")
    config = config or RoutingConfig()
    layers = decoder_layers(model)
    if routed_layers(model) or hasattr(model, STATE_MODULE):
        raise ValueError("model already has routers attached; attaching twice would nest them")
    check_causal_lm(model.config, type(model).__name__)  # verified families only (dlo/families.py)
    if config.granularity == "block":  # attention implementations block routing runs (dlo/attention.py)
        samples = config.label != "self" and config.similarity_source == "packed"
        check_block_attention(getattr(model.config, "_attn_implementation", None), samples_skipped=samples)
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
    routed = []
    for routed_index, (i, capacity) in enumerate(zip(indices, capacities)):
        stock = layers[i]
        cls = routed_layer_class(type(stock))
        layers[i] = cls(stock, layer_index=i, routed_index=routed_index, capacity=capacity,
                        granularity=config.granularity, beta=config.beta)
        routed.append(layers[i])
    state = RoutingState(config, routed)
    model.add_module(STATE_MODULE, state)
    backbone = model.get_decoder()
    backbone.__class__ = routed_backbone_class(type(backbone))
    backbone.__dict__["_dlo_state"] = state  # a reference: the state is the causal LM's submodule


def _sync_config(model):
    """Mirror routing config, per-layer capacities and thresholds into model.config (JSON-safe) for saving."""
    layers = routed_layers(model)
    model.config.dlo_routing = {
        "config": getattr(model, STATE_MODULE).config.to_dict(),
        "routed_layers": [layer.layer_index for layer in layers],
        "capacities": [layer.target_capacity for layer in layers],
        "thresholds": [float(layer.threshold()) for layer in layers],
        # The stock class, so readers know what to build without our code.
        "base_architecture": stock_model_class(model).__name__,
    }


def load_model(path: str, capacity: float | list[float] | None = None, revision: str | None = None,
               gguf_file: str | None = None, **kwargs):
    """Load a routed checkpoint saved by dlo: a local directory or a hub id (``revision``: branch, tag or
    commit), resolved as transformers resolves it, or a GGUF file (``path`` ending in ``.gguf``, or
    ``gguf_file`` inside ``path``) converted once by ``dlo.gguf``. ``capacity`` overrides the per-layer targets.

    Extra keyword arguments go to ``from_pretrained`` (e.g. ``dtype``, ``device_map``). Raises ``TypeError``
    unless ``path`` is a path or hub id and ``revision``/``gguf_file`` are text or None, ``ValueError`` for a
    capacity outside (0, 1], before anything is read; a ``UserError`` names a checkpoint that is not dlo's, or
    whose config.json lost the routing section its router weights need.
    """
    check_instance("path", path, (str, os.PathLike), "a model directory, a hub id (org/name) or a .gguf file")
    for name, value in (("revision", revision), ("gguf_file", gguf_file)):
        check_instance(name, value, (str, type(None)), "text (a branch, tag or commit; a file name) or None")
    if capacity is not None:
        CAPACITIES("capacity", capacity)
    model_dir = resolve_model_dir(path, revision, gguf_file)
    raw = read_config(model_dir)
    info = raw.get("dlo_routing") or raw.get(CONFIG_KEY)
    if info is None:
        check_routing_config(model_dir, raw)
        raise UserError(f"{path}: config has no 'dlo_routing' (no routers) and no '{CONFIG_KEY}' (no shared "
                        "layers); load it with AutoModelForCausalLM")
    check_weights(model_dir)
    base_name = info["base_architecture"]
    base = getattr(transformers, base_name, None)
    if base is None:
        raise UserError(f"{path}: unknown base architecture {base_name!r} (transformers {transformers.__version__})")
    # The stock config class, not the checkpoint's own model type (which exists so plain loads ask for remote code).
    config = base.config_class.from_dict({k: v for k, v in raw.items() if k not in ("model_type", "auto_map")})
    model, loading = routed_model_class(base).from_pretrained(model_dir, config=config, output_loading_info=True,
                                                              **kwargs)
    router_problems = [k for k in [*loading["missing_keys"], *loading["unexpected_keys"]]
                       if ".router." in k or k.endswith((".capacity", ".score_quantiles", ".residual_scale.weight"))]
    if router_problems:
        routed = (raw.get("dlo_routing") or {}).get("routed_layers", [])
        repeated = [entry["layer"] for entry in (raw.get(CONFIG_KEY) or {}).get("layers", [])]
        raise ValueError(
            f"{path}: routing config disagrees with the weights (routed layers {routed}, shared repetitions "
            f"{repeated}); mismatched router or residual-scale tensors: {router_problems[:6]}"
        )
    if capacity is not None:
        set_capacity(model, capacity)
    return model


def set_capacity(model, capacity: float | list[float]):
    """Set per-layer target capacities (one value or one per routed layer); thresholds follow.

    Raises ``TypeError`` for a capacity that is not a number (or a list of them), ``ValueError`` for a model
    without routers, a capacity outside (0, 1] or a list of the wrong length; warns (``DloWarning``) below
    ``dlo.config.LOW_CAPACITY``.
    """
    check_model(model)
    layers = routed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no routed layers, so no capacity to set; call "
                         "dlo.attach_routers first")
    checked = CAPACITIES("capacity", capacity)
    values = checked if isinstance(checked, list) else [checked] * len(layers)
    if len(values) != len(layers):
        raise ValueError(f"capacity has {len(values)} values for {len(layers)} routed layers; give one or one each")
    low = [layer.layer_index for layer, c in zip(layers, values) if c < LOW_CAPACITY]
    warn_low_capacity(values, f" for layer(s) {low}")
    with torch.no_grad():
        for layer, c in zip(layers, values):
            layer.capacity.fill_(float(c))


@contextmanager
def forced_routing(model, mode: str | None, layers: list[int] | None = None):
    """Temporarily force routed layers (all, or those with the given layer indices) to run every token
    exactly as the stock layer does (``'run'``: gate 1) or to skip every token (``'skip'``).

    Raises ``ValueError`` for another ``mode``, a model without routers or ``layers`` naming an unrouted layer,
    ``TypeError`` when ``layers`` is not a list of layer indices.
    """
    if mode not in (*FORCE_MODES, None):
        raise ValueError(f"mode={mode!r}: expected one of {FORCE_MODES} or None")
    check_instance("model", model, torch.nn.Module, "a routed model (or a peft / DDP wrapper of one)")
    state = routing_state(model)
    routed = [layer.layer_index for layer in state.layers]
    chosen = routed if layers is None else ListOf(Number(low=0, integer=True))("layers", layers)
    unknown = sorted(set(chosen) - set(routed))
    if unknown:
        raise ValueError(f"layers {unknown} are not routed (routed: {routed})")
    previous = dict(state.force)
    for i in chosen:
        if mode is None:
            state.force.pop(i, None)
        else:
            state.force[i] = mode
    try:
        yield model
    finally:
        state.force.clear()
        state.force.update(previous)
