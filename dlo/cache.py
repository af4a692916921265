"""KV cache for block-routed models (DESIGN.md §2.5).

A block-routed layer runs only the tokens its router selects, so it must keep keys/values of
those tokens only: per layer and per row the stored lengths differ. ``RoutedCache`` is a
``DynamicCache`` whose block-routed layers are ``RoutedLayer``s (``RoutedSlidingLayer``s where the
layer attends a sliding window); the other layers are stock.

A ``RoutedLayer`` keeps, per row, the tokens it ran packed to the left and padded to the longest
row: keys/values (B, H, L, D), ``valid`` (B, L) (slot holds a token) and ``slots`` (B, L) (the
token's index in the sequence, i.e. its column in the model's 2-D attention mask), so a query
knows which stored keys precede it. ``get_seq_length()`` reports tokens *seen*, since positions
and the model's masks derive from it; ``lengths`` (B,) is what the layer stored.

Protocol with the routed layer, per forward: ``skip(B, T)`` when no token of the chunk runs;
else ``reserve(idx, active, T)`` books places for the selected tokens before attention runs (so
the mask can cover them), and attention's ``update(k, v)`` writes their keys/values there.

Decode steps (one new token per row) take another path, at fixed shapes and with no host sync:
``append_step(active)`` gives every row one new column, valid where the row runs the layer (the
rows that skip run masked, their K/V land in an invalid column), and returns the key mask of the
step's query. Such columns are trimmed in bulk (``compact``, one host sync) every
``COMPACT_EVERY`` steps, and before a chunk of several tokens is booked. A decode step costs the layer as
few ops as it can: the decode columns' sequence indices are the same in every row, so they are kept as a
number until something reads them, and a cache with every column valid keeps no validity tensor at all
(a forced run without padding then adds no op to the stock layer's).

Sliding-window layers: a query at sequence index p attends the keys at indices (p - window, p]; the
window counts sequence indices (padding included, as the model's mask does), not stored tokens.
``RoutedSlidingLayer`` reports the stock sliding layer's mask sizes, so the model's sliding mask
has the same columns whichever sliding layer it is sized from. Before booking a chunk it drops,
per row, the stored tokens that no query of this chunk or a later one can attend, so a row holds
at most window - 1 tokens plus those of the last chunk, like the stock sliding cache.
A decode step marks the tokens that left the window invalid instead (no sync); compaction drops
them, so a row holds at most window - 1 + ``COMPACT_EVERY`` columns.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

# Decode steps between two compactions of a routed layer's columns: a host sync per layer that often, and at
# most this many invalid columns (those of rows that skipped) per row kept in between.
COMPACT_EVERY = 64


def checks_idle(skip_idle_layers: bool | str, device: torch.device) -> bool:
    """Whether a decode step reads on the host if any row runs a layer: True always, False never, "auto" where
    that read is no sync (CPU tensors)."""
    if skip_idle_layers == "auto":
        return device.type == "cpu"
    return bool(skip_idle_layers)


class RoutedLayer(DynamicLayer):
    """Cache of one block-routed layer: K/V of the tokens it ran, per row, padded to the longest row."""

    is_croppable = False  # rolling back would need the per-row history of what each step stored

    def __init__(self, skip_idle_layers: bool | str = "auto", **kwargs):
        super().__init__(**kwargs)
        # Whether a decode step reads on the host if any row runs the layer, to skip its weights when none does:
        # True always, False never (no host sync, fixed shapes), "auto" where that read is no sync (CPU tensors).
        self.skip_idle_layers = skip_idle_layers
        self._clear()

    def _clear(self):
        self.seen = 0  # tokens of the sequence seen so far, run or skipped
        self.width = 0  # columns stored per row (what the keys/values hold once written)
        # (B, width) bool, slot holds a token; None: every column of every row does ("full": no mask needed).
        self._valid: torch.Tensor | None = None
        # (B, w) long sequence index of the stored token for the first w columns; the columns after them were
        # appended by decode steps in a row (``_tail_start``, +1, ...): the same for every row, so kept as a number.
        self._slots: torch.Tensor | None = None
        self._tail_start = 0
        self._places: torch.Tensor | None = None  # (B, K) columns booked for the next update
        self._step_pending = False  # append_step() booked one column per row for the next update
        self.appended = 0  # decode columns appended since the last compaction

    @property
    def full(self) -> bool:
        """Every row stores as many tokens and every column holds one: a query may attend all unmasked."""
        return self._valid is None

    @property
    def valid(self) -> torch.Tensor | None:
        """(B, L) bool: slot holds a token (None before the first forward)."""
        if self._slots is None or self._valid is not None:
            return self._valid
        return torch.ones(self._slots.shape[0], self.width, dtype=torch.bool, device=self._slots.device)

    @property
    def slots(self) -> torch.Tensor | None:
        """(B, L) long: sequence index of each stored token (stale in empty slots; None before the first forward)."""
        tail = self.width - (0 if self._slots is None else self._slots.shape[1])
        if tail == 0:
            return self._slots
        steps = torch.arange(self._tail_start, self._tail_start + tail, device=self._slots.device)
        return torch.cat([self._slots, steps.expand(self._slots.shape[0], tail)], dim=1)

    def _set_columns(self, valid: torch.Tensor, slots: torch.Tensor, full: bool):
        """Store materialised (B, L) validity and sequence indices (``full``: every column valid)."""
        self._valid = None if full else valid
        self._slots = slots
        self.width = slots.shape[1]

    @property
    def lengths(self) -> torch.Tensor | None:
        """(B,) tokens stored per row (None before the first forward); derived, so a decode step need not keep it."""
        valid = self.valid
        return None if valid is None else valid.sum(1)

    # ---- what the model reads -----------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The model's mask spans every token seen (columns = sequence index), not what is stored.
        return self.seen + query_length, 0

    # ---- what the routed layer calls ----------------------------------------------------
    def skip(self, batch: int, seq_len: int, device):
        """No token of this chunk runs the layer: nothing is stored."""
        self._ensure_rows(batch, device)
        self._materialise_slots()  # the decode columns' sequence indices stop being consecutive
        self.seen += seq_len

    def reserve(self, idx: torch.Tensor, active: torch.Tensor, seq_len: int) -> int:
        """Book columns for the packed tokens of a chunk of ``seq_len``; returns the chunk's sequence offset.

        idx: (B, K) chunk positions of the packed tokens; active: (B, K) bool, False for fillers and
        padding. Active tokens go right after the row's stored ones, in their packed order; the
        others land beyond the row's new length, in columns marked invalid, so they clobber nothing.
        """
        B, K = idx.shape
        offset = self.seen
        self._ensure_rows(B, idx.device)
        self._before_booking()
        count = active.sum(1, keepdim=True)  # (B, 1)
        rank = torch.where(active, active.cumsum(1) - 1, count + (~active).cumsum(1) - 1)  # (B, K): actives first
        stored = self.lengths  # (B,) before booking
        lengths = stored + count.squeeze(1)  # (B,) after booking
        places = stored.unsqueeze(1) + rank  # (B, K)
        width = self.width + K  # room for every booked column, fillers included
        valid = _pad_columns(self.valid, width, False).scatter(1, places, active)
        slots = _pad_columns(self.slots, width, 0).scatter(1, places, idx + offset)
        # One host sync (inference only): trim storage to the longest row, and note whether every row is
        # as long, i.e. every stored slot holds a token (a single query may then attend all unmasked).
        shortest, longest = torch.stack(torch.aminmax(lengths)).tolist()
        self._set_columns(valid[:, :longest], slots[:, :longest], shortest == longest)
        self._places = places
        self.seen += seq_len
        return offset

    def checks_idle(self, device: torch.device) -> bool:
        """Whether a decode step should read on the host if any row runs (see ``skip_idle_layers``)."""
        return checks_idle(self.skip_idle_layers, device)

    def append_step(self, active: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """Book one column per row for a decode step's token; returns the query's key mask (B, L) bool, or None.

        active: (B, 1) bool, the rows that run the layer (None: every row). Every row gets the new column
        (fixed shapes, no host sync); it is valid where the row runs, and the key mask is the new validity: a row
        that skips attends its stored tokens only, and may attend none (its output is discarded, never mixed in).
        None means nothing is to hide (every row runs and every column is valid): then nothing is computed here.
        """
        self._ensure_rows(batch, device)
        if self.appended >= COMPACT_EVERY:
            self.compact()
        if self.width == self._slots.shape[1]:
            self._tail_start = self.seen  # the first of a run of decode columns
        kept = self._window_valid()  # None: every stored column may be attended
        self.width += 1
        self.seen += 1
        self.appended += 1
        self._step_pending = True
        if kept is None and active is None:
            return None
        if active is None:
            active = torch.ones(batch, 1, dtype=torch.bool, device=device)
        if kept is None:
            kept = torch.ones(batch, self.width - 1, dtype=torch.bool, device=device)
        self._valid = torch.cat([kept, active], dim=1)
        return self._valid

    def _before_booking(self):
        """Booking packs after each row's stored tokens: close the gaps decode steps left."""
        if self.appended:
            self.compact()

    def _window_valid(self) -> torch.Tensor | None:
        """(B, L) validity of the stored columns the next query may attend (all of them: no window); None: all."""
        return self._valid

    def _materialise_slots(self):
        if self._slots is not None and self.width > self._slots.shape[1]:
            self._slots = self.slots

    def compact(self):
        """Pack each row's valid columns to the left and trim to the longest row: one host sync."""
        self.appended = 0
        if self._slots is None:
            return
        if self._valid is None:  # nothing to pack
            self._materialise_slots()
            return
        valid = self._valid
        shortest, longest = torch.stack(torch.aminmax(valid.sum(1))).tolist()
        columns = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :longest]  # (B, longest)
        self._set_columns(valid.gather(1, columns), self.slots.gather(1, columns), shortest == longest)
        if self.is_initialized:
            self.keys, self.values = _gather_columns(self.keys, columns), _gather_columns(self.values, columns)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the booked tokens' K/V (B, H, K, D); return the layer's stored K/V (B, H, L, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._step_pending:  # a decode step: every row's new column comes last
            self._step_pending = False
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values
        if self._places is None:
            raise RuntimeError("RoutedLayer.update without reserve(): block-routed layers book their tokens first")
        self.keys = _write(self.keys, key_states, self._places, self.width)
        self.values = _write(self.values, value_states, self._places, self.width)
        self._places = None
        return self.keys, self.values

    # ---- transformers' cache interface --------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.is_initialized = True

    def reset(self) -> None:
        super().reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a block-routed cache cannot be cropped (assisted/speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._slots is not None:
            rows = torch.arange(self._slots.shape[0], device=self._slots.device)  # (B,)
            self._select_rows(rows.repeat_interleave(repeats))

    def _select_rows(self, rows: torch.Tensor):
        if self._slots is None:
            return
        rows = rows.to(self._slots.device)
        self._slots = self._slots[rows]  # the decode columns' indices are the same in every row
        if self._valid is not None:  # rows taken from a full cache are full
            self._valid = self._valid[rows]
        if self.is_initialized:
            self.keys, self.values = self.keys[rows], self.values[rows]

    def _ensure_rows(self, batch: int, device):
        if self._slots is None:
            self._set_columns(torch.zeros(batch, 0, dtype=torch.bool, device=device),
                              torch.zeros(batch, 0, dtype=torch.long, device=device), True)


def _pad_columns(x: torch.Tensor, width: int, fill) -> torch.Tensor:
    """(B, L) -> (B, width), new columns set to ``fill``."""
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), fill)], dim=1)


