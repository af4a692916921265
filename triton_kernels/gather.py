"""gather_rows: copy the active rows of (M, d) into a packed (N, d) batch; backward scatters them back."""

import torch
import triton
import triton.language as tl

from . import reference
from .utils import check_launchable, inverse_index, launch_config


@triton.jit
def _gather_fwd_kernel(x_ptr, index_ptr, out_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program copies BLOCK_N packed rows, walking d in BLOCK_D chunks.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    src = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    src_off = src * D  # int64: M * d can pass 2**31
    dst_off = rows.to(tl.int64) * D
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        vals = tl.load(x_ptr + src_off[:, None] + cols[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + dst_off[:, None] + cols[None, :], vals, mask=mask)


@triton.jit
def _gather_bwd_kernel(grad_ptr, inv_ptr, dx_ptr, M, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One pass over all M rows of dx: skipped rows get zeros, active rows their packed gradient,
    # so dx needs no separate zero fill.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    slot = tl.load(inv_ptr + rows, mask=row_ok, other=-1)
    active = slot >= 0
    src_off = tl.where(active, slot, 0).to(tl.int64) * D
    dst_off = rows.to(tl.int64) * D
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        vals = tl.load(grad_ptr + src_off[:, None] + cols[None, :], mask=mask & active[:, None], other=0.0)
        tl.store(dx_ptr + dst_off[:, None] + cols[None, :], vals, mask=mask)


def gather_rows_forward(x: torch.Tensor, index: torch.Tensor, block_rows=None, block_cols=None) -> torch.Tensor:
    """Triton launcher. x: (M, d), index: (N,) unique row ids -> (N, d). Indices are not range-checked."""
    check_launchable(_gather_fwd_kernel, x, index)
    x, index = x.contiguous(), index.contiguous()
    N, d = index.numel(), x.shape[1]
    out = x.new_empty(N, d)
    if N * d == 0:
        return out
    block_n, block_d, warps, grid = launch_config(N, d, _gather_fwd_kernel, block_rows, block_cols)
    _gather_fwd_kernel[grid](x, index, out, N, d, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return out


def gather_rows_backward(grad: torch.Tensor, index: torch.Tensor, num_rows: int, block_rows=None,
                         block_cols=None) -> torch.Tensor:
    """Triton launcher. grad: (N, d) -> dx: (num_rows, d), zeros except dx[index] = grad."""
    check_launchable(_gather_bwd_kernel, grad, index)
    grad, d = grad.contiguous(), grad.shape[1]
    if index.numel() == 0 or num_rows * d == 0:  # nothing to scatter: skip the launch on empty buffers
        return grad.new_zeros(num_rows, d)
    dx = grad.new_empty(num_rows, d)
    inv = inverse_index(index, num_rows)  # (M,)
    block_n, block_d, warps, grid = launch_config(num_rows, d, _gather_bwd_kernel, block_rows, block_cols)
    _gather_bwd_kernel[grid](grad, inv, dx, num_rows, d, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return dx


# Registered ops: opaque to torch.compile, with shapes from the fake impls. ``backend`` is
# "triton" or "torch", resolved by the caller (dlo.ops) so the choice is a trace-time constant.
@torch.library.custom_op("dlo::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, index: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return gather_rows_forward(x, index)
    return reference.gather_rows(x, index)


@gather_rows.register_fake
def _(x, index, backend):
    return x.new_empty(index.shape[0], x.shape[1])


@torch.library.custom_op("dlo::gather_rows_backward", mutates_args=())
def gather_rows_grad(grad: torch.Tensor, index: torch.Tensor, num_rows: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return gather_rows_backward(grad, index, num_rows)
    return reference.gather_rows_backward(grad, index, num_rows)


@gather_rows_grad.register_fake
def _(grad, index, num_rows, backend):
    return grad.new_empty(num_rows, grad.shape[1])


def _setup_context(ctx, inputs, output):
    x, index, backend = inputs
    ctx.save_for_backward(index)
    ctx.num_rows, ctx.backend = x.shape[0], backend


def _backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return gather_rows_grad(grad, index, ctx.num_rows, ctx.backend), None, None


gather_rows.register_autograd(_backward, setup_context=_setup_context)
