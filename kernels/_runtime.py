"""Shared plumbing for the Triton ops: backend choice and compiled-vs-interpreted kernels.

Backend choice (one process-wide setting, read as a plain module global so `torch.compile` guards on it):
  "auto"      - Triton on CUDA tensors, the PyTorch reference elsewhere (the default).
  "triton"    - always Triton; on CPU tensors the kernels run in Triton's interpreter (slow, fp32; for tests).
  "reference" - always the PyTorch reference (the specification).
The initial value comes from the environment variable MATPAC_KERNELS_BACKEND (default "auto").

Triton on CPU tensors means Triton's interpreter, and the interpreter must be chosen before triton is first imported
in the process: `TRITON_INTERPRET=1` is read when `@triton.jit` decorates a function, including triton's own standard
library (tl.sum, tl.max, ...), so setting it later leaves compiled stdlib functions the interpreter cannot call.
`interpreter_active()` says whether this process got it right; the "triton" backend on CPU tensors raises otherwise.
"""

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # triton is a Linux-only dependency; the references still work without it
    triton = None
    HAVE_TRITON = False

    class _NoTritonLanguage:
        constexpr = None  # only used as a parameter annotation when triton is missing

    tl = _NoTritonLanguage()

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "MATPAC_KERNELS_BACKEND"


def _validated(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; use one of {BACKENDS} (e.g. {ENV_VAR}=auto)")
    return name


_backend = _validated(os.environ.get(ENV_VAR) or "auto")  # set but empty: the default, as unset


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "triton" or "reference")."""
    global _backend
    _backend = _validated(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily set the backend: `with use_backend("triton"): ...`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(device: torch.device, supported: bool = True, why: str = "") -> bool:
    """Whether an op on `device` runs its Triton kernel.

    `supported` is False when the op's kernel cannot handle these arguments (e.g. K too large): "auto" then falls
    back to the reference, while a forced "triton" backend raises so a benchmark or test never measures the wrong path.
    """
    backend = get_backend()
    if backend == "reference":
        return False
    if backend == "auto":
        return device.type == "cuda" and HAVE_TRITON and supported
    if not HAVE_TRITON:
        raise ValueError("the 'triton' kernel backend is chosen (set_backend / use_backend / "
                         f"{ENV_VAR}) but triton is not installed; pip install triton or use 'auto'")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton kernels run on CUDA or (interpreted) CPU tensors, not {device.type}")
    if device.type == "cpu" and not interpreter_active():
        raise ValueError(
            "Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before triton is first imported"
        )
    if not supported:
        raise ValueError(f"the Triton kernel does not support these arguments ({why}); use backend 'auto'")
    return True


def jit(fn):
    """`triton.jit` when triton is installed; the bare function otherwise (only the references run then)."""
    return triton.jit(fn) if HAVE_TRITON else fn


def _detect_interpreter() -> bool:
    if not HAVE_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


# Decided once, when triton is imported (above), and fixed for the life of the process. A plain module global, not
# a call: under torch.compile on CUDA, dynamo cannot evaluate `isinstance(<triton kernel>, InterpretedFunction)` and
# would break the graph at every kernel call (seen on an H200: fullgraph=True failed, the trainer's graph split).
_INTERPRETER = _detect_interpreter()


def interpreter_active() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1, so kernels can run on CPU tensors."""
    return _INTERPRETER


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
