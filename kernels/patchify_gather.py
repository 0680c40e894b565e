"""Fused normalise → patchify → gather of visible and masked tokens, in one pass over the log-mel input.

Shapes: lms (B, 1, F, T) raw log-mel in any float dtype; n_f = F / patch, n_t = T / patch patches per axis;
patch index = f_idx * n_t + t_idx (frequency-major); token pixels in (f, t) row-major order inside the patch, so a
Conv2d(1, D, patch, patch) weight reshaped to (D, patch²) is the equivalent linear. No gradient (data).

Triton kernel: one program per (batch row, block of TOK tokens); a program reads each token's patch index, loads its
patch² pixels straight from the strided input, normalises in fp32, casts and stores. Visible and masked tokens are
produced by the same launch (program blocks [0, ceil(Nv/TOK)) write the visible tokens, the rest the masked ones),
so every input pixel that is needed is read exactly once and nothing intermediate is written.
Out-of-range patch indices: an error on every path, as in the reference (see `patchify_gather` for how, without a
host sync on CUDA); the kernel itself never reads out of bounds, writes NaN tokens for such indices, and reports
them in a per-program flag that the caller asserts on (one reduction, no separate pass over the indices).
"""

import math
import numbers

import torch

from ._runtime import interpreter_active, jit, tl, use_triton

# 4 tokens x 256 pixels per program over 4 warps: 8 elements (8 64-bit pointers) per thread. 16 tokens needed
# ~140 registers on sm_90 (see `python -m matpac_kernels._compile_check`), too few resident warps for a pure copy.
TOKENS_PER_PROGRAM = 4
NUM_WARPS = 4


def reference_patchify_gather(lms_B1FT, mean, std, vis_idx_BNv, mask_idx_BNm, patch=16, out_dtype=torch.float32):
    """The specification, in plain PyTorch. Returns (vis (B, Nv, patch²), mask (B, Nm, patch²)) in out_dtype."""
    x = (lms_B1FT.float() - float(mean)) / float(std)
    B, _, F, T = x.shape
    n_f, n_t = F // patch, T // patch
    patches_BNP = x.reshape(B, n_f, patch, n_t, patch).permute(0, 1, 3, 2, 4).reshape(B, n_f * n_t, patch * patch)

    def gather(idx_BN):
        return torch.gather(patches_BNP, 1, idx_BN.long()[..., None].expand(-1, -1, patch * patch)).to(out_dtype)

    return gather(vis_idx_BNv), gather(mask_idx_BNm)


