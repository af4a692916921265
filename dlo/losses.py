"""Router supervision (DESIGN.md §2.4): labels, BCE loss, and the statistics that steer routing.

Call ``router_loss(model)`` after each training forward: it reads what every routed layer
decided, builds labels (``self``, ``cos`` or ``cos-global``), returns the BCE loss, and updates
the tracked score quantiles (inference thresholds) and, for ``cos-global``, per-layer capacities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlo.distributed import all_reduce_mean
from dlo.modeling import routed_layers
from dlo.routing import NUM_QUANTILES, RouterRecord, row_budget, static_budget


@dataclass
class RouterLossOutput:
    loss: torch.Tensor  # scalar, mean over routed layers of the masked BCE (unweighted by lambda)
    stats: dict[str, torch.Tensor]  # per routed layer, shape (L,): capacity, score, agreement, threshold, ...


def _masked_sorted(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sort the last dim ascending with invalid entries pushed to the end (+inf)."""
    return torch.sort(values.masked_fill(~valid, float("inf")), dim=-1).values


def masked_quantiles(values: torch.Tensor, valid: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles (linear interpolation) of values[valid] at ``levels``, without a host sync.

    values, valid: (N,); levels: (Q,) in [0, 1] -> (Q,).
    """
    ordered = _masked_sorted(values, valid)
    n = valid.sum().clamp(min=1)
    pos = levels * (n - 1)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, n - 1)
    w = pos - lo
    return ordered[lo] * (1 - w) + ordered[hi] * w


def cos_labels(record: RouterRecord) -> torch.Tensor:
    """Per sequence, the k = ceil(c * n) of its n valid tokens with the lowest similarity are labelled 'run'."""
    B, T = record.similarity.shape
    ranked = record.similarity.masked_fill(~record.valid, float("inf"))
    order = torch.sort(ranked, dim=1, stable=True).indices[:, :static_budget(record.capacity, T)]
    by_rank = torch.arange(order.shape[1], device=ranked.device) < row_budget(record.capacity, record.valid)[:, None]
    labels = torch.zeros(B, T, dtype=torch.bool, device=ranked.device)
    labels.scatter_(1, order, by_rank)
    return labels & record.valid


def cos_global_labels(records: list[RouterRecord]) -> list[torch.Tensor]:
    """One similarity quantile over every routed layer: tokens below it are labelled 'run'.

    The quantile sits at the mean effective capacity, so the overall share of 'run' labels matches
    it; layers that change their tokens more (lower similarity) receive more of that share.
    Returns the labels per layer; the similarity cut is all-reduced across ranks.
    """
    sims = torch.cat([r.similarity.reshape(-1) for r in records])
    valid = torch.cat([r.valid.reshape(-1) for r in records])
    mean_capacity = sum(r.capacity for r in records) / len(records)
    level = torch.tensor([mean_capacity], device=sims.device)
    cut = all_reduce_mean(masked_quantiles(sims, valid, level))[0]
    return [(r.similarity <= cut) & r.valid for r in records]


def _layer_bce(record: RouterRecord, labels: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(record.logits, labels.float(), reduction="none")
    return (loss * record.valid).sum() / record.valid.sum().clamp(min=1)


@torch.no_grad()
def _track_quantiles(layer, record: RouterRecord, momentum: float):
    levels = torch.linspace(0, 1, NUM_QUANTILES, device=record.logits.device)
    batch_q = masked_quantiles(torch.sigmoid(record.logits).reshape(-1), record.valid.reshape(-1), levels)
    batch_q = all_reduce_mean(batch_q)
    layer.score_quantiles.mul_(momentum).add_(batch_q.to(layer.score_quantiles.dtype), alpha=1 - momentum)


@torch.no_grad()
def _reallocate_capacities(layers, labels, records, config):
    """cos-global: move each layer's target capacity towards its share of 'run' labels."""
    target_mean = sum(config.resolve_capacities(len(layers))) / len(layers)
    effective_mean = sum(r.capacity for r in records) / len(records)
    shares = torch.stack([(lab & r.valid).sum() / r.valid.sum().clamp(min=1) for lab, r in zip(labels, records)])
    shares = all_reduce_mean(shares.float()) * (target_mean / effective_mean)
    proposed = shares.clamp(config.min_layer_capacity, 1.0)
    # One host sync per similarity refresh: top-k needs k as a Python int.
    current = torch.tensor([layer.target_capacity for layer in layers], device=proposed.device)
    updated = config.capacity_momentum * current + (1 - config.capacity_momentum) * proposed
    updated = (updated * (target_mean / updated.mean())).clamp(config.min_layer_capacity, 1.0)
    for layer, c in zip(layers, updated.tolist()):
        layer.set_target_capacity(c)


def router_loss(model) -> RouterLossOutput:
    """Router BCE loss of the last forward, plus per-layer statistics.

    In training, also updates the tracked score quantiles (thresholds) and, for ``cos-global``
    labels, the per-layer capacities.
    """
    layers = routed_layers(model)
    if not layers:
        raise ValueError("model has no routed layers; call dlo.attach_routers first")
    records = [layer.last for layer in layers]
    if any(r is None for r in records):
        raise ValueError("no routing record: run a forward pass of the model before router_loss")
    config = model.dlo_routing_config
    have_similarity = all(r.similarity is not None for r in records)
    if config.label == "self" or not have_similarity:
        labels = [r.selected for r in records]
    elif config.label == "cos":
        labels = [cos_labels(r) for r in records]
    else:
        labels = cos_global_labels(records)
    loss = torch.stack([_layer_bce(r, lab) for r, lab in zip(records, labels)]).mean()

    training = model.training and model._dlo_state.force is None
    if training:
        for layer, record in zip(layers, records):
            _track_quantiles(layer, record, config.threshold_momentum)
        if config.label == "cos-global" and have_similarity:
            _reallocate_capacities(layers, labels, records, config)
    return RouterLossOutput(loss=loss, stats=routing_stats(layers, records, labels))


@torch.no_grad()
def routing_stats(layers, records, labels=None) -> dict[str, torch.Tensor]:
    """Per routed layer (tensors of shape (L,), no host sync): realised capacity, mean score,
    agreement of the causal threshold decision with the selection, threshold, target capacity,
    and (when labels are given) the share of tokens labelled 'run'."""

    def share(mask, valid):
        return (mask & valid).sum() / valid.sum().clamp(min=1)

    out = {
        "capacity": torch.stack([share(r.selected, r.valid) for r in records]),
        "score": torch.stack([(torch.sigmoid(r.logits) * r.valid).sum() / r.valid.sum().clamp(min=1)
                              for r in records]),
        "agreement": torch.stack([
            share((torch.sigmoid(r.logits) >= layer.threshold()) == r.selected, r.valid)
            for layer, r in zip(layers, records)
        ]),
        "threshold": torch.stack([layer.threshold() for layer in layers]),
        "target_capacity": torch.tensor([layer.target_capacity for layer in layers]),
    }
    if labels is not None:
        out["label_run_share"] = torch.stack([share(lab, r.valid) for lab, r in zip(labels, records)])
    return out
