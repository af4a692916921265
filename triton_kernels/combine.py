"""scatter_combine: y = h, and y[index] = h[index] + gate * (f - h[index]) for the active rows.

Both kernels make one pass over all M rows through the inverse map (row -> packed slot or -1):
skipped rows are a plain copy (forward) or pass dy through (backward), active rows also read
their packed f and gate. So y needs no separate copy of h: each full-size tensor is read or
written once, each packed one once, which is the memory-traffic minimum.
"""

import torch
import triton
import triton.language as tl

from . import reference
from .utils import check_launchable, inverse_index, launch_config


@triton.jit
def _combine_fwd_kernel(h_ptr, f_ptr, gate_ptr, inv_ptr, y_ptr, M, D,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    slot = tl.load(inv_ptr + rows, mask=row_ok, other=-1)
    active = slot >= 0
    slot = tl.where(active, slot, 0).to(tl.int64)
    g = tl.load(gate_ptr + slot, mask=active, other=0.0).to(tl.float32)[:, None]  # (BLOCK_N, 1)
    h_off = rows.to(tl.int64) * D
    f_off = slot * D
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        h = tl.load(h_ptr + h_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + f_off[:, None] + cols[None, :], mask=mask & active[:, None], other=0.0).to(tl.float32)
        # where(), not h + 0 * (f - h): skipped rows must be h bit for bit (0 * inf would be NaN).
        y = tl.where(active[:, None], h + g * (f - h), h)
        tl.store(y_ptr + h_off[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(dy_ptr, h_ptr, f_ptr, gate_ptr, inv_ptr, dh_ptr, df_ptr, dgate_ptr, M, D,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    slot = tl.load(inv_ptr + rows, mask=row_ok, other=-1)
    active = slot >= 0
    slot = tl.where(active, slot, 0).to(tl.int64)
    g = tl.load(gate_ptr + slot, mask=active, other=0.0).to(tl.float32)[:, None]  # (BLOCK_N, 1)
    h_off = rows.to(tl.int64) * D
    f_off = slot * D
    dgate = tl.zeros((BLOCK_N,), dtype=tl.float32)  # the row dot product, accumulated over chunks
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        on = mask & active[:, None]
        dy = tl.load(dy_ptr + h_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + h_off[:, None] + cols[None, :], mask=on, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + f_off[:, None] + cols[None, :], mask=on, other=0.0).to(tl.float32)
        dh = tl.where(active[:, None], (1.0 - g) * dy, dy)
        tl.store(dh_ptr + h_off[:, None] + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(df_ptr + f_off[:, None] + cols[None, :], (g * dy).to(df_ptr.dtype.element_ty), mask=on)
        dgate += tl.sum(dy * (f - h), axis=1)
    tl.store(dgate_ptr + slot, dgate.to(dgate_ptr.dtype.element_ty), mask=active)


def scatter_combine_forward(h, f, gate, index, block_rows=None, block_cols=None) -> torch.Tensor:
    """Triton launcher. h: (M, d), f: (N, d), gate: (N,), index: (N,) unique row ids -> y: (M, d), h's dtype."""
    check_launchable(_combine_fwd_kernel, h, f, gate, index)
    h, f, gate, index = (t.contiguous() for t in (h, f, gate, index))
    (N,), (M, d) = index.shape, h.shape
    if N == 0 or M * d == 0:  # nothing active: y is h; skip the launch on empty f/gate buffers
        return h.clone()
    y = torch.empty_like(h)
    inv = inverse_index(index, M)  # (M,)
    block_n, block_d, warps, grid = launch_config(M, d, _combine_fwd_kernel, block_rows, block_cols)
    _combine_fwd_kernel[grid](h, f, gate, inv, y, M, d, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return y


def scatter_combine_backward(dy, h, f, gate, index, block_rows=None, block_cols=None):
    """Triton launcher. dy: (M, d) -> dh (M, d), df (N, d), dgate (N,) in the dtypes of h, f, gate."""
    check_launchable(_combine_bwd_kernel, dy, h, f, gate, index)
    h, f, gate, index = (t.contiguous() for t in (h, f, gate, index))
    (N,), (M, d) = index.shape, h.shape
    dy = dy.contiguous()
    if N == 0 or M * d == 0:
        return dy.to(h.dtype, copy=True), f.new_zeros(f.shape), gate.new_zeros(gate.shape)
    dh, df, dgate = torch.empty_like(h), torch.empty_like(f), torch.empty_like(gate)
    inv = inverse_index(index, M)  # (M,)
    block_n, block_d, warps, grid = launch_config(M, d, _combine_bwd_kernel, block_rows, block_cols)
    _combine_bwd_kernel[grid](dy, h, f, gate, inv, dh, df, dgate, M, d,
                              BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return dh, df, dgate


# Registered ops (see gather.py): ``backend`` is "triton" or "torch", fixed by the caller.
@torch.library.custom_op("dlo::scatter_combine", mutates_args=())
def scatter_combine(h: torch.Tensor, f: torch.Tensor, gate: torch.Tensor, index: torch.Tensor,
                    backend: str) -> torch.Tensor:
    if backend == "triton":
        return scatter_combine_forward(h, f, gate, index)
    return reference.scatter_combine(h, f, gate, index)


@scatter_combine.register_fake
def _(h, f, gate, index, backend):
    return torch.empty_like(h)


@torch.library.custom_op("dlo::scatter_combine_backward", mutates_args=())
def scatter_combine_grad(dy: torch.Tensor, h: torch.Tensor, f: torch.Tensor, gate: torch.Tensor,
                         index: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return scatter_combine_backward(dy, h, f, gate, index)
    return reference.scatter_combine_backward(dy, h, f, gate, index)


@scatter_combine_grad.register_fake
def _(dy, h, f, gate, index, backend):
    return torch.empty_like(h), torch.empty_like(f), torch.empty_like(gate)


def _setup_context(ctx, inputs, output):
    h, f, gate, index, backend = inputs
    ctx.save_for_backward(h, f, gate, index)
    ctx.backend = backend


def _backward(ctx, dy):
    return *scatter_combine_grad(dy, *ctx.saved_tensors, ctx.backend), None, None


scatter_combine.register_autograd(_backward, setup_context=_setup_context)
