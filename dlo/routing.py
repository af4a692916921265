"""Per-token routed decoder layers (DESIGN.md §2.2-2.3).

A ``RoutedDecoderLayer`` wraps a stock HF decoder layer (Llama, Mistral, Qwen2: pre-norm
attention + MLP). It registers the stock layer's own submodules under their own names, so
checkpoint keys stay ``model.layers.{i}.self_attn...``; the only new keys are the router's.

Training selects, per sequence, the top-k tokens by router score (k = ceil(c * n) of the row's
n valid tokens, inside a static (B, ceil(c * T)) index: no host sync, ties broken by position).
Inference selects causally: a token runs when its score reaches the layer's calibrated threshold.
Selected tokens are gathered into a packed (B, K, d) batch, the layer runs on that batch with the
tokens' original positions, and the result is combined back:  y = h + g * (F(h) - h),  g = 1 + beta * (score - 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from dlo import ops
from dlo.cache import RoutedLayer

# Submodules a decoder layer must have for us to route it.
REQUIRED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
# Score quantile levels tracked per layer; inference thresholds interpolate between them.
NUM_QUANTILES = 101
# Names under which transformers passes the KV cache to a decoder layer (5.x renamed it).
CACHE_KWARGS = ("cache", "past_key_values")


@dataclass
class RouterRecord:
    """What one routed layer decided in its last forward (read by losses and statistics)."""

    logits: torch.Tensor  # (B, T) router logits, fp32, carries grad in training
    selected: torch.Tensor  # (B, T) bool: token ran the layer
    valid: torch.Tensor  # (B, T) bool: not padding
    capacity: float  # effective capacity used for this forward
    similarity: torch.Tensor | None  # (B, T) cos(h, F(h)) when computed, else None


class RoutingState:
    """Per-model mutable state shared by all routed layers of one model."""

    def __init__(self):
        self.token_mask: torch.Tensor | None = None  # (B, T_total) 2-D padding mask of the current forward
        self.forward_count = 0  # training forwards seen; drives the similarity refresh period
        self.similarity_due = False
        self.force: str | None = None  # None | "run" | "skip": override decisions (analysis, export)
        self.anneal_fraction = 1.0  # 0 = capacity 1.0 everywhere, 1 = the targets

    def valid_tokens(self, batch: int, seq_len: int, device) -> torch.Tensor | None:
        """(B, T) bool validity of the current chunk of tokens, or None when nothing is padded."""
        if self.token_mask is None:
            return None
        mask = self.token_mask[:, -seq_len:].to(device=device, dtype=torch.bool)
        return mask.expand(batch, seq_len)


def static_budget(capacity: float, seq_len: int) -> int:
    """K = ceil(c * T): the packed width in training, the same for every row (static shapes)."""
    return min(seq_len, math.ceil(capacity * seq_len))


def row_budget(capacity: float, valid: torch.Tensor) -> torch.Tensor:
    """k_b = ceil(c * n_b) per row of ``valid`` (B, T) bool, n_b its valid tokens: (B,) long, no host sync."""
    return torch.ceil(valid.sum(1, dtype=torch.float64) * capacity).long()


class RoutedDecoderLayer(GradientCheckpointingLayer):
    """Routing logic; instantiate through ``routed_layer_class(type(stock_layer))``."""

    def __init__(self, layer: nn.Module, *, layer_index: int, routed_index: int, capacity: float,
                 granularity: str, beta: float, state: RoutingState):
        # The concrete class also derives from the stock layer class (so isinstance checks,
        # output_hidden_states recording and no-split rules keep working), but the stock
        # __init__ would build fresh weights: initialise only the module machinery.
        GradientCheckpointingLayer.__init__(self)
        missing = [name for name in REQUIRED_SUBMODULES if not hasattr(layer, name)]
        if missing:
            raise ValueError(
                f"layer {layer_index} ({type(layer).__name__}) lacks {missing}; dlo routes pre-norm decoder "
                f"layers with {REQUIRED_SUBMODULES} (Llama, Mistral, Qwen2)"
            )
        for name, child in layer.named_children():
            self.add_module(name, child)
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type
        hidden = layer.input_layernorm.weight.shape[-1]
        weight = layer.input_layernorm.weight
        self.router = nn.Linear(hidden, 1, bias=True, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.layer_index = layer_index
        self.routed_index = routed_index
        self.granularity = granularity
        self.beta = beta
        self.target_capacity = capacity
        # Persistent so checkpoints resume exactly; mirrored into the saved config for readers.
        self.register_buffer("capacity", torch.tensor(capacity, dtype=torch.float32))
        self.register_buffer("score_quantiles", torch.full((NUM_QUANTILES,), 0.5, dtype=torch.float32))
        self.state = state
        self.last: RouterRecord | None = None

    # ---- capacity and thresholds -------------------------------------------------------
    def effective_capacity(self) -> float:
        """Capacity of this forward: annealed from 1.0 towards the target during training."""
        if not self.training:
            return self.target_capacity
        return 1.0 - (1.0 - self.target_capacity) * self.state.anneal_fraction

    def threshold(self, capacity: float | None = None) -> torch.Tensor:
        """Score threshold at which the share of tokens running equals ``capacity`` (0-dim tensor)."""
        c = self.target_capacity if capacity is None else capacity
        # Decoding asks once per layer and token: reuse the value until the capacity or the quantiles change.
        key = (c, self.score_quantiles._version, self.score_quantiles.data_ptr())
        if getattr(self, "_threshold_key", None) == key:
            return self._threshold_value
        pos = (1.0 - c) * (NUM_QUANTILES - 1)
        lo = min(int(math.floor(pos)), NUM_QUANTILES - 2)
        w = pos - lo
        self._threshold_value = self.score_quantiles[lo] * (1.0 - w) + self.score_quantiles[lo + 1] * w
        self._threshold_key = key
        return self._threshold_value

    def set_target_capacity(self, capacity: float):
        self.target_capacity = float(capacity)
        self.capacity.fill_(self.target_capacity)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        if self.granularity == "mlp":
            return self._forward_mlp(hidden_states, attention_mask, position_ids, position_embeddings, kwargs)
        return self._forward_block(hidden_states, attention_mask, position_ids, position_embeddings, kwargs)

    def _dense(self, x, attention_mask, position_ids, position_embeddings, kwargs):
        """The stock layer's computation: pre-norm attention then pre-norm MLP, each residual."""
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(x),
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))

    def _mlp_update(self, x):
        return x + self.mlp(self.post_attention_layernorm(x))

    def _select(self, logits: torch.Tensor, valid: torch.Tensor | None):
        """Choose the tokens that run: (idx, active, capacity), or (None, None, capacity) when none runs.

        idx (B, K) positions to pack, active (B, K) bool (False: a slot that must not run or be stored).
        Training and forced runs list positions in ascending order; inference lists each row's active
        positions first, ascending, then fillers.
        """
        B, T = logits.shape
        device = logits.device
        force = self.state.force
        capacity = self.effective_capacity()
        if force == "run":
            idx = torch.arange(T, device=device).expand(B, T)
            active = torch.ones(B, T, dtype=torch.bool, device=device) if valid is None else valid
            return idx, active, capacity
        if force == "skip":
            return None, None, capacity
        if self.training:
            ranked = logits if valid is None else logits.masked_fill(~valid, float("-inf"))
            # Stable descending sort: equal scores keep position order, so ties go to the earlier token.
            order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :static_budget(capacity, T)]
            idx, perm = torch.sort(order, dim=1)  # (B, K) ascending: packed order stays causal
            if valid is None:
                return idx, torch.ones_like(idx, dtype=torch.bool), capacity
            # A padded row runs ceil(c * n) of its n valid tokens: padding neither runs nor counts.
            by_rank = torch.arange(order.shape[1], device=device) < row_budget(capacity, valid).unsqueeze(1)
            return idx, by_rank.gather(1, perm), capacity
        chosen = torch.sigmoid(logits) >= self.threshold()
        if valid is not None:
            chosen &= valid
        if T == 1:  # a decode step: one token per row, nothing to pack
            idx, active = torch.zeros(B, 1, dtype=torch.long, device=device), chosen
        else:
            idx, active = ops.active_positions(chosen)
        if idx.shape[1] == 1 and not bool(active.any()):  # nobody runs: the layer's weights are not touched
            return None, None, capacity
        return idx, active, capacity

    def _record(self, logits, idx, active, valid, capacity, similarity):
        B, T = logits.shape
        selected = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
        if idx is not None:
            selected.scatter_(1, idx, active)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=logits.device)
        self.last = RouterRecord(logits=logits, selected=selected, valid=valid, capacity=capacity,
                                 similarity=similarity)

    def _forward_block(self, h, attention_mask, position_ids, position_embeddings, kwargs):
        B, T, d = h.shape
        layer_cache = self._layer_cache(kwargs)
        valid = self.state.valid_tokens(B, T, h.device)
        logits = self.router(h).squeeze(-1).float()  # (B, T)
        idx, active, capacity = self._select(logits, valid)
        similarity = None
        if self.training and self.state.similarity_due:
            with torch.no_grad():  # a side computation: it must not write the KV cache
                no_cache = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
                dense = self._dense(h, attention_mask, position_ids, position_embeddings, no_cache)
                similarity = torch.nn.functional.cosine_similarity(h.float(), dense.float(), dim=-1)
        if idx is None:  # every token skips: the layer is the identity and stores no K/V
            if layer_cache is not None:
                layer_cache.skip(B, T, h.device)
            self._record(logits, idx, active, valid, capacity, similarity)
            return h
        K = idx.shape[1]
        gate = (1.0 + self.beta * (torch.sigmoid(logits.gather(1, idx)) - 0.5)) * active  # (B, K)
        # Slots that do not run must not be attended: filler in inference rows with different counts, and
        # over-budget tokens of padded training rows. Forced runs leave only padding, which the model's mask hides.
        key_ok = None if self.state.force is not None or (self.training and valid is None) else active
        # Eval rows list active tokens first, so idx is arange(T) only when all are in (or T == 1).
        in_order = K == T and (key_ok is None or T == 1)
        if layer_cache is not None:
            # Queries attend the tokens this layer stored for their row, the chunk's selected ones included.
            offset = layer_cache.reserve(idx, active, T)
            if T == 1 and attention_mask is None and layer_cache.full:
                mask = None  # one query, every stored key precedes it, no padding, no empty slot: nothing to hide
            else:
                mask = packed_attention_mask(attention_mask, idx, layer_cache.slots, layer_cache.valid, offset)
        elif in_order and key_ok is None:
            mask = attention_mask
        else:
            mask = packed_attention_mask(attention_mask, idx, idx, key_ok)
        if in_order:  # no gather needed
            f = self._dense(h, mask, position_ids, position_embeddings, kwargs)
            y = h + gate.unsqueeze(-1).to(h.dtype) * (f - h)
        else:
            flat = ops.flat_row_index(idx, T)  # (B*K,)
            h_packed = ops.gather_rows(h.reshape(B * T, d), flat).view(B, K, d)
            pos = _gather_positions(position_ids, idx, B, T)
            pe = _gather_rotary(position_embeddings, idx)
            f = self._dense(h_packed, mask, pos, pe, kwargs)  # (B, K, d)
            y = ops.scatter_combine(h.reshape(B * T, d), f.reshape(B * K, d), gate.reshape(-1), flat)
            y = y.view(B, T, d)
        self._record(logits, idx, active, valid, capacity, similarity)
        return y

    def _layer_cache(self, kwargs) -> RoutedLayer | None:
        """This layer's part of a ``RoutedCache``, or None when there is no routed cache.

        A stock cache gets this layer's packed K/V, which is only harmless while it is empty (one
        cache-filling forward, e.g. training with use_cache on): decoding from it would be wrong.
        """
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is None:
            return None
        layer = cache.layers[self.layer_index] if self.layer_index < len(cache.layers) else None
        if isinstance(layer, RoutedLayer):
            return layer
        if cache.get_seq_length(self.layer_index) > 0:
            raise ValueError(
                f"a {type(cache).__name__} cannot hold K/V of block-routed layer {self.layer_index} (each layer keeps "
                "only the tokens it ran); use model.generate(), or start from model(..., use_cache=True) / "
                "dlo.RoutedCache, which routed models create for you in eval mode"
            )
        return None

    def _forward_mlp(self, h, attention_mask, position_ids, position_embeddings, kwargs):
        B, T, d = h.shape
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(h),
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        x = h + attn  # attention is dense: every token writes its KV, so the ordinary cache is right
        valid = self.state.valid_tokens(B, T, h.device)
        logits = self.router(x).squeeze(-1).float()  # (B, T): the router sees what enters the MLP
        idx, active, capacity = self._select(logits, valid)
        similarity = None
        if self.training and self.state.similarity_due:
            with torch.no_grad():
                similarity = torch.nn.functional.cosine_similarity(
                    x.float(), self._mlp_update(x).float(), dim=-1
                )
        if idx is None:
            self._record(logits, idx, active, valid, capacity, similarity)
            return x
        K = idx.shape[1]
        gate = (1.0 + self.beta * (torch.sigmoid(logits.gather(1, idx)) - 0.5)) * active  # (B, K)
        if K == T:
            y = x + gate.unsqueeze(-1).to(x.dtype) * self.mlp(self.post_attention_layernorm(x))
        else:
            flat = ops.flat_row_index(idx, T)
            x_packed = ops.gather_rows(x.reshape(B * T, d), flat)  # (B*K, d)
            f = self._mlp_update(x_packed)
            y = ops.scatter_combine(x.reshape(B * T, d), f, gate.reshape(-1), flat).view(B, T, d)
        self._record(logits, idx, active, valid, capacity, similarity)
        return y


