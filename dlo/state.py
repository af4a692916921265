"""The one owner of routing state that changes during training (docs/DESIGN.md §10).

What changes while a routed model trains: the routing step (which drives capacity annealing and the
similarity refresh period), each layer's tracked score quantiles (the inference thresholds) and, with
``cos-global`` labels, each layer's target capacity. ``RoutingState`` is a submodule of the routed
model; the step is its buffer and the per-layer values are the layers' buffers, so the checkpoint
itself carries all of it.

Protocol, identical in every training loop (HF ``Trainer``, TRL, a plain loop):

1. ``inputs(...)``: at the start of each forward the model asks for this forward's ``RoutingInputs``
   (capacities, packed widths, the similarity flag), derived from the state and nothing else.
2. ``observe(...)``: after a training forward the model hands over what the layers decided (detached).
3. ``commit()``: after each optimizer step (a global optimizer step hook calls it), the observations
   of that step, gathered over every rank, update quantiles, capacities and the step; one host sync.

Nothing is written between a forward and its backward, so a gradient-checkpointing recomputation sees
the state its forward saw, and all micro-batches of one optimizer step route alike.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from dlo.config import RoutingConfig
from dlo.distributed import all_reduce_sum, gather_rows, rank, world_size
from dlo.losses import label_run_counts, quantiles
from dlo.routing import NUM_QUANTILES, RoutingInputs, packed_width
from dlo.schedules import anneal_fraction

# Observations kept while no optimizer step commits them (a loop that only runs forwards in train mode).
MAX_PENDING = 256


@dataclass
class Observation:
    """One training forward, detached: what the commit after the optimizer step needs."""

    scores: torch.Tensor  # (L, B, T) sigmoid scores per routed layer
    valid: torch.Tensor  # (B, T) bool: tokens that count (not padding)
    sums: dict[str, torch.Tensor]  # logged quantities, each a weighted sum (see RoutingState.logs)


class RoutingState(nn.Module):
    """Routing step, schedule and statistics of one routed model."""

    def __init__(self, config: RoutingConfig, layers: list[nn.Module]):
        super().__init__()
        self.config = config
        # A plain list: the layers are the decoder stack's submodules, not this module's.
        self._layers = list(layers)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.force: dict[int, str] = {}
        self._pending: list[Observation] = []
        self._log_sums: dict[str, torch.Tensor] = {}
        _REGISTRY.add(self)

    @property
    def layers(self) -> list[nn.Module]:
        return self._layers

    # ---- 1. inputs of a forward ----------------------------------------------------------
    def effective_capacities(self, step: int) -> list[float]:
        """Per routed layer: the capacity training selects with at ``step`` (1.0 through the anneal's delay, then
        annealed to the layer's target)."""
        frac = anneal_fraction(step, self.config.anneal_steps, self.config.anneal_schedule,
                               self.config.anneal_delay_steps)
        return [1.0 - (1.0 - float(layer.capacity)) * frac for layer in self._layers]

    @torch.compiler.disable
    def inputs(self, training: bool, seq_len: int, token_mask: torch.Tensor | None, collect: bool,
               device: torch.device) -> RoutingInputs:
        """This forward's RoutingInputs. Training reads the step and capacities (one host sync per forward,
        never per layer); compiled models see the packed widths as plain ints, so they do not recompile
        every step."""
        mask = None
        if token_mask is not None and token_mask.dim() == 2:
            mask = token_mask.to(device=device, dtype=torch.bool)
        routing = RoutingInputs(training=training and not self.force, token_mask=mask, force=dict(self.force),
                                collect=collect or training)
        if routing.training:
            step = int(self.step)
            capacities = self.effective_capacities(step)
            routing.capacity = torch.tensor(capacities, dtype=torch.float64, device=device)
            routing.packed_width = tuple(packed_width(c, seq_len) for c in capacities)
            if self.config.label != "self" and step % self.config.similarity_every == 0:
                routing.similarity = self.config.similarity_source
                # A fresh sample of skipped tokens every step, drawn per token from its row's place in the step's
                # global batch: micro-batch, then rank, then row, the order HF's and accelerate's samplers deal rows
                # in. N ranks and gradient accumulation then sample as one process with the whole batch does.
                routing.similarity_seed = step
                routing.row_block = len(self._pending) * world_size() + rank()
        return routing

    # ---- 2. what a training forward decided ----------------------------------------------
    @torch.compiler.disable
    @torch.no_grad()
    def observe(self, records: list, labels: list[torch.Tensor], router_loss: torch.Tensor,
                task_loss: torch.Tensor | None, label_tokens: torch.Tensor):
        """Keep a training forward's decisions until the optimizer step commits them.

        router_loss: this forward's router BCE (mean over valid tokens); task_loss: the mean over its
        ``label_tokens`` task-labelled tokens (None when the caller computes the loss itself); logged means
        are token-weighted, exactly as one big batch would give them.
        """
        valid = records[0].valid  # every routed layer sees the same padding
        scores = torch.stack([torch.sigmoid(r.logits) for r in records])  # (L, B, T)
        run_labels = label_run_counts(records, labels)
        n_valid = valid.sum().double()
        layer_sums = {
            "capacity": torch.stack([(r.selected & r.valid).sum() for r in records]).double(),
            "score": (scores.double() * valid).sum((1, 2)),
            "agreement": torch.stack([(((torch.sigmoid(r.logits) >= layer.threshold()) == r.selected) & r.valid).sum()
                                      for layer, r in zip(self._layers, records)]).double(),
            "label_run_share": run_labels,
            # Selection that matches the labels, weighted as label_run_counts weights them: with the packed source
            # an estimate of the agreement with the labels a dense pass would give (1 where labels are selection).
            "label_agreement": torch.stack([
                ((lab == r.selected) & r.valid).double().mul(
                    r.valid if r.similarity_weight is None else r.similarity_weight).sum()
                for r, lab in zip(records, labels)]),
            # With "score", the scores' spread: a router whose scores bunch together has stopped ordering tokens.
            "score_sq": (scores.double().square() * valid).sum((1, 2)),
        }
        sums = {f"routing/{k}": v for k, v in layer_sums.items()}
        sums["routing/valid_tokens"] = n_valid
        sums["router_loss"] = router_loss.detach().double() * n_valid
        # Present on every rank either way (the commit reduces the same keys everywhere); 0 tokens: not known.
        counted = label_tokens.double() if task_loss is not None else label_tokens.new_zeros((), dtype=torch.float64)
        sums["task_loss"] = (task_loss.detach().double() * counted) if task_loss is not None else counted
        sums["task_tokens"] = counted
        if len(self._pending) >= MAX_PENDING:
            warnings.warn(f"{MAX_PENDING} training forwards without an optimizer step: dlo keeps routing statistics "
                          "from the optimizer step only; the oldest observation is dropped", stacklevel=2)
            self._pending.pop(0)
        _REGISTRY.add(self)  # (again: a deep-copied model's state was never constructed)
        self._pending.append(Observation(scores=scores.float(), valid=valid, sums=sums))

    def discard_observations(self):
        """Forget training forwards that no optimizer step will follow (timing runs, analysis)."""
        self._pending = []

    # ---- 3. after an optimizer step ------------------------------------------------------
    @torch.no_grad()
    def commit(self):
        """Fold the observations of the last optimizer step into the state (collective on every rank)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        config = self.config
        # (L, N): the valid tokens' scores of every micro-batch of the step, on every rank (one host sync).
        local = torch.cat([o.scores[:, o.valid] for o in pending], dim=1)
        scores = gather_rows(local.t()).t()
        sums = {k: all_reduce_sum(torch.stack([o.sums[k] for o in pending]).sum(0)) for k in pending[0].sums}
        levels = torch.linspace(0, 1, NUM_QUANTILES, device=scores.device)
        if scores.shape[1]:
            batch_q = quantiles(scores, levels)  # (L, Q)
            m = config.threshold_momentum
            for i, layer in enumerate(self._layers):
                layer.score_quantiles.mul_(m).add_(batch_q[i].to(layer.score_quantiles), alpha=1 - m)
        if config.label == "cos-global" and bool(sums["routing/valid_tokens"] > 0):
            self._reallocate(sums["routing/label_run_share"] / sums["routing/valid_tokens"])
        self.step += 1
        for key, value in sums.items():
            self._log_sums[key] = self._log_sums.get(key, 0) + value

    def _reallocate(self, shares: torch.Tensor):
        """cos-global: move each layer's target capacity towards its share of 'run' labels, keeping the mean."""
        config = self.config
        targets = config.resolve_capacities(len(self._layers))
        target_mean = sum(targets) / len(targets)
        effective = self.effective_capacities(int(self.step))
        effective_mean = sum(effective) / len(effective)
        # Sharpened shares keep their total: with sharpness 1 this is the share itself, above 1 the layers with more
        # "run" labels take budget from the others, which lets a split budget settle in one layer.
        relative = shares.clamp(min=0) / shares.max().clamp(min=torch.finfo(shares.dtype).tiny)  # (L,), max 1
        sharpened = relative.pow(config.reallocation_sharpness)
        sharpened = sharpened * (shares.sum() / sharpened.sum())
        proposed = (sharpened * (target_mean / effective_mean)).clamp(config.min_layer_capacity, 1.0)
        current = torch.stack([layer.capacity.double() for layer in self._layers]).to(proposed.device)
        updated = config.capacity_momentum * current + (1 - config.capacity_momentum) * proposed
        updated = (updated * (target_mean / updated.mean())).clamp(config.min_layer_capacity, 1.0)
        for layer, c in zip(self._layers, updated):
            layer.capacity.copy_(c)

    # ---- logging -------------------------------------------------------------------------
    def pop_logs(self) -> dict[str, float | list[float]]:
        """Token-weighted means since the last call, over every rank and micro-batch (no collective here)."""
        sums, self._log_sums = self._log_sums, {}
        if not sums:
            return {}
        valid = float(sums["routing/valid_tokens"])
        out: dict[str, float | list[float]] = {"router_loss": float(sums["router_loss"]) / max(valid, 1.0)}
        if float(sums["task_tokens"]) > 0:  # the caller computed the task loss itself (e.g. a fused LM head)
            out["task_loss"] = float(sums["task_loss"]) / float(sums["task_tokens"])
        for key in ("capacity", "score", "agreement", "label_run_share", "label_agreement"):
            out[f"routing/{key}"] = (sums[f"routing/{key}"] / max(valid, 1.0)).tolist()
        mean, mean_sq = (sums[f"routing/{key}"] / max(valid, 1.0) for key in ("score", "score_sq"))
        out["routing/score_std"] = (mean_sq - mean.square()).clamp(min=0).sqrt().tolist()
        out["routing/threshold"] = [float(layer.threshold()) for layer in self._layers]
        out["routing/target_capacity"] = [layer.target_capacity for layer in self._layers]
        return out


# Every live RoutingState; a global optimizer step hook commits the ones whose model the optimizer trains.
_REGISTRY: weakref.WeakSet[RoutingState] = weakref.WeakSet()


def _optimizer_params(optimizer) -> set[int]:
    return {id(p) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}


def _commit_after_step(optimizer, args, kwargs):
    pending = [state for state in list(_REGISTRY) if state._pending]
    if not pending:
        return
    held = _optimizer_params(optimizer)
    owned = [state for state in pending if any(id(p) in held for layer in state.layers for p in layer.parameters())]
    # An optimizer over flattened copies (DeepSpeed ZeRO) holds none of the model's own tensors: it steps them all.
    for state in owned or pending:
        state.commit()


register_optimizer_step_post_hook(_commit_after_step)

