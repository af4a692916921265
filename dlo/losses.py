"""Router supervision (docs/DESIGN.md §2.4): labels and the BCE loss, as pure functions of the records.

``router_loss(records, config)`` reads what every routed layer decided in one forward, builds labels
(``self``, ``cos`` or ``cos-global``) and returns the BCE loss. It changes nothing: the statistics
that steer routing are folded in by ``RoutingState.commit`` after the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlo.config import RoutingConfig
from dlo.distributed import gather_rows
from dlo.routing import RouterRecord, row_budget


@dataclass
class RouterLossOutput:
    loss: torch.Tensor  # () mean over routed layers of the BCE mean over valid tokens (unweighted by lambda)
    token_loss_sum: torch.Tensor  # () mean over routed layers of the BCE summed over valid tokens
    labels: list[torch.Tensor]  # per routed layer, (B, T) bool: the 'run' labels
    weighted_term: torch.Tensor | None = None  # () what trains: weight * the loss normalised like the task loss


def quantiles(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles with linear interpolation (as torch.quantile) along the last dim, for any size.

    values: (..., N) with N >= 1; levels: (Q,) in [0, 1] -> (..., Q).
    """
    ordered = torch.sort(values, dim=-1).values
    n = ordered.shape[-1]
    pos = levels.to(device=ordered.device, dtype=torch.float64) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).to(ordered.dtype)
    return ordered[..., lo] * (1 - w) + ordered[..., hi] * w


def weighted_cut(values: torch.Tensor, weights: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The smallest value at which the weight of the values at or below it reaches ``mass``.

    values, weights: (..., N), unmeasured values +inf with weight 0; mass: (...) -> (...). With unit weights and
    an integer mass k, the k-th smallest value.
    """
    ordered = torch.sort(values, dim=-1)
    cumulative = weights.double().gather(-1, ordered.indices).cumsum(-1)
    # The sample weights are ratios: a tolerance keeps a mass equal to the total from rounding past the last value.
    reached = (cumulative < mass.double().unsqueeze(-1) - 1e-6).sum(-1, keepdim=True)
    return ordered.values.gather(-1, reached.clamp(max=values.shape[-1] - 1)).squeeze(-1)


def measured(record: RouterRecord) -> torch.Tensor:
    """(B, T) bool: tokens whose similarity was measured (every valid one with the dense source)."""
    if record.similarity_weight is None:
        return record.valid
    return (record.similarity_weight > 0) & record.valid


def cos_labels(record: RouterRecord) -> torch.Tensor:
    """Per sequence, the k = ceil(c * n) of its n valid tokens with the lowest similarity are labelled 'run'.

    Packed source: the cut is where the measured tokens, each weighted by the valid tokens it stands for, reach
    k; a measured token at or below it runs, a token not measured keeps the router's 'skip'.
    """
    if record.similarity_weight is not None:
        budget = row_budget(record.capacity, record.valid)
        cut = weighted_cut(record.similarity, record.similarity_weight * measured(record), budget)
        return (record.similarity <= cut.unsqueeze(1)) & measured(record)
    B, T = record.similarity.shape
    ranked = record.similarity.masked_fill(~record.valid, float("inf"))
    order = torch.sort(ranked, dim=1, stable=True).indices
    by_rank = torch.arange(T, device=ranked.device) < row_budget(record.capacity, record.valid)[:, None]
    labels = torch.zeros(B, T, dtype=torch.bool, device=ranked.device)
    labels.scatter_(1, order, by_rank)
    return labels & record.valid


@torch.compiler.disable
@torch.no_grad()
def global_similarity_cut(records: list[RouterRecord]) -> torch.Tensor:
    """The similarity quantile, over every routed layer's valid tokens on every rank, at the mean capacity.

    Packed source: the weighted quantile of the measured tokens, each standing for its weight in valid tokens.
    """
    level = torch.stack([r.capacity for r in records]).mean().reshape(1)
    if records[0].similarity_weight is not None:
        rows = torch.cat([torch.stack([r.similarity[measured(r)], r.similarity_weight[measured(r)]], 1)
                          for r in records]).float()  # (N, 2): similarity, weight
        pooled = gather_rows(rows)
        if pooled.numel() == 0:
            return torch.tensor(float("inf"), device=rows.device)
        return weighted_cut(pooled[:, 0], pooled[:, 1], level[0] * pooled[:, 1].double().sum())
    sims = torch.cat([r.similarity[r.valid] for r in records]).float()
    pooled = gather_rows(sims)
    if pooled.numel() == 0:
        return torch.tensor(float("inf"), device=sims.device)
    return quantiles(pooled, level)[0]


def cos_global_labels(records: list[RouterRecord]) -> list[torch.Tensor]:
    """One similarity quantile over every routed layer: tokens at or below it are labelled 'run'.

    The quantile sits at the mean effective capacity, so the overall share of 'run' labels matches it;
    layers that change their tokens more (lower similarity) receive more of that share.
    """
    cut = global_similarity_cut(records)
    return [(r.similarity <= cut) & measured(r) for r in records]


def label_run_counts(records: list[RouterRecord], labels: list[torch.Tensor]) -> torch.Tensor:
    """(L,) float64 'run' labels per layer, in valid tokens: a sampled skipped token counts for the tokens it
    stands for, so with the packed source the count estimates what the dense labels would count."""
    counts = []
    for record, lab in zip(records, labels):
        weight = record.valid if record.similarity_weight is None else record.similarity_weight
        counts.append((lab & record.valid).double().mul(weight).sum())
    return torch.stack(counts)


def router_labels(records: list[RouterRecord], label: str) -> list[torch.Tensor]:
    """The 'run' labels of each layer; ``self`` labels (own selection) when similarity was not computed."""
    if label == "self" or any(r.similarity is None for r in records):
        return [r.selected for r in records]
    if label == "cos":
        return [cos_labels(r) for r in records]
    return cos_global_labels(records)


def router_loss(records: list[RouterRecord], config: RoutingConfig) -> RouterLossOutput:
    """Masked BCE-with-logits of every routed layer against its labels, averaged over layers."""
    if not records:
        raise ValueError("no routing records: router_loss needs the records of a training forward")
    labels = router_labels(records, config.label)
    sums, means = [], []
    for record, lab in zip(records, labels):
        bce = F.binary_cross_entropy_with_logits(record.logits, lab.float(), reduction="none")
        total = (bce * record.valid).sum()
        sums.append(total)
        means.append(total / record.valid.sum().clamp(min=1))
    return RouterLossOutput(loss=torch.stack(means).mean(), token_loss_sum=torch.stack(sums).mean(), labels=labels)