def _write(store: torch.Tensor, new: torch.Tensor, places: torch.Tensor, length: int) -> torch.Tensor:
    """store (B, H, L, D), new (B, H, K, D), places (B, K) -> (B, H, length, D) with new written at places."""
    B, H, K, D = new.shape
    width = store.shape[2] + K  # every booked column fits (places < old length + K)
    grown = torch.cat([store, store.new_zeros(B, H, width - store.shape[2], D)], dim=2)
    grown.scatter_(2, places[:, None, :, None].expand(B, H, K, D), new)
    return grown[:, :, :length]


class RoutedSlidingLayer(RoutedLayer):
    """Cache of one block-routed sliding-window layer: per row, the tokens it ran that are still in the window."""

    is_sliding = True

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(**kwargs)
        self.sliding_window = sliding_window

    def _window_valid(self) -> torch.Tensor | None:
        # The query at sequence index `seen` attends indices (seen - window, seen]: the older tokens leave.
        first = self.seen - self.sliding_window + 1
        if first <= 0:
            return self._valid
        return self.valid & (self.slots >= first)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # As the stock sliding layer: the mask's columns are the sequence indices from the first one any query
        # of the chunk can attend to the chunk's last token.
        first = max(self.seen - self.sliding_window + 1, 0)
        return self.seen + query_length - first, first

    def get_max_length(self) -> int:
        return self.sliding_window

    def _before_booking(self):
        super()._before_booking()
        self._drop_before(self.seen - self.sliding_window + 1)

    def _drop_before(self, first: int):
        """Drop, per row, the stored tokens at sequence indices below ``first`` (they lead each row)."""
        if self._slots is None or first <= 0:
            return
        slots, valid = self.slots, self.valid
        drop = ((slots < first) & valid).sum(1)  # (B,)
        kept = valid.sum(1) - drop
        most, longest = torch.stack([drop.max(), kept.max()]).tolist()  # one host sync
        if most == 0:
            return
        columns = (torch.arange(longest, device=drop.device) + drop.unsqueeze(1)).clamp(max=slots.shape[1] - 1)
        self._set_columns(torch.arange(longest, device=drop.device) < kept.unsqueeze(1), slots.gather(1, columns),
                          False)
        if self.is_initialized:
            self.keys, self.values = _gather_columns(self.keys, columns), _gather_columns(self.values, columns)


