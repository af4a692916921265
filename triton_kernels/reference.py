"""Pure-torch twins of the Triton kernels: the CPU path and the test oracle.

Same contracts as the kernels: ``index`` holds N unique row ids in [0, M); arithmetic runs in
fp32 (fp64 stays fp64) and each result takes the dtype of the tensor it is the value or gradient of.
"""

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast half types to fp32 for the arithmetic, as the kernels do; fp64 keeps its precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (M, d), index: (N,) -> (N, d) = x[index]."""
    return x.index_select(0, index)


def gather_rows_backward(grad: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """grad: (N, d) -> dx: (num_rows, d), zeros except dx[index] = grad."""
    return grad.new_zeros(num_rows, grad.shape[1]).index_copy_(0, index, grad)


def scatter_combine(h: torch.Tensor, f: torch.Tensor, gate: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y = h; y[index] = h[index] + gate * (f - h[index]).  h: (M, d), f: (N, d), gate: (N,) -> (M, d)."""
    h_sel = _acc(h.index_select(0, index))  # (N, d)
    update = h_sel + _acc(gate).unsqueeze(1) * (_acc(f) - h_sel)  # (N, d)
    return h.index_copy(0, index, update.to(h.dtype))


def scatter_combine_backward(dy: torch.Tensor, h: torch.Tensor, f: torch.Tensor, gate: torch.Tensor,
                             index: torch.Tensor):
    """dy: (M, d) -> dh (M, d), df (N, d), dgate (N,) of scatter_combine."""
    g = _acc(gate).unsqueeze(1)  # (N, 1)
    dy_sel = _acc(dy.index_select(0, index))  # (N, d)
    dh = dy.to(h.dtype).index_copy(0, index, ((1 - g) * dy_sel).to(h.dtype))
    df = (g * dy_sel).to(f.dtype)
    dgate = (dy_sel * (_acc(f) - _acc(h.index_select(0, index)))).sum(1).to(gate.dtype)
    return dh, df, dgate
