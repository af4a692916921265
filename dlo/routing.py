"""Per-token routed decoder layers (docs/DESIGN.md §2-3).

A ``RoutedDecoderLayer`` wraps a stock HF decoder layer. It registers the stock layer's own
submodules under their own names, so checkpoint keys stay ``model.layers.{i}.self_attn...``; the only
new keys are the router's and two buffers (``capacity``, ``score_quantiles``).

Data flow of one forward: what the layer needs arrives as inputs (the stock layer's arguments, plus a
``RoutingInputs`` from the routed model: the padding mask, this forward's capacities and packed widths,
forced decisions), and what it decides goes back to the caller in ``RoutingInputs.records``. The layer
keeps no state between forwards, so a gradient-checkpointing recomputation takes exactly the decisions
of its original forward.

Training selects, per sequence, the top-k tokens by router score (k = ceil(c * n) of the row's n valid
tokens, inside a (B, K) index whose width K the model fixes per forward: no host sync, ties broken by
position). Inference selects causally: a token runs when its score reaches the layer's threshold.
Selected tokens are gathered into a packed (B, K, d) batch, the stock layer's own forward runs on it
with the tokens' original positions, and the result is combined back:
y = h + g * (F(h) - h), g = 1 + beta * (score - 1/2).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from dlo.attention import (
    CAUSAL,
    FLASH,
    FLASH_IMPLEMENTATIONS,
    REFERENCE,
    attention_path,
    check_block_attention,
    check_flash_window,
    flash_varlen,
    layer_window,
    packed_attention_mask,
    position_mask,
    running_first,
    step_attention_mask,
)
from dlo.cache import RoutedLayer
from dlo.exploration import (
    Exploration,
    KeyPrefix,
    KeyRecorder,
    input_log_norm,
    measured_similarity,
    own_key_only,
    sample_skipped,
    token_similarity,
)
from dlo.families import check_routable
from dlo.ops import active_positions, flat_row_index, gather_rows, scatter_combine
from dlo.static_cache import RoutedStaticLayer, static_step_mask

# Score quantile levels tracked per layer; inference thresholds interpolate between them.
NUM_QUANTILES = 101
# Names under which transformers passes the KV cache to a decoder layer (5.x renamed it).
CACHE_KWARGS = ("cache", "past_key_values")
FORCE_MODES = ("run", "skip")
# Buffers a routed layer adds to the stock layer's tensors (kept fp32 whatever the model's dtype).
ROUTING_BUFFERS = ("capacity", "score_quantiles")


@dataclass
class RouterRecord:
    """What one routed layer decided in one forward."""

    logits: torch.Tensor  # (B, T) router logits, fp32, carries grad in training
    selected: torch.Tensor  # (B, T) bool: token ran the layer
    valid: torch.Tensor  # (B, T) bool: not padding
    capacity: torch.Tensor  # () float64: capacity this forward selected with (annealed in training)
    similarity: torch.Tensor | None = None  # (B, T) cos(h, F(h)) when computed, else None; +inf: not measured
    # (B, T) valid tokens each measured similarity stands for (1: ran or dense; a skipped sample: its row's
    # skipped tokens over its samples; 0: not measured); None: every valid token measured (dense source)
    similarity_weight: torch.Tensor | None = None
    # (B, T) log |h| of the layer's input, packed source only: predicts the similarity of tokens not measured
    log_norm: torch.Tensor | None = None


class RoutingInputs:
    """What the routed model hands every routed layer for one forward, and where the layers answer.

    Built by the model's forward (``RoutingState.inputs``); a layer reads its entries by its routed index.
    A plain class, not a dataclass: FSDP rebuilds the dataclasses and dicts it finds in a wrapped layer's
    inputs (to hook the tensors that need grad, or to cast floats to the compute dtype), so a layer would
    write its records into a copy the model never sees, and read its capacity rounded to bf16.
    """

    def __init__(self, training: bool, token_mask: torch.Tensor | None = None, capacity: torch.Tensor | None = None,
                 packed_width: tuple[int, ...] = (), similarity: str = "", force: dict[int, str] | None = None,
                 collect: bool = True, similarity_seed: int = 0, row_block: int = 0):
        self.training = training
        self.token_mask = token_mask  # (B, S) bool padding mask of the sequence so far, None: no padding
        self.capacity = capacity  # (L,) float64 capacity of each routed layer in this forward
        self.packed_width = packed_width  # training: K = ceil(c * T) per routed layer (static shapes)
        self.similarity = similarity  # training: similarity labels from "packed" or "dense" computation, "": none
        self.similarity_seed = similarity_seed  # seeds the packed source's sample of skipped tokens (per step)
        # Where this forward's rows sit in the optimizer step's global batch: block b holds rows [b * B, (b + 1) * B).
        self.row_block = row_block
        # (B, T) example of each token within its row when rows pack several examples (position ids restarting, no
        # padding mask: the model's mask keeps them apart); None: one sequence per row
        self.example_ids: torch.Tensor | None = None
        self.force = {} if force is None else force  # layer index -> "run" | "skip"
        self.collect = collect  # write records (training, or output_router_logits at inference)
        self.records: dict[int, RouterRecord] = {}  # layer index -> its decisions
        # Set by the causal LM head when it knows them: how the task loss is normalised (see modeling.py).
        self.label_tokens: torch.Tensor | None = None  # () tokens with a task label in this forward
        self.num_items_in_batch: torch.Tensor | int | None = None  # label tokens of the optimizer step (HF Trainer)
        self.router_loss = None  # the RouterLossOutput the decoder computed from the records

    def valid_tokens(self, batch: int, seq_len: int) -> torch.Tensor | None:
        """(B, T) bool validity of the current chunk of tokens, or None when nothing is padded."""
        if self.token_mask is None:
            return None
        return self.token_mask[:, -seq_len:].expand(batch, seq_len)


def packed_width(capacity: float, seq_len: int) -> int:
    """K = ceil(c * T): the packed width in training, the same for every row (static shapes)."""
    return max(1, min(seq_len, math.ceil(capacity * seq_len)))


def row_budget(capacity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """k_b = ceil(c * n_b) per row of ``valid`` (B, T) bool, n_b its valid tokens: (B,) long, no host sync."""
    return torch.ceil(valid.sum(1, dtype=torch.float64) * capacity).long()


def threshold_from_quantiles(quantiles: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Score threshold at which a share ``capacity`` of tokens runs, from tracked score quantiles.

    quantiles: (..., Q) at levels linspace(0, 1, Q); capacity: (...) -> (...). Interpolates at level
    1 - c. Capacity 1.0 gives threshold 0: every token runs, also one scoring below every tracked score.
    """
    q = quantiles.shape[-1]
    pos = (1.0 - capacity.float()) * (q - 1)
    lo = pos.floor().clamp(0, q - 2).long()
    w = (pos - lo).unsqueeze(-1)
    pair = quantiles.gather(-1, torch.stack([lo, lo + 1], dim=-1))  # (..., 2)
    value = (pair[..., :1] * (1.0 - w) + pair[..., 1:] * w).squeeze(-1)
    return torch.where(capacity >= 1.0, torch.zeros_like(value), value)


