"""Capacity annealing: mean capacity moves from 1.0 to its target over N optimizer steps."""

import math


def anneal_fraction(step: int, anneal_steps: int, schedule: str = "linear", delay: int = 0) -> float:
    """0.0 until ``step`` reaches ``delay`` (every token runs), then -> 1.0 once ``step >= delay + anneal_steps``
    (targets reached)."""
    if step < delay:
        return 0.0
    if anneal_steps <= 0:
        return 1.0
    t = min(max(step - delay, 0) / anneal_steps, 1.0)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    raise ValueError(f"schedule={schedule!r}: expected 'linear' or 'cosine'")
