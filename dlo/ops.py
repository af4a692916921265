"""Row gather / fused combine used by routed layers (torch path; Triton plugs in here)."""

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (M, d), index: (N,) unique row ids -> (N, d)."""
    return x.index_select(0, index)


def scatter_combine(h: torch.Tensor, f: torch.Tensor, gate: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y = h; y[index] = h[index] + gate * (f - h[index]).  h: (M, d), f: (N, d), gate: (N,), index: (N,)."""
    h_sel = h.index_select(0, index)
    update = (gate.to(h.dtype).unsqueeze(-1) * (f - h_sel))
    return h.index_add(0, index, update)


def flat_row_index(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, k) positions -> (B*k,) rows of the flattened (B*T, d) batch."""
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * seq_len
    return (idx + offsets).reshape(-1)


def active_positions(active: torch.Tensor):
    """active: (B, T) bool -> idx (B, K) ascending active positions padded with inactive ones, valid (B, K)."""
    K = int(active.sum(1).max().item()) if active.numel() else 0
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :max(K, 1)]
    return order, active.gather(1, order)