_ROUTED_LAYER_CLASSES: dict[type, type] = {}


def routed_layer_class(stock_class: type) -> type:
    """``Routed<Stock>``: RoutedDecoderLayer's logic on top of the stock decoder layer class."""
    if stock_class not in _ROUTED_LAYER_CLASSES:
        _ROUTED_LAYER_CLASSES[stock_class] = type(
            f"Routed{stock_class.__name__}", (RoutedDecoderLayer, stock_class), {"__module__": __name__}
        )
    return _ROUTED_LAYER_CLASSES[stock_class]


def _gather_positions(position_ids, idx, B, T):
    if position_ids is None:
        return idx
    return position_ids.expand(B, T).gather(1, idx)


def _gather_rotary(position_embeddings, idx):
    """Gather cos/sin (B or 1, T, head_dim) at the selected positions -> (B, K, head_dim)."""
    cos, sin = position_embeddings
    B, K = idx.shape
    index = idx.unsqueeze(-1).expand(B, K, cos.shape[-1])
    return cos.expand(B, -1, -1).gather(1, index), sin.expand(B, -1, -1).gather(1, index)


def packed_attention_mask(full_mask, idx, key_slots, key_ok, offset: int = 0):
    """Attention mask of packed queries over packed keys.

    full_mask: the model's mask for the chunk, (B, h, T, offset + T) bool (True = attend) or additive
    float, its columns indexed by sequence position; or None (plain causal attention).
    idx: (B, Kq) chunk positions of the queries. key_slots: (B, Kk) sequence positions of the keys
    (``idx`` itself without a cache). key_ok: (B, Kk) bool, False for keys never to attend (fillers,
    padding, empty cache slots), or None (all fine). offset: tokens seen before this chunk.
    Returns None when the packed batch is plainly causal (no cache, nothing masked), else a
    (B, h, Kq, Kk) mask of the same kind as ``full_mask`` (bool when ``full_mask`` is None).
    """
    if full_mask is None and key_ok is None:
        return None
    B, Kq = idx.shape
    Kk = key_slots.shape[1]
    if full_mask is None:
        allowed = (key_slots.unsqueeze(1) <= (idx + offset).unsqueeze(2)).unsqueeze(1)  # (B, 1, Kq, Kk)
    else:
        m = full_mask.expand(B, -1, -1, -1)
        heads = m.shape[1]
        rows = m.gather(2, idx[:, None, :, None].expand(B, heads, Kq, m.shape[-1]))  # (B, h, Kq, S)
        sub = rows.gather(3, key_slots[:, None, None, :].expand(B, heads, Kq, Kk))  # (B, h, Kq, Kk)
        allowed = sub if sub.dtype == torch.bool else sub == 0
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, None, :]
    # A query that may attend nothing (padding, filler) gets NaN from some kernels; let it see key 0 (a
    # finite vector: zeros or a filler's key). Its output is discarded by a zero gate.
    allowed[..., 0] |= ~allowed.any(-1)
    if full_mask is None or full_mask.dtype == torch.bool:
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(full_mask.dtype).min).to(full_mask.dtype)
