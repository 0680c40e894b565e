"""Fused centred-softmax cross-entropy (MATPAC's classification loss) with its statistics, forward and backward.

Per row m of M rows with K classes (K ≤ 8192 for the kernel):
  p = softmax((teacher - center) / tau_t)        the teacher's target distribution (no gradient)
  loss = -(p * log_softmax(student / tau_s)).sum()
  entropy = -(p * log p).sum(), max_prob = p.max()
  center_sum = p.sum over rows ("prob", the authors' centring) or teacher.sum over rows ("logit", DINO's)
The eager version materialises several (M, K) fp32 tensors; the kernel keeps a row in registers (fp32) and writes
only O(M) values plus one (G, K) partial column-sum buffer (G = number of programs).

Forward kernel: each program walks ROWS consecutive rows (one row at a time, whole row in registers), stores per-row
loss / entropy / max prob and both log-sum-exps (for the backward), and accumulates its rows' column sums in
registers; the launcher reduces the (G, K) partials with `sum(0)`. No atomics, so the centre statistics are
bit-for-bit deterministic for a given shape and device (ROWS depends on M and the GPU's SM count).
Backward kernel: one row per program, recomputes both softmaxes from the saved log-sum-exps:
  d loss / d student = (softmax(student / tau_s) - p) / tau_s * grad_loss[row]
"""

import numbers

import torch

from ._runtime import interpreter_active, jit, next_pow2, tl, use_triton

MAX_K = 8192
CENTER_MODES = ("prob", "logit")


def reference_centered_softmax_xent(student_MK, teacher_MK, center_K, tau_s, tau_t, center_mode="prob"):
    """The specification, in plain PyTorch (fp32). Returns (loss_M, center_sum_K, entropy_M, max_prob_M).

    Same numbers as `matpac_fast.losses.centered_softmax_xent_reference` (the model's copy)."""
    if center_mode not in CENTER_MODES:
        raise ValueError(f"center_mode must be one of {CENTER_MODES}, got {center_mode!r}")
    # one-element tau tensors as 0-dim fp32: a (1,) float64 tau made every output float64
    tau_s, tau_t = (t.reshape(()).float() if isinstance(t, torch.Tensor) else t for t in (tau_s, tau_t))
    with torch.no_grad():  # the teacher side is a target: no gradient, to tau_t either (as the model's copy)
        teacher = teacher_MK.detach().float()
        log_p = torch.log_softmax((teacher - center_K.detach().float()) / tau_t, dim=-1)
        p = log_p.exp()
        center_sum = p.sum(0) if center_mode == "prob" else teacher.sum(0)
        entropy = -(p * log_p).sum(-1)
        max_prob = p.max(-1).values
    loss = -(p * torch.log_softmax(student_MK.float() / tau_s, dim=-1)).sum(-1)
    return loss, center_sum, entropy, max_prob


