"""Collectives that make N ranks route as one process with their combined batch (docs/DESIGN.md §2.4), and
the one way to save a model whose weights may be sharded (docs/DISTRIBUTED.md).

Every collective returns its input unchanged when torch.distributed is not initialised (or has one rank).
"""

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor)."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one (``device``: where the backend reduces)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)) > 0)


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


def _zero3_partitioned(model: torch.nn.Module) -> bool:
    # DeepSpeed ZeRO-3 marks the parameters it partitions with an id (ZeRO-1/2 leave them whole).
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _zero3_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gather ZeRO-3 partitions one module at a time (never the whole model at once), copies on rank 0."""
    import deepspeed

    keep = rank() == 0
    full: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        # remove_duplicate=False: a tied weight is saved under each of its names, as state_dict() does.
        own = dict(module.named_parameters(prefix=prefix, recurse=False, remove_duplicate=False))
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=None):
            if keep:
                full.update({name: p.detach().to("cpu", copy=True) for name, p in own.items()})
    if not keep:
        return {}
    # Buffers (capacities, score quantiles, the routing step) are never partitioned.
    for name, value in model.state_dict().items():
        full.setdefault(name, value.detach().to("cpu", copy=True))
    return full


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict of ``model`` on rank 0; other ranks get ``{}``.

    Every rank must call it: FSDP (1 and 2) shards and DeepSpeed ZeRO-3 partitions are gathered with
    collectives, into CPU memory on rank 0. Without torch.distributed it is ``model.state_dict()``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return model.state_dict()
    if _zero3_partitioned(model):
        return _zero3_full_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Replicated weights (DDP, ZeRO-1/2) pass through; DTensor shards are gathered. Only rank 0 keeps a copy.
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained_gathered(model, directory: str, **kwargs):
    """``model.save_pretrained(directory, **kwargs)`` for a model that may be sharded across ranks.

    Every rank must call it (FSDP, ZeRO-3): the full state dict is gathered on rank 0, which alone
    writes; the others wait until the files are complete. A sharded model's own ``save_pretrained``
    called on rank 0 alone would wait forever for the other ranks' shards.
    """
    state = full_state_dict(model)
    if rank() == 0:
        model.save_pretrained(directory, state_dict=state, **kwargs)
    barrier()
