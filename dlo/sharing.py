"""Shared-weight repetitions of decoder layers (docs/DESIGN.md §2.1): a layer run twice, stored once.

A repetition is its own module tree (its own ``layer_idx``, hence its own KV-cache layer, its own router
and, under peft, its own adapters) whose parameters are the very ``Parameter`` objects of the layer it
repeats: one tensor in memory and in the optimizer, gradients of every use summed into it by autograd.
Only its two residual writers differ: ``self_attn.o_proj`` and ``mlp.down_proj`` become
:class:`ScaledProjection` (the shared weight, its output multiplied per channel by the repetition's own
``self_attn.residual_scale.weight`` and ``mlp.residual_scale.weight``). For a pre-norm layer with input h,

    x = h + s_a ⊙ o_proj(attn(norm_1(h))),    y = x + s_m ⊙ down_proj(mlp(norm_2(x))),

so s_a = s_m = 0 is the exact identity (what zeroing o_proj and down_proj does for a copy) and 1 the layer
itself; a scale on a projection's rows folds exactly into a materialised copy's weight (``fold_scales``).

In a checkpoint the repetition's shared tensors are left out (``config.dlo_repetitions`` lists which layer
each repetition reuses) and tied back on load through transformers' own tied-weights mechanism.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from dlo.errors import UserError
from dlo.families import FAMILIES

# The residual writers a repetition scales: {branch module: its output projection}, relative to the decoder layer.
SCALED_PROJECTIONS = {"self_attn": "o_proj", "mlp": "down_proj"}
SCALE = "residual_scale"
CONFIG_KEY = "dlo_repetitions"
# Families whose layers are exactly pre-norm attention then pre-norm MLP, each added to the residual: scaling
# o_proj/down_proj scales the branch (a post-norm, as in Gemma 2, would normalise the scale away).
SHAREABLE_LAYERS = tuple(f.decoder_layer for f in FAMILIES if f.mlp_routable)


class ResidualScale(nn.Module):
    """A branch's per-channel scale (d,): a module, so peft's ``modules_to_save`` can train it."""

    def __init__(self, size: int, value: float, like: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), float(value), dtype=like.dtype, device=like.device))

    def forward(self, y):
        return y * self.weight


class ScaledProjection(nn.Linear):
    """A repetition's o_proj/down_proj: the repeated layer's weight (and bias), its output scaled by the branch's
    ``residual_scale``, which the branch module (self_attn, mlp) holds.

    The scale is the branch's child, not this projection's: peft may wrap this projection in a LoRA layer and the
    scale in a ``modules_to_save`` copy, which it refuses inside a LoRA layer. The projection finds the scale
    through its branch at each call, so it always applies the copy peft made active.
    """

    def __init__(self, linear: nn.Linear, branch: nn.Module):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.__dict__["_branch"] = branch  # a reference, not a submodule (the branch is this module's parent)

    def forward(self, x):
        return getattr(self._branch, SCALE)(super().forward(x))

    def active_scale(self) -> torch.Tensor:
        """(out_features,) fp32: the scale this projection applies now."""
        return getattr(self._branch, SCALE)(torch.ones(self.out_features, device=self.weight.device)).float()


def check_shareable(layer: nn.Module, index: int):
    """Refuse a layer whose residual writers are not exactly o_proj and down_proj added to the residual."""
    cls = type(layer)
    if f"{cls.__module__}.{cls.__qualname__}" not in SHAREABLE_LAYERS:
        names = ", ".join(name.rpartition(".")[2] for name in SHAREABLE_LAYERS)
        raise UserError(f"layer {index} is a {cls.__name__}: shared repetitions are verified for {names} (pre-norm "
                        "attention and MLP, each added to the residual); use shared=false (copies)")


def repeat_layer(layer: nn.Module, index: int, scale: float) -> nn.Module:
    """A repetition of ``layer`` at decoder position ``index``: new modules, the same parameters, its residual
    writers scaled by ``scale`` (0: identity, 1: the layer)."""
    shared = {id(t): t for t in [*layer.parameters(), *layer.buffers()]}
    shared.update({id(m.config): m.config for m in layer.modules() if getattr(m, "config", None) is not None})
    repetition = copy.deepcopy(layer, memo=shared)
    for module in (repetition, repetition.self_attn):
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    for branch_name, projection in SCALED_PROJECTIONS.items():
        branch = getattr(repetition, branch_name)
        linear = getattr(branch, projection)
        setattr(branch, SCALE, ResidualScale(linear.out_features, scale, linear.weight))
        setattr(branch, projection, ScaledProjection(linear, branch))
    return repetition


def repetition_map(plan_layers) -> dict[int, int]:
    """{repetition position: position of the layer it reuses} of a layer map (the first use of its base layer)."""
    first, reuses = {}, {}
    for j, spec in enumerate(plan_layers):
        if spec.is_new:
            reuses[j] = first[spec.base_index]
        first.setdefault(spec.base_index, j)
    return reuses


def share_layers(layers: nn.ModuleList, reuses: dict[int, int], scales: dict[int, float]):
    """Replace ``layers[j]`` by a repetition of ``layers[reuses[j]]`` (scale ``scales[j]``), in place."""
    for j, k in sorted(reuses.items()):
        check_shareable(layers[k], k)
        layers[j] = repeat_layer(layers[k], j, scales[j])


def config_record(reuses: dict[int, int], base_architecture: str) -> dict:
    """What ``config.dlo_repetitions`` holds: enough to rebuild the sharing before any weight is read."""
    return {"layers": [{"layer": j, "reuses": k} for j, k in sorted(reuses.items())],
            "base_architecture": base_architecture}


def reuses_of(record: dict) -> dict[int, int]:
    return {int(entry["layer"]): int(entry["reuses"]) for entry in record["layers"]}


def shared_keys(model, layers_prefix: str, reuses: dict[int, int]) -> dict[str, str]:
    """{key of a repetition's tensor: key of the tensor it is}: what a checkpoint leaves out and ties back."""
    layers = model.get_submodule(layers_prefix)
    keys = {}
    for j, k in reuses.items():
        source = {id(p): name for name, p in layers[k].named_parameters(remove_duplicate=False)}
        for name, p in layers[j].named_parameters(remove_duplicate=False):
            if id(p) in source:
                keys[f"{layers_prefix}.{j}.{name}"] = f"{layers_prefix}.{k}.{source[id(p)]}"
    return keys


_SCALE_KEY = re.compile(rf"^(.*)\.({'|'.join(SCALED_PROJECTIONS)})\.{SCALE}\.weight$")


def fold_scales(state: dict[str, torch.Tensor], keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``state`` without residual scales: each scaled projection's weight rows (and bias) multiplied by its scale,
    in the weight's dtype (new tensors; the rest is ``state``'s own). ``diag(s) (W x + b) = (diag(s) W) x + s ⊙ b``.
    Scales under a key prefix in ``keep`` (repetitions that stay shared) stay as they are."""
    out = dict(state)
    for key, scale in state.items():
        match = _SCALE_KEY.match(key)
        if match is None or key.startswith(keep):
            continue
        layer, branch = match.groups()
        owner, s = f"{layer}.{branch}.{SCALED_PROJECTIONS[branch]}", scale.float()
        del out[key]
        weight = state[f"{owner}.weight"]
        out[f"{owner}.weight"] = (weight.float() * s[:, None]).to(weight.dtype)
        if f"{owner}.bias" in state:
            bias = state[f"{owner}.bias"]
            out[f"{owner}.bias"] = (bias.float() * s).to(bias.dtype)
    return out


@torch.no_grad()
def unshare(layers: nn.ModuleList):
    """Make every repetition in ``layers`` own copies of its tensors, its scales folded in (set to 1), in place:
    the model computes what it did, with independent weights. Needed before merging per-repetition LoRA adapters,
    which would otherwise all be added to the one shared tensor (and scaled by the repetition's scale)."""
    for module in layers.modules():
        if isinstance(module, ScaledProjection):
            weight, s = module.weight, module.active_scale()  # under peft: its modules_to_save copy
            module.weight = nn.Parameter((weight.float() * s[:, None]).to(weight.dtype),
                                         requires_grad=weight.requires_grad)
            if module.bias is not None:
                module.bias = nn.Parameter((module.bias.float() * s).to(module.bias.dtype),
                                           requires_grad=module.bias.requires_grad)
            for scale in getattr(module._branch, SCALE).modules():
                if isinstance(scale, ResidualScale):
                    scale.weight.fill_(1.0)
    seen = set()
    for module in layers.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in seen:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            elif p is not None:
                seen.add(id(p))


def plain_projections(layers: nn.ModuleList):
    """After ``unshare`` (scales 1): every ScaledProjection becomes a plain ``nn.Linear`` over its own weight and
    the branches lose their scales, in place: the layers are then stock layers, as copies are."""
    for module in list(layers.modules()):
        for branch_name, projection in SCALED_PROJECTIONS.items():
            branch = getattr(module, branch_name, None)
            scaled = getattr(branch, projection, None) if isinstance(branch, nn.Module) else None
            if not isinstance(scaled, ScaledProjection):
                continue
            if not bool((scaled.active_scale() == 1).all()):
                raise ValueError("plain_projections needs folded scales (1): call unshare first")
            with torch.device("meta"):
                linear = nn.Linear(scaled.in_features, scaled.out_features, bias=scaled.bias is not None)
            linear.weight, linear.bias = scaled.weight, scaled.bias
            setattr(branch, projection, linear)
            delattr(branch, SCALE)


def memory(model) -> dict:
    """Parameters and their bytes, each tensor once (what a shared repetition does not add)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return {"parameters": sum(p.numel() for p in unique), "bytes": sum(p.numel() * p.element_size() for p in unique)}