class RoutedDecoderLayer(GradientCheckpointingLayer):
    """Routing logic; instantiate through ``routed_layer_class(type(stock_layer))``."""

    _dlo_stock_class: type = nn.Module  # set on each concrete Routed<Stock> class
    _dlo_cache_kwarg: str = "cache"  # the name under which the stock forward takes its cache (idem)

    def __init__(self, layer: nn.Module, *, layer_index: int, routed_index: int, capacity: float,
                 granularity: str, beta: float):
        # The concrete class also derives from the stock layer class (so isinstance checks, output
        # recording and no-split rules keep working), but the stock __init__ would build fresh weights:
        # initialise only the module machinery, then adopt the stock layer's submodules and attributes.
        GradientCheckpointingLayer.__init__(self)
        check_routable(layer, layer_index, granularity)  # verified families only (dlo/families.py)
        plain = set(vars(nn.Module()))
        for name, value in vars(layer).items():
            if name not in plain:  # e.g. hidden_size, attention_type: the stock forward may read them
                setattr(self, name, value)
        for name, child in layer.named_children():
            self.add_module(name, child)
        hidden = layer.input_layernorm.weight.shape[-1] if hasattr(layer, "input_layernorm") else None
        reference = next(layer.parameters())
        if hidden is None:
            hidden = getattr(layer, "hidden_size", None) or reference.shape[-1]
        self.router = nn.Linear(hidden, 1, bias=True, device=reference.device, dtype=reference.dtype)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.layer_index = layer_index
        self.routed_index = routed_index
        self.granularity = granularity
        self.beta = beta
        # Target capacity (what inference selects; training anneals towards it) and the tracked score
        # quantiles. Buffers, so checkpoints carry them; the model's RoutingState is their only writer.
        self.register_buffer("capacity", torch.tensor(capacity, dtype=torch.float32))
        self.register_buffer("score_quantiles", torch.full((NUM_QUANTILES,), 0.5, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) casts every floating buffer; bf16 would round capacities and score quantiles to
        # ~3 digits and move thresholds. These two follow the device only and stay fp32 at full precision.
        kept = {name: self._buffers.pop(name) for name in ROUTING_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buffer in kept.items():
                moved = fn(buffer)
                source = moved if buffer.is_meta else buffer.to(device=moved.device)
                self._buffers[name] = source.to(torch.float32)
        return self

    @property
    def target_capacity(self) -> float:
        return float(self.capacity)

    def threshold(self) -> torch.Tensor:
        """Inference score threshold (0-dim tensor) for the target capacity."""
        return threshold_from_quantiles(self.score_quantiles, self.capacity)

    def _decode_threshold(self) -> torch.Tensor:
        """``threshold()``, recomputed only when the quantiles or the capacity change (written, loaded or moved)."""
        if torch.compiler.is_compiling():  # in a graph it is a few fused ops, and the key's data pointers break it
            return self.threshold()
        key = (self.score_quantiles._version, self.capacity._version, self.score_quantiles.data_ptr(),
               self.capacity.data_ptr())
        if getattr(self, "_decode_threshold_key", None) != key:
            self._decode_threshold_key, self._decode_threshold_value = key, self.threshold()
        return self._decode_threshold_value

    # ---- forward -------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None,
                dlo_routing: RoutingInputs | None = None, **kwargs):
        routing = dlo_routing if dlo_routing is not None else RoutingInputs(training=False, collect=False)
        if routing.training and routing.capacity is None:
            raise ValueError(
                f"routed layer {self.layer_index} got no training capacities: call the routed model itself "
                "(model(**batch)), which hands every routed layer its RoutingInputs"
            )
        if self.granularity == "mlp":
            return self._forward_mlp(hidden_states, attention_mask, position_ids, position_embeddings, routing, kwargs)
        return self._forward_block(hidden_states, attention_mask, position_ids, position_embeddings, routing, kwargs)

    def _stock(self, x, attention_mask, position_ids, position_embeddings, kwargs):
        """The stock layer's own forward on ``x`` (full residual output F(x))."""
        out = self._dlo_stock_class.forward(self, x, attention_mask=attention_mask, position_ids=position_ids,
                                            position_embeddings=position_embeddings, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _with_cache(self, kwargs: dict, cache) -> dict:
        """The stock forward's keyword arguments with ``cache`` in place of the model's cache."""
        kept = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
        return {**kept, self._dlo_cache_kwarg: cache}

    def _select(self, logits: torch.Tensor, valid: torch.Tensor | None, routing: RoutingInputs):
        """Choose the tokens that run: (idx, active, gate, capacity), or None when no token runs.

        idx (B, K) positions to pack; active (B, K) bool (False: a slot that must not run or be stored);
        gate (B, K) the update's scale (0 on inactive slots). Training and forced runs list positions in
        ascending order; inference lists each row's active positions first, ascending, then fillers.
        """
        B, T = logits.shape
        device = logits.device
        force = routing.force.get(self.layer_index)
        if routing.training:
            capacity = routing.capacity[self.routed_index]
        else:
            capacity = self.capacity.to(torch.float64)
        if force == "skip":
            return None, capacity
        if force == "run":  # exactly the stock layer: gate 1, every valid token
            idx = torch.arange(T, device=device).expand(B, T)
            active = torch.ones(B, T, dtype=torch.bool, device=device) if valid is None else valid
            return (idx, active, active.to(logits.dtype)), capacity
        if routing.training:
            K = routing.packed_width[self.routed_index]
            ranked = logits if valid is None else logits.masked_fill(~valid, float("-inf"))
            # Stable descending sort: equal scores keep position order, so ties go to the earlier token.
            order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :K]
            idx, perm = torch.sort(order, dim=1)  # (B, K) ascending: packed order stays causal
            row_valid = torch.ones(B, T, dtype=torch.bool, device=device) if valid is None else valid
            budget = row_budget(capacity, row_valid).clamp(max=K)  # padding neither runs nor counts
            active = (torch.arange(K, device=device) < budget.unsqueeze(1)).gather(1, perm)
        else:
            chosen = torch.sigmoid(logits) >= self.threshold()
            if valid is not None:
                chosen &= valid
            if T == 1:  # a decode step: one token per row, nothing to pack
                idx, active = torch.zeros(B, 1, dtype=torch.long, device=device), chosen
            else:
                idx, active = active_positions(chosen)
            if idx.shape[1] == 1 and not bool(active.any()):  # nobody runs: the layer's weights are not touched
                return None, capacity
        gate = (1.0 + self.beta * (torch.sigmoid(logits.gather(1, idx)) - 0.5)) * active  # (B, K)
        return (idx, active, gate), capacity

    def _record(self, routing, logits, idx, active, valid, capacity, similarity, similarity_weight=None,
                log_norm=None):
        # A gradient-checkpointing recomputation runs this again with the same inputs: keep the first record.
        if not routing.collect or self.layer_index in routing.records:
            return
        B, T = logits.shape
        selected = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
        if idx is not None:
            selected.scatter_(1, idx, active)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=logits.device)
        routing.records[self.layer_index] = RouterRecord(logits=logits, selected=selected, valid=valid,
                                                         capacity=capacity, similarity=similarity,
                                                         similarity_weight=similarity_weight, log_norm=log_norm)

    def _forward_block(self, h, attention_mask, position_ids, position_embeddings, routing, kwargs):
        B, T, d = h.shape
        layer_cache = self._layer_cache(kwargs)
        if T == 1 and layer_cache is not None and not routing.training:
            return self._decode_step(h, position_ids, position_embeddings, attention_mask, routing, kwargs, layer_cache)
        valid = routing.valid_tokens(B, T)
        logits = self.router(h).squeeze(-1).float()  # (B, T)
        decision, capacity = self._select(logits, valid, routing)
        similarity = weight = log_norm = None
        if routing.training and routing.similarity == "dense":
            with torch.no_grad():  # a side computation: it must not write the KV cache
                no_cache = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
                dense = self._stock(h, attention_mask, position_ids, position_embeddings, no_cache)
                similarity = torch.nn.functional.cosine_similarity(h.float(), dense.float(), dim=-1)
        if decision is None:  # every token skips: the layer is the identity and stores no K/V
            if layer_cache is not None:
                layer_cache.skip(B, T, h.device)
            self._record(routing, logits, None, None, valid, capacity, similarity)
            return h
        idx, active, gate = decision
        K = idx.shape[1]
        forced = self.layer_index in routing.force
        # Slots that do not run must not be attended: filler in inference rows with different counts, and
        # over-budget tokens of padded training rows. Forced runs leave only padding, which the model's mask hides.
        key_ok = None if forced or (routing.training and valid is None) else active
        # Eval rows list active tokens first, so idx is arange(T) only when all are in (or T == 1).
        in_order = K == T and (key_ok is None or T == 1)
        # A checkpointing recomputation keeps its forward's record: it need not measure (nor sample) again.
        measure = routing.training and routing.similarity == "packed" and self.layer_index not in routing.records
        # A routed cache would book the explorers as stored tokens: sample only without one (a stock cache in
        # training already holds packed K/V no decode may read).
        explore = sample_skipped(idx, active, valid, T, routing.similarity_seed, self.layer_index, routing.row_block) \
            if measure and not in_order and layer_cache is None else None
        # The model separates packed examples only without a cache (transformers' rule).
        examples = None if any(kwargs.get(k) is not None for k in CACHE_KWARGS) else routing.example_ids
        path = self._attention_path(attention_mask, routing, T, layer_cache is not None, examples is not None)
        idx, active, gate, mask, varlen = self._packed_attention(path, attention_mask, idx, active, gate, key_ok,
                                                                 in_order, layer_cache, examples, explore, T, h.dtype)
        if varlen:
            kwargs = {**kwargs, **varlen}
        keys = None if explore is None else KeyRecorder(_model_cache(kwargs))  # the running K/V, for the sample
        if in_order:  # no gather needed
            f = self._stock(h, mask, position_ids, position_embeddings, kwargs)
            y = h + gate.unsqueeze(-1).to(h.dtype) * (f - h)
            h_slots, f_slots = h, f
        else:
            h_slots = gather_rows(h.reshape(B * T, d), flat_row_index(idx, T)).view(B, K, d)
            pos = _gather_positions(position_ids, idx, B, T)
            pe = _gather_rotary(position_embeddings, idx)
            f_slots = self._stock(h_slots, mask, pos, pe, kwargs if keys is None else self._with_cache(kwargs, keys))
            y = combine_running(h, f_slots, gate, idx)
        if measure:
            explored = None if explore is None else self._explore(h, idx, active, explore, keys, path, examples,
                                                                 attention_mask, position_ids, position_embeddings,
                                                                 kwargs)
            similarity, weight = measured_similarity(token_similarity(h_slots, f_slots), idx, active, explore,
                                                     explored, T)
            log_norm = input_log_norm(h)
        self._record(routing, logits, idx, active, valid, capacity, similarity, weight, log_norm)
        return y

    def _packed_attention(self, path: str, attention_mask, idx, active, gate, key_ok, in_order: bool, layer_cache,
                          examples, explore, seq_len: int, dtype):
        """How the packed slots attend on ``path``: ``(idx, active, gate, mask, varlen)``, the selection in the
        order the path wants it (running tokens first for causal and flash), the mask for the stock layer's call
        (None where the kernel's own causal rule suffices) and flash attention's variable-length arguments.
        With a routed cache the chunk's selected tokens are booked into it here (``reserve``)."""
        config = self.self_attn.config
        window = layer_window(config, self.layer_index)
        additive = dtype if config._attn_implementation == "eager" else None
        if path == FLASH:
            seen = 0 if layer_cache is None else layer_cache.seen
            check_flash_window(config, self.layer_index, seq_len + seen)
            if explore is not None:
                check_block_attention(config._attn_implementation, samples_skipped=True)
            if not in_order:  # flash_varlen wants each row's running tokens first
                idx, active, gate = running_first(idx, active, gate)
        if layer_cache is not None:
            # Queries attend the tokens this layer stored for their row, the chunk's selected ones included. The
            # model sized its mask for this chunk as the cache layer does before booking it (for a sliding window
            # the columns start at the first index the chunk can see).
            _, first_column = layer_cache.get_mask_sizes(seq_len)
            offset = layer_cache.reserve(idx, active, seq_len)
            if path == FLASH:
                return idx, active, gate, None, flash_varlen(active, layer_cache.valid)
            if path == REFERENCE:
                return idx, active, gate, packed_attention_mask(attention_mask, idx, layer_cache.slots,
                                                                layer_cache.valid, offset, first_column), {}
            return idx, active, gate, position_mask(idx + offset, layer_cache.slots, layer_cache.valid, window,
                                                    attention_mask, additive), {}
        if in_order and key_ok is None:
            return idx, active, gate, attention_mask, {}
        if path == FLASH:
            ok = active if key_ok is not None else torch.ones_like(active)
            return idx, active, gate, None, flash_varlen(ok, ok)
        if path == CAUSAL:
            # Running tokens first (dlo/attention.py): plain causal attention, no (B, heads, K, K) mask.
            if key_ok is not None:
                idx, active, gate = running_first(idx, active, gate)
            return idx, active, gate, None, {}
        if path == REFERENCE:
            return idx, active, gate, packed_attention_mask(attention_mask, idx, idx, key_ok), {}
        return idx, active, gate, position_mask(idx, idx, key_ok, window, attention_mask, additive, examples), {}

    def _attention_path(self, attention_mask, routing, seq_len: int, cached: bool, examples: bool) -> str:
        """How this layer's packed batch attends (dlo/attention.py): causal, positions, reference or flash."""
        return attention_path(self.self_attn.config, self.layer_index, attention_mask, routing.token_mask, seq_len,
                              cached, examples)

    @torch.no_grad()
    def _explore(self, h, idx, active, explore: Exploration, keys: KeyRecorder, path: str, examples,
                 attention_mask, position_ids, position_embeddings, kwargs) -> torch.Tensor:
        """cos(h, F(h)) (B, E) of the sampled skipped tokens: the stock forward on them alone, each attending the
        running slots' K/V (``keys``, from the running call) its position may see, and its own. Its mask is built
        as the running call's ``path`` builds masks: from the model's mask (reference) or from positions (and
        ``examples``, the packed examples of the row, as there)."""
        B, T, d = h.shape
        K = idx.shape[1]
        h_explore = gather_rows(h.reshape(B * T, d), flat_row_index(explore.idx, T)).view(B, -1, d)  # (B, E, d)
        key_slots = torch.cat([idx, explore.idx], 1)  # (B, K + E): running keys, then the explorers'
        key_ok = torch.cat([active, torch.ones_like(explore.ok)], 1)
        config = self.self_attn.config
        if path == REFERENCE:
            mask = packed_attention_mask(attention_mask, explore.idx, key_slots, key_ok)
        else:
            additive = h.dtype if config._attn_implementation == "eager" else None
            mask = position_mask(explore.idx, key_slots, key_ok, layer_window(config, self.layer_index),
                                 attention_mask, additive, examples)
        mask = own_key_only(mask, K)  # (B, h, E, K + E)
        f = self._stock(h_explore, mask, _gather_positions(position_ids, explore.idx, B, T),
                        _gather_rotary(position_embeddings, explore.idx),
                        self._with_cache(kwargs, KeyPrefix(keys.keys, keys.values)))
        return token_similarity(h_explore, f)

    def _decode_step(self, h, position_ids, position_embeddings, attention_mask, routing, kwargs, layer_cache):
        """One new token per row over a routed cache: fixed shapes, no host sync (docs/GENERATION.md).

        Every row runs the layer; a row that skips is masked (its output is its input, its K/V kept in an invalid
        cache column), so the step's shapes do not depend on the decisions. A step that no row runs skips the
        layer's weights only where the cache reads that on the host (``RoutedLayer.checks_idle``). Each op here
        costs a dispatch per routed layer and step, so a forced run without padding adds none to the stock layer.
        """
        B = h.shape[0]
        # Transformers passes no mask only when no token is padded (it checks once per step): every row is valid.
        valid = None if attention_mask is None else routing.valid_tokens(B, 1)  # (B, 1) or None
        force = routing.force.get(self.layer_index)
        logits = score = None
        if force is None or routing.collect:
            logits = self.router(h)  # (B, 1, 1): shaped like h, so decision and gate broadcast over it as they are
            if logits.dtype != torch.float32:
                logits = logits.float()  # decided in fp32, as the cache-free forward decides
        if force is None:
            score = torch.sigmoid(logits)
            ran = score >= self._decode_threshold()  # (B, 1, 1)
            if valid is not None:
                ran &= valid.unsqueeze(-1)
        else:
            ran = None if valid is None else valid.unsqueeze(-1)
        active = None if ran is None else ran.view(B, 1)  # (B, 1): the rows that run, as the cache books them
        if force == "skip" or (force is None and layer_cache.checks_idle(h.device) and not bool(ran.any())):
            layer_cache.skip(B, 1, h.device)
            self._record(routing, _step_logits(logits, B), None, None, valid, self.capacity.double(), None)
            return h
        key_ok = layer_cache.append_step(active, B, h.device)  # (B, L) or None: nothing to hide
        if key_ok is None or self.self_attn.config._attn_implementation in FLASH_IMPLEMENTATIONS:
            mask = key_ok  # flash attention takes the (B, L) key mask itself (its query is the row's last key)
        elif isinstance(layer_cache, RoutedStaticLayer):  # its columns are the model mask's: keep what that hides
            mask = static_step_mask(key_ok, attention_mask)
        else:
            mask = step_attention_mask(key_ok, attention_mask)
        f = self._stock(h, mask, position_ids, position_embeddings, kwargs)
        if score is not None:  # y = h + g * (F(h) - h) on the rows that run, g = 1 + beta * (score - 1/2)
            gate = score.mul(self.beta).add_(1.0 - 0.5 * self.beta)  # (B, 1, 1)
            f = torch.lerp(h, f, gate if gate.dtype == h.dtype else gate.to(h.dtype))
        # Where, not a zero gate: a skipping row may attend no key at all, and its NaN must not leak.
        y = f if ran is None else torch.where(ran, f, h)
        if routing.collect:
            ran_rows = torch.ones(B, 1, dtype=torch.bool, device=h.device) if active is None else active
            self._record(routing, _step_logits(logits, B), torch.zeros(B, 1, dtype=torch.long, device=h.device),
                         ran_rows, valid, self.capacity.double(), None)
        return y

    def _layer_cache(self, kwargs) -> RoutedLayer | RoutedStaticLayer | None:
        """This layer's part of a routed cache (``RoutedCache``, or a static cache with routed layers), or None.

        A stock cache gets this layer's packed K/V, which is only harmless while it is empty (one
        cache-filling forward, e.g. training with use_cache on): decoding from it would be wrong.
        """
        cache = _model_cache(kwargs)
        if cache is None:
            return None
        layer = cache.layers[self.layer_index] if self.layer_index < len(cache.layers) else None
        if isinstance(layer, (RoutedLayer, RoutedStaticLayer)):
            return layer
        if cache.get_seq_length(self.layer_index) > 0:
            raise ValueError(
                f"a {type(cache).__name__} cannot hold K/V of block-routed layer {self.layer_index} (each layer keeps "
                "only the tokens it ran); use model.generate(), or start from model(..., use_cache=True) / "
                "dlo.RoutedCache, which routed models create for you in eval mode"
            )
        return None

    def _mlp_update(self, x):
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_mlp(self, h, attention_mask, position_ids, position_embeddings, routing, kwargs):
        B, T, d = h.shape
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(h),
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        x = h + attn  # attention is dense: every token writes its KV, so the ordinary cache is right
        valid = routing.valid_tokens(B, T)
        logits = self.router(x).squeeze(-1).float()  # (B, T): the router sees what enters the MLP
        decision, capacity = self._select(logits, valid, routing)
        similarity = weight = log_norm = None
        if routing.training and routing.similarity == "dense":
            with torch.no_grad():
                similarity = torch.nn.functional.cosine_similarity(x.float(), self._mlp_update(x).float(), dim=-1)
        if decision is None:
            self._record(routing, logits, None, None, valid, capacity, similarity)
            return x
        idx, active, gate = decision
        K = idx.shape[1]
        measure = routing.training and routing.similarity == "packed" and self.layer_index not in routing.records
        explore = sample_skipped(idx, active, valid, T, routing.similarity_seed, self.layer_index, routing.row_block) \
            if measure and K < T else None
        if K == T:  # every position is in the packed index (in some order): run the MLP in place
            gate_by_position = torch.zeros(B, T, dtype=gate.dtype, device=gate.device).scatter(1, idx, gate)
            update = self.mlp(self.post_attention_layernorm(x))
            y = x + gate_by_position.unsqueeze(-1).to(x.dtype) * update
            x_slots, f_slots = x, x + update  # training: idx is arange(T) here, slots in position order
        else:
            x_slots = gather_rows(x.reshape(B * T, d), flat_row_index(idx, T)).view(B, K, d)
            f_slots = self._mlp_update(x_slots)  # (B, K, d): a token's MLP sees only itself
            y = combine_running(x, f_slots, gate, idx)
        if measure:
            explored = None
            if explore is not None:
                with torch.no_grad():
                    x_explore = gather_rows(x.reshape(B * T, d), flat_row_index(explore.idx, T)).view(B, -1, d)
                    explored = token_similarity(x_explore, self._mlp_update(x_explore))  # (B, E)
            similarity, weight = measured_similarity(token_similarity(x_slots, f_slots), idx, active, explore,
                                                     explored, T)
            log_norm = input_log_norm(x)
        self._record(routing, logits, idx, active, valid, capacity, similarity, weight, log_norm)
        return y


