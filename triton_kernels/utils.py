"""Launch helpers shared by the row kernels: block sizes, the inverse row map, device checks."""

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

# Elements one program touches per loop step. On a GPU this keeps ~16 values per thread at
# 8 warps; the interpreter pays ~3 ms per program instance, so there it takes far bigger tiles.
_GPU_TILE = 4096
_INTERPRETER_TILE = 1 << 16
_MAX_BLOCK_D = 1024


def interpreted(kernel) -> bool:
    """True when ``kernel`` was defined under TRITON_INTERPRET=1 (decided at import, not now)."""
    return isinstance(kernel, InterpretedFunction)


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Fail with a clear message instead of Triton's pointer error when a launch cannot work."""
    if interpreted(kernel) or all(t.is_cuda for t in tensors):
        return
    raise RuntimeError(
        "dlo Triton kernels need CUDA tensors; on CPU they run only under the Triton interpreter "
        "(TRITON_INTERPRET=1 set before dlo_kernels is imported). Use DLO_KERNELS=torch for the torch path."
    )


def launch_config(rows: int, d: int, kernel, block_rows: int | None = None, block_cols: int | None = None):
    """(BLOCK_N, BLOCK_D, num_warps, grid) for a kernel that walks ``rows`` rows in column chunks.

    A small heuristic stands in for ``@triton.autotune`` (which the interpreter cannot run with
    several configs). ``block_rows``/``block_cols`` override it; tests use that to force column
    loops and row tails.
    """
    tile = _INTERPRETER_TILE if interpreted(kernel) else _GPU_TILE
    block_d = block_cols or min(triton.next_power_of_2(d), tile if interpreted(kernel) else _MAX_BLOCK_D)
    block_n = block_rows or min(triton.next_power_of_2(rows), max(1, tile // block_d))
    num_warps = 8 if block_n * block_d >= 4096 else 4
    return block_n, block_d, num_warps, (triton.cdiv(rows, block_n),)


def inverse_index(index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(N,) unique row ids -> (num_rows,) int32 map: row -> its slot in the packed batch, or -1.

    Built on the device without a host sync; it lets one pass over all rows handle active and
    skipped rows alike, so no separate copy of h (or zero fill) is needed.
    """
    inv = torch.full((num_rows,), -1, dtype=torch.int32, device=index.device)
    return inv.index_copy_(0, index, torch.arange(index.numel(), dtype=torch.int32, device=index.device))