@jit
def _xent_fwd_kernel(
    s_ptr,
    t_ptr,
    c_ptr,
    loss_ptr,
    ent_ptr,
    maxp_ptr,
    logsum_s_ptr,
    logsum_t_ptr,
    colsum_ptr,
    M,
    K,
    s_row_stride,
    t_row_stride,
    tau_ptr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    PROB_CENTER: tl.constexpr,
):
    pid = tl.program_id(0)
    tau_s = tl.load(tau_ptr).to(tl.float32)
    tau_t = tl.load(tau_ptr + 1).to(tl.float32)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    center = tl.load(c_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        row_ok = row < M
        ok = col_ok & row_ok
        row64 = row.to(tl.int64)
        t = tl.load(t_ptr + row64 * t_row_stride + cols, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + row64 * s_row_stride + cols, mask=ok, other=0.0).to(tl.float32)

        # Teacher: log p = (z - max z) - log sum exp(z - max z). Subtracting the max before the log-sum (instead of
        # z - lse) keeps peaked rows exact: with tau_t = 0.04, z reaches the hundreds where an fp32 ulp is ~1e-5.
        # Padding columns get -inf (exp -> 0) and are zeroed before any product, so no 0 * inf appears.
        z = tl.where(col_ok, (t - center) / tau_t, float("-inf"))
        z_shift = z - tl.max(z, 0)
        e = tl.exp(z_shift)
        z_sum = tl.sum(e, 0)
        log_sum_t = tl.log(z_sum)
        p = e / z_sum
        log_p = tl.where(col_ok, z_shift - log_sum_t, 0.0)
        entropy = -tl.sum(p * log_p, 0)
        max_prob = tl.max(p, 0)

        # Student: log q = (y - max y) - log sum exp(y - max y).
        y = tl.where(col_ok, s / tau_s, float("-inf"))
        y_shift = y - tl.max(y, 0)
        log_sum_s = tl.log(tl.sum(tl.exp(y_shift), 0))
        loss = -tl.sum(p * tl.where(col_ok, y_shift - log_sum_s, 0.0), 0)

        tl.store(loss_ptr + row, loss, mask=row_ok)
        tl.store(ent_ptr + row, entropy, mask=row_ok)
        tl.store(maxp_ptr + row, max_prob, mask=row_ok)
        tl.store(logsum_s_ptr + row, log_sum_s, mask=row_ok)
        tl.store(logsum_t_ptr + row, log_sum_t, mask=row_ok)
        if PROB_CENTER:
            acc += tl.where(ok, p, 0.0)
        else:
            acc += tl.where(ok, t, 0.0)
    tl.store(colsum_ptr + pid.to(tl.int64) * K + cols, acc, mask=col_ok)


@jit
def _xent_bwd_kernel(
    g_ptr,
    s_ptr,
    t_ptr,
    c_ptr,
    logsum_s_ptr,
    logsum_t_ptr,
    ds_ptr,
    K,
    s_row_stride,
    t_row_stride,
    ds_row_stride,
    tau_ptr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tau_s = tl.load(tau_ptr).to(tl.float32)
    tau_t = tl.load(tau_ptr + 1).to(tl.float32)
    cols = tl.arange(0, BLOCK_K)
    ok = cols < K
    t = tl.load(t_ptr + row * t_row_stride + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + row * s_row_stride + cols, mask=ok, other=0.0).to(tl.float32)
    center = tl.load(c_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    # Recompute both softmaxes: the maxima from the row (exact, cheap in registers), the log-sums from the forward.
    z = tl.where(ok, (t - center) / tau_t, float("-inf"))
    y = tl.where(ok, s / tau_s, float("-inf"))
    p = tl.exp(z - tl.max(z, 0) - tl.load(logsum_t_ptr + row))
    q = tl.exp(y - tl.max(y, 0) - tl.load(logsum_s_ptr + row))
    g = tl.load(g_ptr + row).to(tl.float32)
    ds = (q - p) / tau_s * g
    tl.store(ds_ptr + row * ds_row_stride + cols, ds.to(ds_ptr.dtype.element_ty), mask=ok)


def _num_warps(block_k: int) -> int:
    return min(16, max(4, block_k // 256))


def _rows_per_program(M: int, device: torch.device) -> int:
    """Rows per forward program: enough programs to fill the GPU (~4 per SM), few enough to keep the (G, K)
    partial buffer small. A pure function of (M, device), so the reduction order is reproducible."""
    if device.type != "cuda":
        return 4  # the interpreter: small, and M > 4 exercises the multi-row loop and its masked tail
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(32, -(-M // (4 * sms))))


def _fwd_launch(student, teacher, center, taus, prob_center, wrap=None):
    M, K = student.shape
    dev = student.device
    rows = _rows_per_program(M, dev)
    n_prog = max(1, -(-M // rows))
    f32 = dict(dtype=torch.float32, device=dev)
    loss, ent, maxp, logsum_s, logsum_t = (torch.empty(M, **f32) for _ in range(5))
    partial = torch.empty((n_prog, K), **f32)
    block_k = next_pow2(K)
    kernel = _xent_fwd_kernel if wrap is None else wrap(_xent_fwd_kernel)
    kernel[(n_prog,)](
        student, teacher, center, loss, ent, maxp, logsum_s, logsum_t, partial,
        M, K, student.stride(0), teacher.stride(0), taus,
        BLOCK_K=block_k, ROWS=rows, PROB_CENTER=prob_center, num_warps=_num_warps(block_k),
    )  # fmt: skip
    return loss, partial.sum(0), ent, maxp, logsum_s, logsum_t


def _bwd_launch(grad_loss, student, teacher, center, logsum_s, logsum_t, taus, wrap=None):
    M, K = student.shape
    grad_loss = grad_loss.contiguous()  # `loss.mean()` sends an expanded (stride-0) gradient
    ds = torch.empty_like(student, memory_format=torch.contiguous_format)
    block_k = next_pow2(K)
    kernel = _xent_bwd_kernel if wrap is None else wrap(_xent_bwd_kernel)
    kernel[(M,)](
        grad_loss, student, teacher, center, logsum_s, logsum_t, ds,
        K, student.stride(0), teacher.stride(0), ds.stride(0), taus,
        BLOCK_K=block_k, num_warps=_num_warps(block_k),
    )  # fmt: skip
    return ds


# Two registrations of the same launchers. The interpreter path (CPU tensors) uses opaque custom ops, which
# torch.compile(fullgraph=True) traces through; triton_op cannot run under compile in interpreter mode. On CUDA,
# triton_op + wrap_triton lets inductor see the kernels themselves.
_FWD_OUT = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("matpac_kernels::centered_xent_fwd_interp", mutates_args=())
def _fwd_interp(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, taus: torch.Tensor, prob_center: bool
) -> _FWD_OUT:
    return _fwd_launch(student, teacher, center, taus, prob_center)


@_fwd_interp.register_fake
def _(student, teacher, center, taus, prob_center):
    M, K = student.shape
    f32 = dict(dtype=torch.float32)
    m = [student.new_empty(M, **f32) for _ in range(5)]
    return m[0], student.new_empty(K, **f32), m[1], m[2], m[3], m[4]


@torch.library.custom_op("matpac_kernels::centered_xent_bwd_interp", mutates_args=())
def _bwd_interp(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    logsum_s: torch.Tensor,
    logsum_t: torch.Tensor,
    taus: torch.Tensor,
) -> torch.Tensor:
    return _bwd_launch(grad_loss, student, teacher, center, logsum_s, logsum_t, taus)


@_bwd_interp.register_fake
def _(grad_loss, student, teacher, center, logsum_s, logsum_t, taus):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@torch.library.triton_op("matpac_kernels::centered_xent_fwd_cuda", mutates_args=())
def _fwd_cuda(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, taus: torch.Tensor, prob_center: bool
) -> _FWD_OUT:
    return _fwd_launch(student, teacher, center, taus, prob_center, wrap=torch.library.wrap_triton)


@torch.library.triton_op("matpac_kernels::centered_xent_bwd_cuda", mutates_args=())
def _bwd_cuda(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    logsum_s: torch.Tensor,
    logsum_t: torch.Tensor,
    taus: torch.Tensor,
) -> torch.Tensor:
    wrap = torch.library.wrap_triton
    return _bwd_launch(grad_loss, student, teacher, center, logsum_s, logsum_t, taus, wrap=wrap)


def _register_autograd(fwd_op, bwd_op):
    def setup_context(ctx, inputs, output):
        student, teacher, center, taus, _ = inputs
        ctx.save_for_backward(student, teacher, center, output[4], output[5], taus)

    def backward(ctx, grad_loss, *unused_grads):  # only the loss depends on the student
        if grad_loss is None:
            return None, None, None, None, None
        student, teacher, center, logsum_s, logsum_t, taus = ctx.saved_tensors
        ds = bwd_op(grad_loss, student, teacher, center, logsum_s, logsum_t, taus)
        return ds, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)


_register_autograd(_fwd_interp, _bwd_interp)
_register_autograd(_fwd_cuda, _bwd_cuda)


def _check_inputs(student_MK, teacher_MK, center_K, tau_s, tau_t, center_mode):
    if center_mode not in CENTER_MODES:
        raise ValueError(f"center_mode must be one of {CENTER_MODES}, got {center_mode!r}")
    if student_MK.dim() != 2 or student_MK.shape != teacher_MK.shape:
        raise ValueError(
            f"student and teacher logits must both be (M, K); got {tuple(student_MK.shape)} and "
            f"{tuple(teacher_MK.shape)} (flatten the token dims first)"
        )
    if center_K.shape != (student_MK.shape[1],):
        raise ValueError(f"center must have shape (K={student_MK.shape[1]},), got {tuple(center_K.shape)}")
    for name, t in (("student", student_MK), ("teacher", teacher_MK), ("center", center_K)):
        if t.is_complex():  # the kernel failed with KeyError 'complex64'; the reference dropped the imaginary part
            raise ValueError(f"{name} must be real logits, got {t.dtype}")
    if student_MK.shape[1] == 0:  # the kernels' row max over no columns gave a silent NaN loss
        raise ValueError("the logits have K = 0 columns; give at least one prototype")
    # A kernel reads raw pointers: a tensor on another device would be read as garbage, not refused. (Comparing
    # .device attributes is free: no synchronisation, and torch.compile resolves it at trace time.)
    device = student_MK.device
    for name, t in (("teacher", teacher_MK), ("center", center_K)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but student is on {device}; move all inputs to one device")
    for name, tau in (("tau_s", tau_s), ("tau_t", tau_t)):
        # Tensor temperatures (the trainer passes tau_t as a device tensor to avoid recompiles) are not checked:
        # reading their value would synchronise with the GPU.
        if not isinstance(tau, torch.Tensor | numbers.Real) or isinstance(tau, bool):
            # float() took "0.1" on the kernel path while the reference failed on it: one rule for both backends
            raise TypeError(f"{name} must be a float or a one-element tensor, got {type(tau).__name__} {tau!r}")
        if not isinstance(tau, torch.Tensor) and not float(tau) > 0:
            raise ValueError(f"{name} must be positive, got {tau}")
        if isinstance(tau, torch.Tensor) and tau.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(tau.shape)}")
        if isinstance(tau, torch.Tensor) and tau.device not in (device, torch.device("cpu")):
            raise ValueError(f"{name} is on {tau.device} but student is on {device}; pass a float or a tensor on "
                             f"{device}")


def _taus_tensor(tau_s, tau_t, device) -> torch.Tensor:
    """(tau_s, tau_t) as one fp32 device tensor the kernels read, so a changing tau_t neither syncs nor recompiles.
    Python floats become device tensors through `torch.full` (a fill kernel): `torch.tensor(x, device="cuda")` would
    be a blocking host-to-device copy on every call."""
    parts = [
        t.detach().reshape(()).to(device=device, dtype=torch.float32)
        if isinstance(t, torch.Tensor)
        else torch.full((), float(t), dtype=torch.float32, device=device)
        for t in (tau_s, tau_t)
    ]
    return torch.stack(parts)


def _row_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def centered_softmax_xent(student_MK, teacher_MK, center_K, tau_s, tau_t, center_mode="prob"):
    """Per-row cross-entropy between the centred teacher softmax and the student log-softmax, plus centre statistics.

    Args: student_MK (M, K) logits (fp32/bf16/fp16; receives the gradient), teacher_MK (M, K) logits and
    center_K (K,) (no gradient), all on one device; tau_s, tau_t positive real numbers or one-element tensors
    (on that device, or CPU), center_mode "prob" (column sums of p, the authors') or "logit" (column sums of the
    teacher logits, DINO's). A tensor on another device is a one-line ValueError (a device check, no sync).
    Returns fp32 (loss_M, center_sum_K, entropy_M, max_prob_M); only loss_M carries a gradient (to student_MK, and
    to tau_s when it is a tensor that requires grad). Runs the Triton kernels on CUDA for K <= 8192 and a tau_s
    without grad (see `matpac_kernels.use_backend`), the reference elsewhere. The kernels save the student and
    teacher logits for backward: modifying them in place before backward() is an autograd error, as for most ops; so
    is an in-place centre update under torch.compile (eager copies the centre). No double backward
    (create_graph=True) through the kernels. "tau_s requires grad" means while grad mode is on.
    """
    _check_inputs(student_MK, teacher_MK, center_K, tau_s, tau_t, center_mode)
    # Any real number as a float on both paths (a Fraction went through float() on the kernel path only: the
    # reference's division refused it)
    tau_s, tau_t = (t if isinstance(t, torch.Tensor) else float(t) for t in (tau_s, tau_t))
    K = student_MK.shape[1]
    # The kernels give no gradient to tau_s: a learnable one (a tensor that requires grad) runs the reference, which
    # differentiates it, rather than silently getting none. (tau_t is the teacher's: no gradient on either path.)
    tau_grad = torch.is_grad_enabled() and isinstance(tau_s, torch.Tensor) and tau_s.requires_grad
    if not use_triton(student_MK.device, supported=K <= MAX_K and not tau_grad,
                      why=f"K={K} > {MAX_K}" if K > MAX_K else "tau_s requires grad"):
        return reference_centered_softmax_xent(student_MK, teacher_MK, center_K, tau_s, tau_t, center_mode)
    fwd = _fwd_cuda if student_MK.is_cuda and not interpreter_active() else _fwd_interp
    loss, center_sum, entropy, max_prob, _, _ = fwd(
        _row_contiguous(student_MK),
        _row_contiguous(teacher_MK.detach()),
        # A copy (K floats): the centre is saved for backward, and a DINO-style in-place centre update between this
        # call and backward() must not invalidate it (it does not with the reference). Eager only: under
        # torch.compile, Inductor drops the copy as a no-op, so there update the centre after backward().
        center_K.detach().clone(memory_format=torch.contiguous_format),
        _taus_tensor(tau_s, tau_t, student_MK.device),
        center_mode == "prob",
    )
    return loss, center_sum.detach(), entropy.detach(), max_prob.detach()