def _step_logits(logits: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A decode step's (B, 1, 1) router logits as a record holds them: (B, 1) fp32."""
    return None if logits is None else logits.view(batch, 1)


def combine_running(h: torch.Tensor, f_slots: torch.Tensor, gate: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y (B, T, d) from the running slots' outputs f_slots (B, K, d) at positions idx (B, K)."""
    B, T, d = h.shape
    K = idx.shape[1]
    f = f_slots.reshape(B * K, d)
    return scatter_combine(h.reshape(B * T, d), f, gate.reshape(-1), flat_row_index(idx, T)).view(B, T, d)


_ROUTED_LAYER_CLASSES: dict[type, type] = {}


def routed_layer_class(stock_class: type) -> type:
    """``Routed<Stock>``: RoutedDecoderLayer's logic on top of the stock decoder layer class."""
    if stock_class not in _ROUTED_LAYER_CLASSES:
        _ROUTED_LAYER_CLASSES[stock_class] = type(
            f"Routed{stock_class.__name__}", (RoutedDecoderLayer, stock_class),
            {"__module__": __name__, "_dlo_stock_class": stock_class, "_dlo_cache_kwarg": _cache_kwarg(stock_class)},
        )
    return _ROUTED_LAYER_CLASSES[stock_class]


def _model_cache(kwargs):
    """The cache the model handed the layer (under either name), or None."""
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


def _cache_kwarg(stock_class: type) -> str:
    """The name under which ``stock_class.forward`` takes its cache."""
    return "cache" if "cache" in inspect.signature(stock_class.forward).parameters else "past_key_values"


def _gather_positions(position_ids, idx, B, T):
    if position_ids is None:
        return idx
    return position_ids.expand(B, T).gather(1, idx)


def _gather_rotary(position_embeddings, idx):
    """Gather cos/sin (B or 1, T, head_dim) at the selected positions -> (B, K, head_dim)."""
    if position_embeddings is None:
        return None
    cos, sin = position_embeddings
    B, K = idx.shape
    index = idx.unsqueeze(-1).expand(B, K, cos.shape[-1])
    return cos.expand(B, -1, -1).gather(1, index), sin.expand(B, -1, -1).gather(1, index)