def _gather_columns(store: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """store (B, H, L, D), columns (B, L') -> (B, H, L', D): per row, the stored tokens at ``columns``."""
    B, H, _, D = store.shape
    return store.gather(2, columns[:, None, :, None].expand(B, H, columns.shape[1], D))


class RoutedCache(DynamicCache):
    """``DynamicCache`` in which the given block-routed layers keep only the tokens they ran."""

    def __init__(self, config, routed_layers: Iterable[int], skip_idle_layers: bool | str = "auto"):
        super().__init__(config=config)
        self._route_layers(routed_layers, skip_idle_layers)

    @classmethod
    def adopt(cls, cache: DynamicCache, routed_layers: Iterable[int]) -> RoutedCache:
        """Turn an empty stock ``DynamicCache`` into a RoutedCache in place (the caller keeps its object)."""
        if type(cache) is not DynamicCache or cache.get_seq_length() > 0:
            raise ValueError(f"only an empty DynamicCache can become a RoutedCache, got {type(cache).__name__}")
        cache.__class__ = cls
        cache._route_layers(routed_layers)
        return cache

    def _route_layers(self, routed_layers: Iterable[int], skip_idle_layers: bool | str = "auto"):
        for i in routed_layers:
            stock = self.layers[i]
            if type(stock) is DynamicLayer:
                self.layers[i] = RoutedLayer(skip_idle_layers=skip_idle_layers)
            elif type(stock) is DynamicSlidingWindowLayer:
                self.layers[i] = RoutedSlidingLayer(stock.sliding_window, skip_idle_layers=skip_idle_layers)
            else:
                raise NotImplementedError(
                    f"layer {i} uses a {type(stock).__name__} cache; block routing supports full-attention "
                    "(DynamicLayer) and sliding-window (DynamicSlidingWindowLayer) layers"
                )

    def compact(self):
        """Trim every routed layer's columns left by decode steps (one host sync per routed layer)."""
        for layer in self.layers:
            if isinstance(layer, RoutedLayer):
                layer.compact()

    def stored_lengths(self, layer_idx: int) -> torch.Tensor | None:
        """(B,) tokens each row stored at ``layer_idx`` (None before the first forward)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, RoutedLayer):
            return layer.lengths
        if layer.get_seq_length() == 0:
            return None
        keys = layer.keys
        return torch.full((keys.shape[0],), keys.shape[-2], dtype=torch.long, device=keys.device)
