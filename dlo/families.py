"""The model families dlo supports, and the checks that refuse every other model before it runs.

A family is one transformers ``model_type`` with its decoder layer class. Each one listed here is tested
end to end on CPU with tiny random models of its real structure (tests/test_families.py): expansion
(in memory and streamed from disk), block routing (and mlp routing where marked) against the stock layer
and a per-token reference, training, cached generation against cache-free forwards, static export.

Block routing runs the stock decoder layer's own forward on a packed batch, so it needs a layer that takes
its positions only as ``position_ids`` / ``position_embeddings`` (cos, sin) and its mask as a 4-D
``attention_mask``, and a model that hands every layer the mask of its attention kind (full or sliding
window). ``mlp`` routing re-implements the layer's second half as ``x + mlp(post_attention_layernorm(x))``,
which is right only for layers that are exactly pre-norm attention then pre-norm MLP, each added to the
residual, nothing else (no post-norms, no residual scaling or dropout).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dlo.errors import UserError


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type
    decoder_layer: str  # the stock decoder layer class, module path included
    mlp_routable: bool  # the layer is exactly pre-norm attention + pre-norm MLP

    @property
    def layer_name(self) -> str:
        return self.decoder_layer.rpartition(".")[2]


def _family(model_type: str, module: str, layer: str, mlp_routable: bool) -> Family:
    return Family(model_type, f"transformers.models.{module}.modeling_{module}.{layer}", mlp_routable)


# Order matters only for messages. What each family's tests keep of the real checkpoints: README's support table.
FAMILIES = (
    _family("llama", "llama", "LlamaDecoderLayer", True),  # Llama 2, Llama 3.x
    _family("mistral", "mistral", "MistralDecoderLayer", True),  # Mistral 7B v0.1 (sliding window), v0.3
    _family("qwen2", "qwen2", "Qwen2DecoderLayer", True),  # Qwen2, Qwen2.5
    _family("qwen3", "qwen3", "Qwen3DecoderLayer", True),  # Qwen3 dense
    _family("gemma", "gemma", "GemmaDecoderLayer", True),
    _family("gemma2", "gemma2", "Gemma2DecoderLayer", False),  # sandwich norms
    _family("gemma3_text", "gemma3", "Gemma3DecoderLayer", False),  # sandwich norms; Gemma3ForCausalLM
    _family("phi3", "phi3", "Phi3DecoderLayer", False),  # residual dropout; Phi-3, Phi-4-mini
    _family("olmo2", "olmo2", "Olmo2DecoderLayer", False),  # post-norms
)
MODEL_TYPES = tuple(f.model_type for f in FAMILIES)
_BY_LAYER = {f.decoder_layer: f for f in FAMILIES}


def check_causal_lm(config, class_name: str | None = None):
    """Refuse a model that is not the causal LM (``class_name``, else ``config.architectures``) of a supported family.

    The model class matters as well as the model type: a multimodal model can hold a supported text decoder
    whose inputs (image tokens, their masks) dlo has not verified.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise UserError(f"unsupported architecture model_type={model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    names = [class_name] if class_name else list(getattr(config, "architectures", None) or [])
    if names and not any(name.endswith("ForCausalLM") for name in names):
        raise UserError(f"{names[0]} is not a causal LM (*ForCausalLM): dlo works on the full decoder with its "
                        "LM head")


def check_routable(layer: nn.Module, layer_index: int, granularity: str):
    """Refuse to route a decoder layer dlo has not verified, or ``mlp`` routing of a layer it does not fit."""
    cls = type(layer)
    family = _BY_LAYER.get(f"{cls.__module__}.{cls.__qualname__}")
    if family is None:
        supported = ", ".join(f"{f.model_type} ({f.layer_name})" for f in FAMILIES)
        raise UserError(f"layer {layer_index} is a {cls.__name__}, which dlo has not verified for routing; "
                        f"supported: {supported}")
    if granularity == "mlp" and not family.mlp_routable:
        verified = ", ".join(f.layer_name for f in FAMILIES if f.mlp_routable)
        raise UserError(
            f"granularity='mlp' is not verified for layer {layer_index} ({family.layer_name}): it needs a layer that "
            f"is exactly pre-norm attention then pre-norm MLP, verified for {verified}; use granularity='block', "
            "which runs the stock layer's own forward"
        )
    config = getattr(layer, "config", None) or getattr(getattr(layer, "self_attn", None), "config", None)
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        raise UserError(f"layer {layer_index} ({family.layer_name}) attends bidirectionally; routing needs causal "
                        "attention (a token's decision may not depend on later tokens)")
