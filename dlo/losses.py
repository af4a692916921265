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
from dlo.distributed import all_reduce_sum, gather_rows
from dlo.routing import RouterRecord, row_budget
from dlo.validation import check_instance


@dataclass
class RouterLossOutput:
    loss: torch.Tensor  # () mean over routed layers of the BCE mean over valid tokens (unweighted by lambda)
    token_loss_sum: torch.Tensor  # () mean over routed layers of the BCE summed over valid tokens
    labels: list[torch.Tensor]  # per routed layer, (B, T) bool: the 'run' decisions of the targets
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
    """Per sequence, the k = ceil(c * n) of its n valid tokens with the lowest similarity are labelled 'run'
    (every valid token measured: the dense source; the packed source's are in ``router_targets``)."""
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


@torch.compiler.disable
@torch.no_grad()
def similarity_fits(records: list[RouterRecord]) -> torch.Tensor:
    """(L, 3) float64 per layer: intercept, slope and residual spread of the weighted least-squares line of the
    measured tokens' similarity on the log-norm of their layer input, over every rank (one all-reduce).

    cos(h, h + u) is ~1 - |u|^2 / (2 |h|^2) for a small update u; a pre-norm layer's update has about the same size
    for every token, so the input's norm orders the tokens' similarities closely.
    """
    stats = []
    for record in records:
        weight = (record.similarity_weight * measured(record)).double()
        x = record.log_norm.double() * (weight > 0)  # tokens not measured: weight 0, and no inf or nan in the sums
        y = record.similarity.double().masked_fill(weight == 0, 0.0)
        stats.append(torch.stack([weight.sum(), (weight * x).sum(), (weight * y).sum(), (weight * x * x).sum(),
                                  (weight * x * y).sum(), (weight * y * y).sum()]))
    n, sx, sy, sxx, sxy, syy = all_reduce_sum(torch.stack(stats)).unbind(1)  # (L,) each
    n = n.clamp(min=1e-12)
    mean_x, mean_y = sx / n, sy / n
    var_x, cov, var_y = sxx / n - mean_x**2, sxy / n - mean_x * mean_y, syy / n - mean_y**2
    slope = cov / (var_x + 1e-6)  # a ridge: inputs of one norm (or one measured token) give the mean
    spread = (var_y - 2 * slope * cov + slope**2 * var_x).clamp(min=1e-12).sqrt()
    return torch.stack([mean_y - slope * mean_x, slope, spread], 1)


def run_chance(record: RouterRecord, cut: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """(B, T) float64: the chance that each token's similarity lies at or below ``cut`` (broadcast to (B, T)),
    under the layer's fit (a normal spread around the line)."""
    predicted = fit[0] + fit[1] * record.log_norm.double()
    return torch.special.ndtr((cut.double() - predicted) / fit[2])


@torch.compiler.disable
@torch.no_grad()
def expected_row_cut(record: RouterRecord, fit: torch.Tensor, iterations: int = 32) -> torch.Tensor:
    """(B, 1) packed ``cos``, per row: the similarity at which the measured tokens at or below it plus the run
    chances of the tokens not measured reach the row's budget k (bisection on [-1, 1]). Every token stands for
    itself here: a row's two or three samples would make a coarse cut with their weights."""
    known = measured(record)
    unknown = record.valid & ~known
    budget = row_budget(record.capacity, record.valid).double().unsqueeze(1)  # (B, 1)
    similarity = record.similarity.double()
    low = similarity.new_full(budget.shape, -1.0)
    high = similarity.new_full(budget.shape, 1.0)
    for _ in range(iterations):  # the count is monotone in the cut
        mid = (low + high) / 2
        count = ((similarity <= mid) & known).sum(1, keepdim=True) + (run_chance(record, mid, fit) * unknown).sum(
            1, keepdim=True)
        enough = count >= budget - 1e-9
        high, low = torch.where(enough, mid, high), torch.where(enough, low, mid)
    return high


def router_targets(records: list[RouterRecord], label: str) -> list[torch.Tensor]:
    """The BCE target of every token of each layer, (B, T) float in [0, 1] (docs/DESIGN.md §2.4).

    ``self`` labels, or labels computed before any similarity was, are the router's own selection; with the dense
    source every valid token's label (1: run). With the packed source a measured token gets its label, a token
    not measured (a skipped one the sample left out) its ``run_chance``: BCE is linear in its target, so that is the
    expected loss under the label its unknown similarity would give it. The cut: for ``cos-global`` the weighted
    quantile of the measured tokens over every layer and rank; for ``cos`` ``expected_row_cut``.
    """
    if label == "self" or any(r.similarity is None for r in records):
        return [r.selected.float() for r in records]
    if records[0].similarity_weight is None:  # dense source: every valid token measured
        labels = [cos_labels(r) for r in records] if label == "cos" else cos_global_labels(records)
        return [lab.float() for lab in labels]
    fits = similarity_fits(records)
    if label == "cos":
        cuts = [expected_row_cut(r, fit) for r, fit in zip(records, fits)]
    else:
        cuts = [global_similarity_cut(records).double()] * len(records)
    return [torch.where(measured(r), (r.similarity.double() <= cut).float(), run_chance(r, cut, fit).float())
            for r, cut, fit in zip(records, cuts, fits)]


def router_labels(records: list[RouterRecord], label: str) -> list[torch.Tensor]:
    """The run/skip decision each layer's labels make, (B, T) bool: a target of at least 1/2 means 'run'."""
    return [decide(t, r) for t, r in zip(router_targets(records, label), records)]


def decide(target: torch.Tensor, record: RouterRecord) -> torch.Tensor:
    """(B, T) bool: valid tokens whose target is at least 1/2."""
    return (target >= 0.5) & record.valid


def router_loss(records: list[RouterRecord], config: RoutingConfig) -> RouterLossOutput:
    """Masked BCE-with-logits of every routed layer against its labels, averaged over layers.

    ``records``: what a forward's routed layers decided (``output.routing``); ``config``: the model's
    RoutingConfig. Raises ``TypeError`` for anything else, ``ValueError`` for no records.
    """
    check_instance("records", records, (list, tuple), "a list of dlo.routing.RouterRecord (a forward's "
                                                      "output.routing)")
    if not records:
        raise ValueError("no routing records: router_loss needs the records of a training forward")
    for i, record in enumerate(records):
        check_instance(f"records[{i}]", record, RouterRecord, "a dlo.routing.RouterRecord (a forward's "
                                                              "output.routing)")
    check_instance("config", config, RoutingConfig, "a dlo.RoutingConfig (the model's dlo_routing_config)")
    targets = router_targets(records, config.label)
    sums, means = [], []
    for record, target in zip(records, targets):
        bce = F.binary_cross_entropy_with_logits(record.logits, target, reduction="none")
        total = (bce * record.valid).sum()
        sums.append(total)
        means.append(total / record.valid.sum().clamp(min=1))
    labels = [decide(t, r) for t, r in zip(targets, records)]
    return RouterLossOutput(loss=torch.stack(means).mean(), token_loss_sum=torch.stack(sums).mean(), labels=labels)
