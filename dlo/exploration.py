"""The exploration sample of the packed similarity source (docs/DESIGN.md §2.4).

Per row, a few skipped tokens run the layer for their similarity only. They run in a second, gradient-free call
of the stock layer's own forward, after the running tokens' call, so that call is exactly the one without a
sample (same batch, same mask, same kernels: no token's output or gradient can change). An explorer's queries
attend the running tokens' keys and values of this layer (those its position may see) and its own, as if it had
been selected: the running call hands its K/V over through the layer's cache argument (``KeyRecorder``), the
explorer call reads them as a prefix (``KeyPrefix``). Its mask is (B, h, E, K + E): no (S, S) mask is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Per row, this share of the tokens the row runs is drawn from its skipped tokens (at least one).
EXPLORE_SHARE = 1 / 16


@dataclass
class Exploration:
    """Skipped tokens run for their similarity only: gate 0, no other token attends them."""

    idx: torch.Tensor  # (B, E) positions of the sampled skipped tokens
    ok: torch.Tensor  # (B, E) bool: a real sample (False: the row had fewer than E skipped tokens)
    weight: torch.Tensor  # (B,) float: the row's skipped tokens each sample stands for


def sample_skipped(idx: torch.Tensor, active: torch.Tensor, valid: torch.Tensor | None, seq_len: int, seed: int,
                   layer_index: int, row_block: int = 0) -> Exploration | None:
    """Per row, ceil(k * EXPLORE_SHARE) of its valid skipped tokens drawn uniformly (k: the tokens the row runs),
    inside a static width E = ceil(K * EXPLORE_SHARE); None when the packed width leaves no token skipped.

    A token's draw hashes (seed, layer, its row in the step's global batch, its position) instead of reading a
    generator: a gradient-checkpointing recomputation draws the same sample, the model's own randomness (dropout)
    is left untouched, and N ranks or accumulated micro-batches (of equal size) sample exactly what one process
    with the step's whole batch samples, whatever width each batch is padded to.

    Plain tensor ops, so torch.compile traces it inside the layer: a graph break here would compile each routed
    layer's forward as frames of its own, cached per layer, and dynamo's recompile limit (8 entries per frame;
    8 routed layers reach it) would leave the layers past it eager.
    """
    B, K = idx.shape
    width = min(seq_len - K, math.ceil(K * EXPLORE_SHARE))  # no row has more skipped tokens than T - K
    if width <= 0:
        return None
    if width == 1:
        # Under torch.compile the packed width is dynamic, so E is a symbolic size; one explorer would leave the
        # stock sdpa attention's `q_length > 1 and ...` a SymBool for SDPA's is_causal, a graph break inside the
        # layer. The comparison guards (one cache entry each side), and the literal makes E a static 1.
        width = 1
    device = idx.device
    ran = torch.zeros(B, seq_len, dtype=torch.bool, device=device).scatter_(1, idx, active)
    skipped = ~ran if valid is None else valid & ~ran
    rows = torch.arange(B, device=device) + row_block * B
    draw = token_uniform(seed * 1_000_003 + layer_index, rows, torch.arange(seq_len, device=device))
    top = draw.masked_fill(~skipped, -1.0).topk(width, dim=1)
    wanted = torch.ceil(active.sum(1) * EXPLORE_SHARE).long()  # the row's own share, not the padded width's
    ok = (top.values >= 0) & (torch.arange(width, device=device) < wanted.unsqueeze(1))
    weight = skipped.sum(1) / ok.sum(1).clamp(min=1)
    return Exploration(idx=top.indices, ok=ok, weight=weight.float())


_MASK31 = (1 << 31) - 1
_MULTIPLIERS = (0x2C1B3C6D, 0x297A2D39)  # odd and below 2**31: a product of two 31-bit values fits in int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 31-bit values (xor-shift-multiply rounds), elementwise."""
    for multiplier in _MULTIPLIERS:
        x = ((x ^ (x >> 15)) * multiplier) & _MASK31
    return x ^ (x >> 15)


def token_uniform(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(R, C) draws in [0, 1), each a function of (seed, row, column) alone: the same on any device and in any
    batch shape (a generator's stream depends on the shape, and on CUDA on the launch)."""
    keyed = _mix(rows.long() ^ _mix(torch.tensor(seed & _MASK31, device=rows.device)))
    return _mix(keyed.unsqueeze(1) ^ cols.long().unsqueeze(0)).double() / (_MASK31 + 1)


class KeyRecorder:
    """The running call's cache argument: keeps the keys and values its attention used (after rotary), passing
    them through ``inner`` (a stock cache the model handed the layer) when there is one."""

    def __init__(self, inner=None):
        self.inner = inner
        self.keys: torch.Tensor | None = None  # (B, h_kv, K, head_dim)
        self.values: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, *args, **kwargs)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class KeyPrefix:
    """The explorer call's cache argument: its attention sees the running tokens' keys and values, then its own."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # (B, h_kv, K, head_dim)

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)  # (B, h_kv, K + E, hd)


def own_key_only(mask: torch.Tensor, packed: int) -> torch.Tensor:
    """Restrict the explorer block of an explorer mask (B, h, E, K + E) to the diagonal, in place: each explorer
    sees its own key, never another explorer's. Bool (True = attend) or additive float, as the model's mask."""
    E = mask.shape[-2]
    itself = torch.eye(E, dtype=torch.bool, device=mask.device)
    if mask.dtype == torch.bool:
        mask[..., packed:] = itself
    else:
        mask[..., packed:] = torch.where(itself, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
    return mask


def token_similarity(h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """cos(h, F(h)) per token, fp32, without grad: (B, N, d) twice -> (B, N)."""
    with torch.no_grad():
        return torch.nn.functional.cosine_similarity(h.float(), f.float(), dim=-1)


def input_log_norm(h: torch.Tensor) -> torch.Tensor:
    """log |h| per token, fp32, without grad: (B, T, d) -> (B, T). What predicts a skipped token's similarity."""
    with torch.no_grad():
        return h.float().norm(dim=-1).clamp(min=1e-30).log()


def slot_weights(active: torch.Tensor, explore: Exploration | None) -> torch.Tensor:
    """(B, S) valid tokens each slot's similarity stands for: 1 per running token, 0 per inactive slot, a
    sampled skipped token its row's skipped count over its samples."""
    weights = active.float()
    if explore is None:
        return weights
    return torch.cat([weights, explore.ok * explore.weight.unsqueeze(1)], 1)


@torch.no_grad()
def measured_similarity(running: torch.Tensor, idx: torch.Tensor, active: torch.Tensor,
                        explore: Exploration | None, explored: torch.Tensor | None, seq_len: int):
    """(similarity, weight), each (B, T): the running slots' cos(h, F(h)) (B, K) at their positions idx (B, K),
    and the sample's (B, E) at its own.

    Slots with weight 0 are not measured: their similarity is +inf (above any cut, so labelled 'skip', as the
    router decided) and weight 0. A position may fill two slots (an inactive running slot and a sample); the
    measured one wins.
    """
    slots = idx if explore is None else torch.cat([idx, explore.idx], 1)  # (B, S): S = K + E
    cos = running if explore is None else torch.cat([running, explored], 1)
    weights = slot_weights(active, explore)
    cos = cos.float().masked_fill(weights == 0, float("inf"))
    B = slots.shape[0]
    similarity = cos.new_full((B, seq_len), float("inf")).scatter_reduce(1, slots, cos, "amin")
    weight = weights.new_zeros((B, seq_len)).scatter_reduce(1, slots, weights, "amax")
    return similarity, weight
