"""Row gather / fused combine used by routed layers, and the index helpers that feed them.

Backend: Triton kernels on CUDA tensors, their torch twins on CPU (and for fp64, which the fp32
kernels would round). ``DLO_KERNELS=auto|torch|triton`` forces either; ``triton`` on CPU tensors
runs only under TRITON_INTERPRET=1 (tests), else it raises. Where dlo is not installed (a routed
checkpoint's own copy of this module, docs/DESIGN.md §11) only the torch twins run.
"""

import os

import torch

try:
    import dlo_kernels  # registers torch.ops.dlo.* (the Triton kernels and their torch twins)
except ImportError:  # a routed checkpoint's own copy of this module, loaded where dlo is not installed
    dlo_kernels = None
    from .dlo_kernels_reference import gather_rows as twin_gather_rows
    from .dlo_kernels_reference import scatter_combine as twin_scatter_combine

BACKENDS = ("auto", "torch", "triton")


def kernel_backend(t: torch.Tensor) -> str:
    """"triton" or "torch" for an op on ``t``; read on every call so the switch works at runtime."""
    choice = os.environ.get("DLO_KERNELS", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"DLO_KERNELS={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if t.is_cuda and t.dtype != torch.float64 else "torch"
    return choice


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (M, d), index: (N,) unique row ids -> (N, d) = x[index]. Differentiable w.r.t. x."""
    if dlo_kernels is None:
        return twin_gather_rows(x, index)
    return torch.ops.dlo.gather_rows(x, index, kernel_backend(x))


def scatter_combine(h: torch.Tensor, f: torch.Tensor, gate: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y = h; y[index] = h[index] + gate * (f - h[index]).  h: (M, d), f: (N, d), gate: (N,), index: (N,).

    Differentiable w.r.t. h, f and gate (dgate accumulated in fp32); y has h's dtype.
    """
    if dlo_kernels is None:
        return twin_scatter_combine(h, f, gate, index)
    return torch.ops.dlo.scatter_combine(h, f, gate, index, kernel_backend(h))


def flat_row_index(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, k) positions -> (B*k,) rows b*T + idx of the flattened (B*T, d) batch. No host sync."""
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * seq_len  # (B, 1)
    return (idx + offsets).reshape(-1)


def active_positions(active: torch.Tensor):
    """active: (B, T) bool -> idx (B, K), valid (B, K) for a packed batch of the active tokens.

    Row b of idx lists its active positions in ascending order, then inactive positions as filler
    (valid False), so every row's ids stay unique. K = max active count per row, at least 1 so the
    packed batch is never empty. Reading K is one host sync: this is the inference path only;
    training uses per-sequence top-k, whose k is known on the host.
    """
    K = int(active.sum(1).max().item()) if active.numel() else 0
    # A stable sort on "inactive" puts active positions first, each group in position order.
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, : max(K, 1)]  # (B, K)
    return order, active.gather(1, order)
