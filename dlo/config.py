"""RoutingConfig: which layers are routed, how many tokens run, and how routers learn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dlo.errors import warn
from dlo.validation import Boolean, Choice, ListOf, Mapping, Number, ScalarOrList, check_fields

GRANULARITIES = ("block", "mlp")
LABELS = ("self", "cos", "cos-global")
SIMILARITY_SOURCES = ("packed", "dense")
LAYER_CHOICES = ("new", "all")
SCHEDULES = ("linear", "cosine")
CAPACITY = Number(low=0, high=1, low_open=True)
# One capacity for every routed layer, or one each.
CAPACITIES = ScalarOrList(CAPACITY, ListOf(CAPACITY), "a list of them, one per routed layer")
MOMENTUM = Number(low=0, high=1, high_open=True)
# Below this target share a routed layer runs almost no tokens (under 1 in 20): legal, but rarely meant.
LOW_CAPACITY = 0.05


def warn_low_capacity(capacities: list[float], where: str = ""):
    """Warn (``DloWarning``) about capacities below ``LOW_CAPACITY``; ``where`` names the layers they are for."""
    low = [c for c in capacities if c < LOW_CAPACITY]
    if low:
        warn(f"capacity {min(low):g}{where}: below {LOW_CAPACITY:g}, a routed layer runs about 1 token in "
             f"{round(1 / min(low))}, nearly as if it were removed (dlo.export_static can drop it instead)")


@dataclass
class RoutingConfig:
    """Routing of a decoder stack (DESIGN.md §2.2-2.4).

    Every field is checked when the config is made: a value of the wrong kind raises ``TypeError``, one out of
    range ``ValueError``, each naming the field, the value and what is valid (``dlo.validation``). A capacity
    below ``LOW_CAPACITY`` is allowed with a ``DloWarning``.
    """

    layers: str | list[int] = field(
        default="new",
        metadata={"help": "'new' (copies made by expansion), 'all', or an explicit list of layer indices.",
                  "check": ScalarOrList(Choice(LAYER_CHOICES), ListOf(Number(low=0, integer=True), unique=True),
                                        "a list of layer indices (integers >= 0)")},
    )
    capacity: float | list[float] = field(
        default=0.5,
        metadata={"help": "Target share of tokens that run each routed layer, in (0, 1]; one value or one per "
                  "routed layer.",
                  "check": CAPACITIES},
    )
    granularity: str = field(
        default="block",
        metadata={"help": "'block': skipped tokens skip attention and MLP (attention runs among selected tokens); "
                  "'mlp': attention is dense, only the MLP is routed.", "check": Choice(GRANULARITIES)},
    )
    label: str = field(
        default="cos-global",
        metadata={"help": "Router supervision: 'self' (own top-k), 'cos' (per-layer lowest similarity runs), "
                  "'cos-global' (one quantile over all routed layers; re-allocates per-layer capacity).",
                  "check": Choice(LABELS)},
    )
    beta: float = field(
        default=0.05,
        metadata={"help": "Gate slope: a selected token's update is scaled by 1 + beta * (score - 0.5), so the "
                  "task loss reaches the router.", "check": Number(low=0)},
    )
    router_loss_weight: float = field(
        default=0.1,
        metadata={"help": "lambda: weight of the router BCE loss added to the task loss.", "check": Number(low=0)},
    )
    similarity_every: int = field(
        default=1,
        metadata={"help": "Compute similarity labels (see similarity_source) on every N-th optimizer step (all "
                  "its micro-batches); the other steps use 'self' labels. Ignored for label='self'.",
                  "check": Number(low=1, integer=True)},
    )
    similarity_source: str = field(
        default="packed",
        metadata={"help": "Where similarity labels come from: 'packed' (a running token's similarity from its own "
                  "packed computation, skipped tokens' from a small no-grad sample run after it, the others' "
                  "predicted from their input's norm; cost follows the tokens that run) or 'dense' (every routed "
                  "layer recomputed on every token without grad: the reference, nearly a dense forward). Ignored "
                  "for label='self'.",
                  "check": Choice(SIMILARITY_SOURCES)},
    )
    anneal_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps over which mean capacity anneals from 1.0 to the target.",
                  "check": Number(low=0, integer=True)},
    )
    anneal_schedule: str = field(
        default="linear", metadata={"help": "'linear' or 'cosine' annealing.", "check": Choice(SCHEDULES)}
    )
    anneal_delay_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps at capacity 1.0 before the anneal starts (0: from the first step). "
                  "Lets a circuit that forms late form while every token runs, before labels move capacity.",
                  "check": Number(low=0, integer=True)},
    )
    threshold_momentum: float = field(
        default=0.9,
        metadata={"help": "EMA momentum of the score quantiles tracked in training; they set the inference "
                  "thresholds so the realised capacity matches the target.", "check": MOMENTUM},
    )
    capacity_momentum: float = field(
        default=0.9,
        metadata={"help": "EMA momentum of per-layer capacities re-allocated by 'cos-global' labels.",
                  "check": MOMENTUM},
    )
    capacity_scaled_lr: bool = field(
        default=False,
        metadata={"help": "Scale each routed layer's learning rate by its target capacity (fixed when the "
                  "optimizer is built).", "check": Boolean()},
    )
    min_layer_capacity: float = field(
        default=0.05,
        metadata={"help": "Floor of a re-allocated per-layer capacity (cos-global).", "check": CAPACITY},
    )
    reallocation_sharpness: float = field(
        default=1.0,
        metadata={"help": "cos-global: each layer's proposed capacity is proportional to its share of 'run' labels "
                  "raised to this power (1: proportional, the DLO paper's re-allocation; > 1 moves capacity "
                  "towards the layers that change tokens most, so a budget can concentrate in few layers and "
                  "reach 1.0 / min_layer_capacity).", "check": Number(low=1.0, high=64.0)},
    )

    def __post_init__(self):
        check_fields(self)
        warn_low_capacity(self.capacity if isinstance(self.capacity, list) else [self.capacity])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingConfig:
        Mapping()("data", data)
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
