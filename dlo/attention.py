"""The attention of a packed batch: which layout and mask a block-routed layer hands the stock attention.

A block-routed layer runs the stock layer's own forward on a packed batch (B, K, d) of the tokens it runs; its
attention must be what those tokens would get in the full sequence, restricted to the running keys (docs/
DESIGN.md §3). Three paths, the first that applies is taken:

- ``causal``: each row's running tokens first, in position order, then its fillers; no mask. Plain causal
  attention is then exact for every running token (a filler only ever comes after them and its output is
  dropped), so SDPA takes its causal kernel and nothing of size K x K is built. It needs a full-attention layer,
  or a sliding window no distance within the chunk reaches (T <= window), and no cache to attend.
- ``positions``: a (B, 1, Kq, Kk) mask built from the sequence indices of the queries and keys: causal, the
  layer's window, the keys allowed. Linear in the tokens of the model's (B, 1, T, T) mask it replaces, and it
  never gathers rows of that mask (a (B, heads, K, T) tensor per layer).
- ``reference``: rows and columns of the model's own mask (``packed_attention_mask``). Any mask: packed
  sequences, custom 4-D masks. The other two are tested against it.

The first two need the model's mask to be exactly causal plus padding plus the layer's window: a mask the
model built from a 2-D padding mask, or from nothing.

Flash attention takes no 4-D mask at all: its packed batch is handed over as variable-length sequences (``flash``):
each row's running tokens first, one sequence per row of queries over the keys its row attends, its fillers a
second one (``flash_varlen``). Its sliding window counts slots of the packed batch, not sequence positions, so a
sliding layer runs under it only while no window can cut (the sequence no longer than the window).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import find_packed_sequence_indices

from dlo.errors import UserError

CAUSAL, POSITIONS, REFERENCE, FLASH = "causal", "positions", "reference", "flash"
# Implementations that apply causal attention by themselves when handed no mask.
CAUSAL_WITHOUT_MASK = ("sdpa",)
FLASH_IMPLEMENTATIONS = ("flash_attention_2",)
# What block routing runs: each tested against SDPA's routed model (flash attention through transformers' own
# integration, its kernel replaced by an exact torch reference: tests/test_flash_attention.py).
BLOCK_ATTENTION = ("sdpa", "eager", *FLASH_IMPLEMENTATIONS)
_NOT_SUPPORTED = {
    "flex_attention": "the model builds one BlockMask for the whole sequence and a packed batch would need its own",
    "flash_attention_3": "it shares flash_attention_2's integration, but its kernel has not been run with dlo",
    "flash_attention_4": "it has no variable-length decoding kernel in transformers yet",
}


def check_block_attention(implementation: str | None, samples_skipped: bool = False):
    """Refuse an attention implementation block routing does not run, naming the ones it does.

    samples_skipped: training runs a sample of skipped tokens inside the packed batch for their similarity
    (``similarity_source='packed'`` with similarity labels), whose attention pattern flash attention cannot express.
    """
    if implementation not in BLOCK_ATTENTION:
        why = _NOT_SUPPORTED.get(implementation, "not verified with block routing")
        raise UserError(f"granularity='block' runs attn_implementation in {BLOCK_ATTENTION}, got {implementation!r} "
                        f"({why}); load the model with one of them, or use granularity='mlp' (attention stays the "
                        "stock one)")
    if samples_skipped and implementation in FLASH_IMPLEMENTATIONS:
        raise UserError(f"attn_implementation={implementation!r} cannot run the sample of skipped tokens that "
                        "similarity_source='packed' adds to the packed batch (each sees the running keys before it "
                        "and itself: no variable-length layout); use similarity_source='dense', label='self', or "
                        "attn_implementation='sdpa'")


def layer_window(config, layer_index: int) -> int | None:
    """The sliding window the model's mask applies to decoder layer ``layer_index``, or None (full attention).

    As the supported models choose their masks: per layer from ``layer_types`` when the config has them (Qwen2,
    Qwen3, Gemma 2/3), else one mask for every layer, sliding when ``sliding_window`` is set (Mistral, Phi-3).
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_index] == "sliding_attention" else None
    return window


