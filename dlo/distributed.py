"""Keep routing decisions identical on every rank (DESIGN.md §2.4, 'Distributed')."""

import torch
import torch.distributed as dist


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks when torch.distributed is initialised; ``t`` itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()
