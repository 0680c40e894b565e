"""Triton kernels for matpac_fast's hot spots, each with the pure-PyTorch reference that specifies it.

Installed under the import name `matpac_kernels` (a PyPI package named `kernels` exists). The public functions run
Triton on CUDA and the reference elsewhere; `use_backend("triton" | "reference" | "auto")` or the environment
variable MATPAC_KERNELS_BACKEND overrides that (Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is
first imported).
"""

from ._runtime import BACKENDS, get_backend, interpreter_active, set_backend, use_backend
from .attention import packed_attention, reference_packed_attention
from .centered_xent import centered_softmax_xent, reference_centered_softmax_xent
from .patchify_gather import patchify_gather, reference_patchify_gather

__all__ = [
    "BACKENDS",
    "centered_softmax_xent",
    "get_backend",
    "interpreter_active",
    "packed_attention",
    "patchify_gather",
    "reference_centered_softmax_xent",
    "reference_packed_attention",
    "reference_patchify_gather",
    "set_backend",
    "use_backend",
]