@jit
def _patchify_gather_kernel(
    lms_ptr,
    vis_idx_ptr,
    mask_idx_ptr,
    vis_out_ptr,
    mask_out_ptr,
    ok_ptr,
    mean,
    std,
    n_vis,
    n_mask,
    n_t,
    n_patches,
    s_lb,
    s_lf,
    s_lt,
    s_vb,
    s_vn,
    s_mb,
    s_mn,
    PATCH: tl.constexpr,
    TOK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    n_vis_blocks = tl.cdiv(n_vis, TOK)
    # Branch-free choice between the visible and the masked output: both loads/stores are issued, one fully masked.
    is_vis = blk < n_vis_blocks
    is_mask = blk >= n_vis_blocks
    tok0 = tl.where(is_vis, blk, blk - n_vis_blocks) * TOK
    toks = tok0 + tl.arange(0, TOK)
    vis_ok = is_vis & (toks < n_vis)
    mask_ok = is_mask & (toks < n_mask)

    pidx = tl.load(vis_idx_ptr + b * s_vb + toks * s_vn, mask=vis_ok, other=0).to(tl.int64)
    pidx += tl.load(mask_idx_ptr + b * s_mb + toks * s_mn, mask=mask_ok, other=0).to(tl.int64)
    in_range = (pidx >= 0) & (pidx < n_patches)
    f0 = (pidx // n_t) * PATCH
    t0 = (pidx % n_t) * PATCH

    pix = tl.arange(0, PATCH * PATCH)
    r = pix // PATCH
    c = pix % PATCH
    src = lms_ptr + b * s_lb + (f0[:, None] + r[None, :]) * s_lf + (t0[:, None] + c[None, :]) * s_lt
    x = tl.load(src, mask=((vis_ok | mask_ok) & in_range)[:, None], other=0.0).to(tl.float32)
    # fp32 as in an eager launch: torch.compile passes the Python floats mean and std as fp64.
    y = (x - tl.cast(mean, tl.float32)) / tl.cast(std, tl.float32)
    y = tl.where(in_range[:, None], y, float("nan"))

    dst = toks[:, None].to(tl.int64) * (PATCH * PATCH) + pix[None, :]
    tl.store(vis_out_ptr + b * n_vis * (PATCH * PATCH) + dst, y.to(vis_out_ptr.dtype.element_ty), mask=vis_ok[:, None])
    tl.store(
        mask_out_ptr + b * n_mask * (PATCH * PATCH) + dst, y.to(mask_out_ptr.dtype.element_ty), mask=mask_ok[:, None]
    )
    # One flag per program, always written (no memset needed): 1 when every index it read was in range.
    n_bad = tl.sum(((vis_ok | mask_ok) & ~in_range).to(tl.int32), axis=0)
    tl.store(ok_ptr + b * tl.num_programs(1) + blk, (n_bad == 0).to(tl.int32))


def _launch(lms, mean, std, vis_idx, mask_idx, patch, out_dtype, wrap=None):
    B, _, F, T = lms.shape
    n_t = T // patch
    n_vis, n_mask = vis_idx.shape[1], mask_idx.shape[1]
    P = patch * patch
    vis_out = torch.empty((B, n_vis, P), dtype=out_dtype, device=lms.device)
    mask_out = torch.empty((B, n_mask, P), dtype=out_dtype, device=lms.device)
    ok = torch.empty(_n_programs(B, n_vis, n_mask), dtype=torch.int32, device=lms.device)
    kernel = _patchify_gather_kernel if wrap is None else wrap(_patchify_gather_kernel)
    grid = (B, _n_programs(1, n_vis, n_mask))
    kernel[grid](
        lms, vis_idx, mask_idx, vis_out, mask_out, ok,
        mean, std, n_vis, n_mask, n_t, (F // patch) * n_t,
        lms.stride(0), lms.stride(2), lms.stride(3),
        vis_idx.stride(0), vis_idx.stride(1), mask_idx.stride(0), mask_idx.stride(1),
        PATCH=patch, TOK=TOKENS_PER_PROGRAM, num_warps=NUM_WARPS,
    )  # fmt: skip
    return vis_out, mask_out, ok


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _n_programs(batch: int, n_vis: int, n_mask: int) -> int:
    """Programs (and index flags) of one launch: per batch row, the visible blocks then the masked ones."""
    return batch * (triton_cdiv(n_vis, TOKENS_PER_PROGRAM) + triton_cdiv(n_mask, TOKENS_PER_PROGRAM))


# The interpreter path (CPU tensors) is an opaque custom op: torch.compile(fullgraph=True) traces through it, which
# a triton_op cannot do in interpreter mode. On CUDA a triton_op lets inductor see and schedule the kernel itself.
@torch.library.custom_op("matpac_kernels::patchify_gather_interp", mutates_args=())
def _patchify_gather_interp(
    lms: torch.Tensor,
    mean: float,
    std: float,
    vis_idx: torch.Tensor,
    mask_idx: torch.Tensor,
    patch: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(lms, mean, std, vis_idx, mask_idx, patch, out_dtype)


@_patchify_gather_interp.register_fake
def _(lms, mean, std, vis_idx, mask_idx, patch, out_dtype):
    P = patch * patch
    B, n_vis, n_mask = lms.shape[0], vis_idx.shape[1], mask_idx.shape[1]
    return (
        lms.new_empty((B, n_vis, P), dtype=out_dtype),
        lms.new_empty((B, n_mask, P), dtype=out_dtype),
        lms.new_empty((_n_programs(B, n_vis, n_mask),), dtype=torch.int32),
    )


@torch.library.triton_op("matpac_kernels::patchify_gather_cuda", mutates_args=())
def _patchify_gather_cuda(
    lms: torch.Tensor,
    mean: float,
    std: float,
    vis_idx: torch.Tensor,
    mask_idx: torch.Tensor,
    patch: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(lms, mean, std, vis_idx, mask_idx, patch, out_dtype, wrap=torch.library.wrap_triton)


def _check_inputs(lms_B1FT, mean, std, vis_idx_BNv, mask_idx_BNm, patch, out_dtype):
    # None or `float` ran on the reference (.to() took them: no cast, float64) and failed inside the kernel's op
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point torch.dtype (e.g. torch.float32), got {out_dtype!r}")
    if isinstance(patch, bool) or not isinstance(patch, numbers.Integral) or patch < 1:
        raise ValueError(f"patch must be a positive integer (16 for the paper's model), got {patch!r}")
    if lms_B1FT.dim() != 4 or lms_B1FT.shape[1] != 1:
        raise ValueError(f"lms must have shape (B, 1, F, T), got {tuple(lms_B1FT.shape)}; add the channel dim")
    if lms_B1FT.is_complex():  # the kernel failed with KeyError 'complex64'; the reference dropped the imaginary part
        raise ValueError(f"lms must be real (a log-mel), got {lms_B1FT.dtype}")
    _, _, F, T = lms_B1FT.shape
    if F % patch or T % patch:
        raise ValueError(f"F={F} and T={T} must be multiples of patch={patch}; crop or pad the input first")
    for name, idx in (("vis_idx", vis_idx_BNv), ("mask_idx", mask_idx_BNm)):
        if idx.dim() != 2 or idx.shape[0] != lms_B1FT.shape[0]:
            raise ValueError(f"{name} must have shape (B={lms_B1FT.shape[0]}, N), got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {idx.dtype}")
        if idx.device != lms_B1FT.device:
            raise ValueError(f"{name} is on {idx.device} but lms is on {lms_B1FT.device}; move both to one device")
    for name, v in (("mean", mean), ("std", std)):
        # float() took "0" on the kernel path while the reference failed on it (as centered_xent's temperatures)
        if not isinstance(v, torch.Tensor | numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{name} must be a float or a one-element tensor, got {type(v).__name__} {v!r}")
    # Comparisons, not math.isfinite: torch.compile traces a float argument as a symbolic float, which compares
    # (a guard) but is not a Python float (isfinite was a graph break)
    if not -math.inf < float(mean) < math.inf:  # NaN or inf made every patch NaN, silently
        raise ValueError(f"mean must be finite, got {float(mean)}")
    if not 0 < float(std) < math.inf:  # inf made every patch 0
        raise ValueError(f"std must be positive and finite, got {float(std)}")


INDEX_ERROR = (
    "patchify_gather: vis_idx or mask_idx holds a patch index outside [0, n_patches), n_patches = (F / patch) * "
    "(T / patch); make the masks for this input's patch grid"
)


def _assert_indices_in_range(ok_flags: torch.Tensor) -> None:
    """RuntimeError(INDEX_ERROR) at once on CPU; a device-side assert on CUDA (no host sync, see patchify_gather).
    `ok_flags`: the kernel's per-program flags (1 = every index that program read was in range)."""
    torch._assert_async(ok_flags.all(), INDEX_ERROR)


def patchify_gather(lms_B1FT, mean, std, vis_idx_BNv, mask_idx_BNm, patch=16, out_dtype=torch.float32):
    """Normalise (x - mean) / std in fp32, cut patch×patch patches, gather the visible and masked ones, cast.

    Args: lms_B1FT raw log-mel (B, 1, F, T), any float dtype; mean, std Python floats; vis_idx_BNv, mask_idx_BNm
    int64/int32 patch indices in [0, n_patches), n_patches = (F / patch) * (T / patch) (patch index =
    f_idx * n_t + t_idx), on the device of lms; patch a power of two for the Triton path.
    Returns (vis (B, Nv, patch²), mask (B, Nm, patch²)) in out_dtype, a floating-point torch.dtype. Runs the Triton
    kernel on CUDA (see `matpac_kernels.use_backend`), the reference `reference_patchify_gather` elsewhere, and also
    on CUDA when lms requires grad (the kernel has none; a forced "triton" backend raises then).

    An index outside [0, n_patches) is an error, never a silent result, on every path, as in the reference
    (torch.gather): on CPU tensors (reference, or the kernel under TRITON_INTERPRET=1) a RuntimeError at the call;
    on CUDA a device-side assert (`torch._assert_async`): the launch returns without waiting and the error is
    raised at the next synchronisation as "CUDA error: device-side assert triggered", after which the process's
    CUDA context is unusable (run with CUDA_LAUNCH_BLOCKING=1, or on CPU, to find the call). The kernel checks the
    indices it reads and writes one flag per program, so the check costs one small reduction over those flags and
    the assert: two launches after the kernel, no host sync. (A separate pass over the indices in PyTorch was
    ~10 launches: ~0.1 ms per call on an H200 outside `torch.compile`.) The alternative, NaN tokens alone, would
    keep the process alive but let a trainer skip such steps as non-finite instead of failing. The kernel still
    writes NaN (never an out-of-bounds read) for such an index, which is what remains where device asserts are
    compiled out (ROCm builds without GPU asserts).
    """
    _check_inputs(lms_B1FT, mean, std, vis_idx_BNv, mask_idx_BNm, patch, out_dtype)
    patch = int(patch)  # a numpy integer is accepted; the op schemas and Triton's constexpr get a plain int
    pow2 = patch > 0 and patch & (patch - 1) == 0
    # The op registers no backward (log-mels are data): for an lms that needs a gradient, "auto" runs the reference,
    # which differentiates, on every device (it used to raise on CUDA only, so code tested on CPU failed on a GPU);
    # a forced "triton" backend refuses rather than return outputs that fail only at backward().
    needs_grad = lms_B1FT.requires_grad and torch.is_grad_enabled()
    why = ("lms requires grad and the kernel has no gradient: pass lms.detach()" if needs_grad
           else f"patch={patch} is not a power of two")
    if not use_triton(lms_B1FT.device, supported=pow2 and not needs_grad, why=why):
        return reference_patchify_gather(lms_B1FT, mean, std, vis_idx_BNv, mask_idx_BNm, patch, out_dtype)
    # The kernel needs one index dtype for both index tensors (the branch-free load adds them).
    vis_idx, mask_idx = vis_idx_BNv.long(), mask_idx_BNm.long()
    op = _patchify_gather_cuda if lms_B1FT.is_cuda and not interpreter_active() else _patchify_gather_interp
    vis, mask, ok = op(lms_B1FT, float(mean), float(std), vis_idx, mask_idx, patch, out_dtype)
    _assert_indices_in_range(ok)
    return vis, mask
