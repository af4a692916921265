"""RoutingConfig: which layers are routed, how many tokens run, and how routers learn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GRANULARITIES = ("block", "mlp")
LABELS = ("self", "cos", "cos-global")
LAYER_CHOICES = ("new", "all")
SCHEDULES = ("linear", "cosine")


@dataclass
class RoutingConfig:
    """Routing of a decoder stack (DESIGN.md §2.2-2.4)."""

    layers: str | list[int] = field(
        default="new",
        metadata={"help": "'new' (copies made by expansion), 'all', or an explicit list of layer indices."},
    )
    capacity: float | list[float] = field(
        default=0.5,
        metadata={"help": "Target share of tokens that run each routed layer, in (0, 1]; one value or one per "
                  "routed layer."},
    )
    granularity: str = field(
        default="block",
        metadata={"help": "'block': skipped tokens skip attention and MLP (attention runs among selected tokens); "
                  "'mlp': attention is dense, only the MLP is routed."},
    )
    label: str = field(
        default="cos-global",
        metadata={"help": "Router supervision: 'self' (own top-k), 'cos' (per-layer lowest similarity runs), "
                  "'cos-global' (one quantile over all routed layers; re-allocates per-layer capacity)."},
    )
    beta: float = field(
        default=0.05,
        metadata={"help": "Gate slope: a selected token's update is scaled by 1 + beta * (score - 0.5), so the "
                  "task loss reaches the router."},
    )
    router_loss_weight: float = field(
        default=0.1, metadata={"help": "lambda: weight of the router BCE loss added to the task loss."}
    )
    similarity_every: int = field(
        default=1,
        metadata={"help": "Recompute similarity labels (a dense no-grad pass of each routed layer) every N "
                  "training forwards (micro-batches); the others use 'self' labels. Ignored for label='self'."},
    )
    anneal_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which mean capacity anneals from 1.0 to the target."}
    )
    anneal_schedule: str = field(default="linear", metadata={"help": "'linear' or 'cosine' annealing."})
    threshold_momentum: float = field(
        default=0.9,
        metadata={"help": "EMA momentum of the score quantiles tracked in training; they set the inference "
                  "thresholds so the realised capacity matches the target."},
    )
    capacity_momentum: float = field(
        default=0.9,
        metadata={"help": "EMA momentum of per-layer capacities re-allocated by 'cos-global' labels."},
    )
    capacity_scaled_lr: bool = field(
        default=False,
        metadata={"help": "Scale each routed layer's learning rate by its target capacity (fixed when the "
                  "optimizer is built)."},
    )
    min_layer_capacity: float = field(
        default=0.05, metadata={"help": "Floor of a re-allocated per-layer capacity (cos-global)."}
    )

    def __post_init__(self):
        if isinstance(self.layers, str):
            if self.layers not in LAYER_CHOICES:
                raise ValueError(f"layers={self.layers!r}: expected one of {LAYER_CHOICES} or a list of indices")
        else:
            self.layers = [int(i) for i in self.layers]
            if not self.layers:
                raise ValueError("layers=[]: give at least one layer index to route")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers={self.layers}: indices must be unique")
        caps = self.capacity if isinstance(self.capacity, (list, tuple)) else [self.capacity]
        for c in caps:
            if not (0.0 < float(c) <= 1.0):
                raise ValueError(f"capacity={c}: must be in (0, 1]")
        if isinstance(self.capacity, (list, tuple)):
            self.capacity = [float(c) for c in self.capacity]
        else:
            self.capacity = float(self.capacity)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}: expected one of {GRANULARITIES}")
        if self.label not in LABELS:
            raise ValueError(f"label={self.label!r}: expected one of {LABELS}")
        if self.anneal_schedule not in SCHEDULES:
            raise ValueError(f"anneal_schedule={self.anneal_schedule!r}: expected one of {SCHEDULES}")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta}: must be >= 0")
        if self.router_loss_weight < 0:
            raise ValueError(f"router_loss_weight={self.router_loss_weight}: must be >= 0")
        if self.similarity_every < 1:
            raise ValueError(f"similarity_every={self.similarity_every}: must be >= 1")
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps={self.anneal_steps}: must be >= 0")
        for name in ("threshold_momentum", "capacity_momentum"):
            if not (0.0 <= getattr(self, name) < 1.0):
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1)")
        if not (0.0 < self.min_layer_capacity <= 1.0):
            raise ValueError(f"min_layer_capacity={self.min_layer_capacity}: must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RoutingConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def resolve_layers(self, num_layers: int, new_layers: list[int] | None) -> list[int]:
        """Concrete sorted list of routed layer indices for a stack of ``num_layers``."""
        if self.layers == "all":
            return list(range(num_layers))
        if self.layers == "new":
            if not new_layers:
                raise ValueError(
                    "layers='new' but the model records no duplicated layers (config.dlo_expansion is missing "
                    "or has no new layers); expand the model first or pass layers='all' or a list of indices"
                )
            return sorted(new_layers)
        bad = [i for i in self.layers if not (0 <= i < num_layers)]
        if bad:
            raise ValueError(f"layers={self.layers}: indices {bad} out of range [0, {num_layers - 1}]")
        return sorted(self.layers)

    def resolve_capacities(self, num_routed: int) -> list[float]:
        if isinstance(self.capacity, list):
            if len(self.capacity) != num_routed:
                raise ValueError(
                    f"capacity has {len(self.capacity)} values but {num_routed} layers are routed; "
                    "give one value or one per routed layer"
                )
            return list(self.capacity)
        return [self.capacity] * num_routed
