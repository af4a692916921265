"""Collectives that make N ranks route as one process with their combined batch (docs/DESIGN.md §4).

Every function returns its input unchanged when torch.distributed is not initialised (or has one rank).
"""

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor)."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` (N_r, ...) along dim 0, in rank order; N_r may differ per rank.

    One host sync for the sizes, then one all_gather of rows padded to the largest N_r.
    """
    if world_size() == 1:
        return t
    t = t.detach().contiguous()
    sizes = torch.tensor([t.shape[0]], device=t.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])
