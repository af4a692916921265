"""Triton kernels of dlo (installed as ``dlo_kernels``), each with its pure-torch twin.

Importing this package registers the ``torch.ops.dlo`` ops. Import it only as ``dlo_kernels``:
a second import under the folder name would register them twice (and fail loudly).
"""

from . import reference
from .combine import scatter_combine_backward, scatter_combine_forward
from .gather import gather_rows_backward, gather_rows_forward

__all__ = [
    "gather_rows_backward",
    "gather_rows_forward",
    "reference",
    "scatter_combine_backward",
    "scatter_combine_forward",
]