def packed_examples(position_ids: torch.Tensor | None, attention_mask) -> torch.Tensor | None:
    """(B, T) index of the example each token belongs to within its row, when the rows pack several examples; else
    None. As transformers decides it, with its own function: only without a padding mask (a 2-D mask given, the model
    attends across the examples), and only where position ids restart (an example's positions count up by one)."""
    if position_ids is None or attention_mask is not None or position_ids.shape[-1] == 1:  # a decode step: one token
        return None
    return find_packed_sequence_indices(position_ids)


def attention_path(config, layer_index: int, attention_mask, padding_mask, seq_len: int, cached: bool,
                   examples: bool = False) -> str:
    """Which of ``CAUSAL``, ``POSITIONS``, ``REFERENCE``, ``FLASH`` a routed layer's packed batch takes.

    attention_mask: the mask the model hands the layer; padding_mask: the (B, S) 2-D mask the model's mask was
    built from (None: none given); cached: the queries also attend a routed cache; examples: the rows pack several
    examples (``packed_examples``), which the model's mask keeps apart.
    """
    implementation = getattr(config, "_attn_implementation", None)
    check_block_attention(implementation)
    if implementation in FLASH_IMPLEMENTATIONS:
        if examples:
            raise UserError(f"block routing under attn_implementation={implementation!r} does not run rows that pack "
                            "several examples (position ids restarting within a row); use attn_implementation='sdpa'")
        return FLASH
    if examples:
        return POSITIONS  # the model's packed-sequence mask: causal within each example, rebuilt from positions
    if padding_mask is None and attention_mask is not None:
        return REFERENCE  # a 4-D mask of the caller's
    window = layer_window(config, layer_index)
    within_window = window is None or seq_len <= window
    if not cached and within_window and implementation in CAUSAL_WITHOUT_MASK:
        return CAUSAL
    return POSITIONS


def check_flash_window(config, layer_index: int, seq_len: int):
    """Refuse a chunk reaching sequence index ``seq_len`` - 1 on a sliding layer under flash attention, once the
    window could cut: flash attention would count the window in packed slots, which are not sequence positions."""
    window = layer_window(config, layer_index)
    if window is not None and seq_len > window:
        raise UserError(
            f"block-routed sliding-window layer {layer_index} under attn_implementation="
            f"{config._attn_implementation!r} runs sequences of up to its window ({window} tokens); this forward "
            f"reaches {seq_len}. Flash attention counts the window in packed slots, not sequence positions: use "
            "attn_implementation='sdpa' for longer sequences"
        )


def flash_varlen(query_ok: torch.Tensor, key_ok: torch.Tensor) -> dict:
    """Variable-length arguments of flash attention for a packed batch: queries (B, Kq) over keys (B, Kk).

    query_ok / key_ok: (B, Kq) / (B, Kk) bool, each row's attending tokens first (a prefix). The flattened batch is
    two sequences per row: its n_b queries over its k_b keys, causal from the bottom right (the queries are the
    row's last n_b keys: the chunk's own tokens, after those a cache stored), then its fillers over the rest
    (finite, dropped by a zero gate; a filler with no key gets zeros). Maximum lengths are the padded widths (an
    upper bound flash attention accepts), so nothing is read back to the host.
    """
    def bounds(ok: torch.Tensor) -> torch.Tensor:  # (B, W) -> (2B + 1,) int32 cumulative sequence starts
        B, width = ok.shape
        start = torch.arange(B, device=ok.device) * width
        cuts = torch.stack([start, start + ok.sum(1)], dim=1).flatten()
        return torch.cat([cuts, cuts.new_full((1,), B * width)]).to(torch.int32)

    return dict(cu_seq_lens_q=bounds(query_ok), cu_seq_lens_k=bounds(key_ok), max_length_q=query_ok.shape[1],
                max_length_k=key_ok.shape[1])


