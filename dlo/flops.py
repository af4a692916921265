"""Analytic forward FLOPs per token of a Llama-family decoder (DESIGN.md §4).

Convention: one multiply-add = 2 FLOPs; only matrix products count (norms, rotary, softmax,
activations, residual adds, gather/scatter are left out: they are O(d) per token, not O(d²)).
With d = hidden size, d_q = heads · head_dim (= d for Llama), d_kv = kv_heads · head_dim,
d_ff = intermediate size, V = vocabulary, and a sequence of T tokens:

- attention projections  2·d·(d_q + 2·d_kv) + 2·d_q·d      (q, k, v, then o)
- attention scores       causal, averaged over the T positions: the token at position t
                         (1-based) scores and mixes t keys, 4·d_q·t FLOPs (QKᵀ plus AV), so the
                         mean per token is 4·d_q·(T+1)/2 = 2·d_q·(T+1)
- MLP                    6·d·d_ff                             (gate, up, down)
- router                 2·d                                  (routed layers only, every token)
- lm_head                2·d·V per token; the embedding lookup costs no FLOPs

A routed layer at capacity c (share of tokens that run) with ``block`` granularity runs its
projections and MLP on c·T tokens, and attention among those K = c·T tokens only: scores cost
4·d_q·K(K+1)/2 over the sequence, i.e. 2·d_q·c·(c·T+1) per token of the sequence (∝ c², and
equal to the dense term at c = 1). With ``mlp`` granularity only the MLP scales with c.
Training costs about 3× these forward numbers (backward ≈ 2× forward); they are not reported.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("router", "attn_proj", "attn_scores", "mlp")


@dataclass(frozen=True)
class Dims:
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> Dims:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(hidden=config.hidden_size, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,
                   intermediate=config.intermediate_size, vocab=config.vocab_size)


def layer_flops(dims: Dims, seq_len: float, capacity: float = 1.0, granularity: str | None = None) -> dict[str, float]:
    """FLOPs per token of the sequence for one decoder layer, split by part, plus ``total``.

    ``granularity`` None means an unrouted (dense) layer; "block" or "mlp" a routed one running
    ``capacity`` of the tokens.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be > 0")
    if not (0.0 <= capacity <= 1.0):
        raise ValueError(f"capacity={capacity}: must be in [0, 1]")
    if granularity not in (None, "block", "mlp"):
        raise ValueError(f"granularity={granularity!r}: expected None, 'block' or 'mlp'")
    d, dq, dkv = dims.hidden, dims.q_dim, dims.kv_dim
    proj = 2.0 * d * (dq + 2 * dkv) + 2.0 * dq * d
    mlp = 6.0 * d * dims.intermediate
    parts = {"router": 0.0, "attn_proj": proj, "attn_scores": 2.0 * dq * (seq_len + 1), "mlp": mlp}
    if granularity is not None:
        c = capacity
        parts["router"] = 2.0 * d
        parts["mlp"] = c * mlp
        if granularity == "block":
            parts["attn_proj"] = c * proj
            parts["attn_scores"] = 2.0 * dq * c * (c * seq_len + 1)
    parts["total"] = sum(parts[p] for p in PARTS)
    return parts


def lm_head_flops(dims: Dims) -> float:
    return 2.0 * dims.hidden * dims.vocab


def model_flops(config, seq_len: float, routed: dict[int, float] | None = None, granularity: str = "block",
                num_layers: int | None = None) -> dict:
    """Per-layer and total FLOPs per token for a stack of ``num_layers`` (default: the config's).

    ``routed`` maps layer index -> capacity for routed layers (others run dense).
    Returns {"layers": [per-layer parts], "decoder": sum over layers, "lm_head": ..., "total": ...}.
    """
    dims = Dims.from_config(config)
    n = config.num_hidden_layers if num_layers is None else num_layers
    routed = routed or {}
    layers = [layer_flops(dims, seq_len, routed[i], granularity) if i in routed else layer_flops(dims, seq_len)
              for i in range(n)]
    decoder = sum(layer["total"] for layer in layers)
    head = lm_head_flops(dims)
    return {"layers": layers, "decoder": decoder, "lm_head": head, "total": decoder + head}


def routed_over_dense_ratio(model, seq_len: float, capacities: list[float] | None = None) -> float:
    """Forward FLOPs per token of a routed ``model`` over the same model with every layer dense.

    capacities: one per routed layer (e.g. realised in training); default their target capacities.
    """
    from dlo.modeling import routed_layers

    layers = routed_layers(model)
    capacities = [layer.target_capacity for layer in layers] if capacities is None else capacities
    routed = {layer.layer_index: float(c) for layer, c in zip(layers, capacities)}
    config = model.config
    total = model_flops(config, seq_len, routed, model.dlo_routing_config.granularity)["total"]
    return total / model_flops(config, seq_len)["total"]


def base_num_layers(config) -> int:
    """Depth of the model before dlo's expansion (config.dlo_expansion), else the current depth."""
    expansion = getattr(config, "dlo_expansion", None) or {}
    return int(expansion.get("base_num_layers", config.num_hidden_layers))


def flop_unit(value: float) -> tuple[float, str]:
    """(divisor, name) that prints ``value`` FLOPs with a few digits before the point."""
    for divisor, name in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if value >= divisor:
            return divisor, name
    return 1.0, "FLOP"
