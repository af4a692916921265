"""Static KV cache for block-routed layers (``generate(cache_implementation="static")``, DESIGN.md §2.5).

The stock ``StaticLayer`` preallocates (B, H, max_cache_len, D) and writes the token at sequence index p to
column p. A block-routed layer stores only the tokens it ran, but in a static layout nothing needs packing:
``RoutedStaticLayer`` writes every token it ran to its own column, exactly where the stock layer would, and
keeps a preallocated (B, max_cache_len) validity mask, True where the row ran that token. Columns of tokens
the row skipped, of padding and of tokens not seen yet stay invalid, so the layer's query attends its valid
columns only. Memory is the stock static cache's (plus the mask): nothing is saved, nothing is ever moved.

A decode step writes one column per row at the step's position (valid where the row runs) with in-place
index ops at a tensor position, as the stock layer does: fixed shapes and fixed addresses, no host sync, no
Python state that changes per step. A prefill chunk books its packed tokens at their own columns (fillers
land in their own, invalid, columns: every row's packed positions are distinct).

Sliding-window static layers are not supported (refused when the cache is adopted).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from dlo.cache import checks_idle


class RoutedStaticLayer(StaticLayer):
    """Static cache of one block-routed layer: K/V at each token's sequence index, valid where the layer ran it."""

    is_croppable = False  # rolling back would need what each step stored, per row

    def __init__(self, max_cache_len: int, skip_idle_layers: bool | str = "auto", **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.skip_idle_layers = skip_idle_layers
        self.valid: torch.Tensor | None = None  # (B, max_cache_len) bool: column holds a token this layer ran
        self._places: torch.Tensor | None = None  # (B, K) columns a prefill chunk booked; None: a decode step

    # ---- what the routed layer reads ----------------------------------------------------
    @property
    def seen(self) -> torch.Tensor:
        """Tokens of the sequence seen so far, run or skipped: a 0-dim tensor, as the stock layer counts them."""
        return self.cumulative_length

    @property
    def slots(self) -> torch.Tensor | None:
        """(B, max_cache_len) long: the sequence index of each column, i.e. the column itself."""
        if self.valid is None:
            return None
        columns = torch.arange(self.max_cache_len, device=self.valid.device)
        return columns.expand(self.valid.shape[0], -1)

    @property
    def lengths(self) -> torch.Tensor | None:
        """(B,) tokens stored per row (None before the first forward)."""
        return None if self.valid is None else self.valid.sum(1)

    def checks_idle(self, device: torch.device) -> bool:
        return checks_idle(self.skip_idle_layers, device)

    # ---- what the routed layer calls ----------------------------------------------------
    def skip(self, batch: int, seq_len: int, device):
        """No token of this chunk runs the layer: nothing is stored, the position moves on."""
        self._ensure_rows(batch, device)
        self.cumulative_length.add_(seq_len)

    def reserve(self, idx: torch.Tensor, active: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Book the packed tokens (B, K) of a chunk of ``seq_len`` at their own columns; returns the chunk's
        sequence offset (0-dim tensor). active (B, K) bool: False for fillers and padding, left invalid."""
        self._ensure_rows(idx.shape[0], idx.device)
        offset = self.cumulative_length.clone()
        self._places = idx + offset  # (B, K)
        self._check_room(self._places)
        self.valid.scatter_(1, self._places, active)
        self._chunk = seq_len
        return offset

    def append_step(self, active: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """Book a decode step's column (the step's position) in every row, valid where the row runs (active (B, 1)
        bool, None: every row); returns the query's key mask (B, max_cache_len): the rows' valid columns."""
        self._ensure_rows(batch, device)
        if active is None:
            active = torch.ones(batch, 1, dtype=torch.bool, device=device)
        self.valid.index_copy_(1, self.cumulative_length.view(1), active)
        return self.valid

    def compact(self):
        """Nothing to trim: every column is the token's own."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the booked tokens' K/V (B, H, K, D) at their columns; return the whole (B, H, max_cache_len, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._places is None:  # a decode step: one column, the step's position
            column = self.cumulative_length.view(1)
            self.keys.index_copy_(2, column, key_states)
            self.values.index_copy_(2, column, value_states)
            self.cumulative_length.add_(1)
            return self.keys, self.values
        B, H, K, _ = key_states.shape
        index = self._places[:, None, :, None]  # (B, 1, K, 1)
        self.keys.scatter_(2, index.expand(B, H, K, self.keys.shape[-1]), key_states)
        self.values.scatter_(2, index.expand(B, H, K, self.values.shape[-1]), value_states)
        self.cumulative_length.add_(self._chunk)
        self._places = None
        return self.keys, self.values

    # ---- transformers' cache interface --------------------------------------------------
    def reset(self) -> None:
        super().reset()
        if self.valid is not None:
            self.valid.zero_()
        self._places = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a block-routed cache cannot be cropped (assisted/speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow their beams, in place (the tensors keep their addresses)."""
        beam_idx = beam_idx.to(self.valid.device)
        self.valid.copy_(self.valid.index_select(0, beam_idx))
        if self.is_initialized:
            self.keys.copy_(self.keys.index_select(0, beam_idx))
            self.values.copy_(self.values.index_select(0, beam_idx))

    def _ensure_rows(self, batch: int, device):
        if self.valid is None:
            self.valid = torch.zeros(batch, self.max_cache_len, dtype=torch.bool, device=device)
            self.cumulative_length = self.cumulative_length.to(device)
            if not torch.compiler.is_compiling():  # fixed addresses, as the stock layer marks its tensors
                torch._dynamo.mark_static_address(self.valid)
                torch._dynamo.mark_static_address(self.cumulative_length)

    def _check_room(self, places: torch.Tensor):
        """A prefill chunk past max_cache_len would be written nowhere (one host sync, prefill only)."""
        if int(places.max()) >= self.max_cache_len:
            raise ValueError(f"the static cache holds {self.max_cache_len} tokens per row; this chunk reaches "
                             f"sequence index {int(places.max())} (raise max_cache_len)")


def static_step_mask(valid: torch.Tensor, model_mask: torch.Tensor | None) -> torch.Tensor:
    """valid (B, max_cache_len) -> a decode query's mask: the model's own (B, 1, 1, max_cache_len) mask over the
    same columns (padding, causality: generate() hands a static cache's model a 4-D mask, no padding mask) where
    the layer ran the token; bool, or additive like the model's."""
    ran = valid[:, None, None, :]
    if model_mask is None:
        return ran
    if model_mask.dtype == torch.bool:
        return model_mask & ran
    return torch.where(ran, model_mask, torch.finfo(model_mask.dtype).min)


def route_static_cache(cache: StaticCache, routed_layers: Iterable[int], skip_idle_layers: bool | str = "auto"):
    """Make the given block-routed layers of a stock ``StaticCache`` ``RoutedStaticLayer``s, in place.

    Layers already routed stay as they are (generate() reuses its static cache between calls); a stock layer
    that holds tokens, or a sliding-window one, is refused.
    """
    for i in routed_layers:
        layer = cache.layers[i]
        if isinstance(layer, RoutedStaticLayer):
            continue
        if type(layer) is not StaticLayer:
            raise NotImplementedError(
                f"layer {i} uses a {type(layer).__name__} cache; a static cache under block routing supports "
                "full-attention layers (StaticLayer) only: use the dynamic cache (generate's default) for "
                "sliding-window layers"
            )
        if layer.is_initialized:
            raise ValueError(f"static cache layer {i} already holds tokens of a stock layer; pass an empty cache")
        cache.layers[i] = RoutedStaticLayer(layer.max_cache_len, skip_idle_layers=skip_idle_layers)
    return cache