def running_first(idx: torch.Tensor, active: torch.Tensor, gate: torch.Tensor):
    """Reorder each row's packed slots (B, K) so its running ones come first, each group in position order."""
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices  # (B, K)
    return idx.gather(1, order), active.gather(1, order), gate.gather(1, order)


def position_mask(query_index: torch.Tensor, key_index: torch.Tensor, key_ok: torch.Tensor | None,
                  window: int | None, like: torch.Tensor | None, additive_dtype: torch.dtype | None = None,
                  examples: torch.Tensor | None = None):
    """Mask (B, 1, Kq, Kk) of queries at sequence indices ``query_index`` (B, Kq) over keys at ``key_index``
    (B, Kk): a key is attended when it is not later than the query, within the window (index > query - window),
    allowed by ``key_ok`` (B, Kk) bool (None: all are) and, when ``examples`` (B, T) gives each sequence index its
    packed example, of the query's example.

    Of the kind of the model's mask ``like`` (bool, or additive float); additive in ``additive_dtype`` when the
    model passed none and its attention needs one (eager), else bool.
    """
    query = query_index.unsqueeze(2)  # (B, Kq, 1)
    key = key_index.unsqueeze(1)  # (B, 1, Kk)
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    if key_ok is not None:
        allowed &= key_ok.unsqueeze(1)
    if examples is not None:
        allowed &= examples.gather(1, query_index).unsqueeze(2) == examples.gather(1, key_index).unsqueeze(1)
    dtype = like.dtype if like is not None else additive_dtype
    return _mask_of_kind(allowed.unsqueeze(1), None if dtype == torch.bool else dtype)


def packed_attention_mask(full_mask, idx, key_slots, key_ok, offset: int = 0, first_column: int = 0):
    """Attention mask of packed queries over packed keys, from rows and columns of the model's mask (reference).

    full_mask: the model's mask for the chunk, (B, h, T, offset + T - first_column) bool (True = attend) or
    additive float, column j for sequence position first_column + j (a sliding-window mask over a cache
    starts at the window's first position); or None (plain causal attention: every key is in any window).
    idx: (B, Kq) chunk positions of the queries. key_slots: (B, Kk) sequence positions of the keys
    (``idx`` itself without a cache; none that ``key_ok`` allows lies below ``first_column``). key_ok:
    (B, Kk) bool, False for keys never to attend (fillers, padding, empty cache slots), or None (all
    fine). offset: tokens seen before this chunk.
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
        columns = (key_slots - first_column).clamp(min=0)  # empty cache slots hold stale indices; key_ok hides them
        sub = rows.gather(3, columns[:, None, None, :].expand(B, heads, Kq, Kk))  # (B, h, Kq, Kk)
        allowed = sub if sub.dtype == torch.bool else sub == 0
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, None, :]
    return _mask_of_kind(allowed, None if full_mask is None or full_mask.dtype == torch.bool else full_mask.dtype)


def _mask_of_kind(allowed: torch.Tensor, additive_dtype: torch.dtype | None) -> torch.Tensor:
    """allowed (B, h, Kq, Kk) bool -> the mask handed to attention: bool, or additive in ``additive_dtype``.

    A query that may attend nothing (padding, filler) gets NaN from some kernels; it sees key 0 instead (a finite
    vector: zeros or a filler's key). Its output is discarded by a zero gate.
    """
    allowed[..., 0] |= ~allowed.any(-1)
    if additive_dtype is None:
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(additive_dtype).min).to(additive_dtype)


def step_attention_mask(key_ok: torch.Tensor, model_mask: torch.Tensor | None) -> torch.Tensor:
    """key_ok (B, L) bool -> the (B, 1, 1, L) mask of a decode step's single query over its layer's cache columns.

    The cache already leaves out padding, later tokens and (sliding layers) tokens out of the window, so key_ok is
    the whole mask; it takes the kind of the model's mask (bool, or additive float), bool when the model passes none.
    """
    allowed = key_ok.view(key_ok.shape[0], 1, 1, key_ok.shape[1])  # one op: a decode step pays it per layer
    if model_mask is None or model_mask.dtype == torch.bool:
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(model_mask.dtype).min).to(model_mask.dtype)
