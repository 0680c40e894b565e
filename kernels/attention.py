"""Attention on the ViT's packed qkv projection, forward and backward: softmax(q·kᵀ/√hd)·v, no mask, no dropout.

Why a kernel: MATPAC's sequences are short (student 58, teacher 134, predictor 191 tokens) and the predictor's heads
are 32 wide, so SDPA's kernels run far below their usual throughput (benchmarks/attention.py, ~17 % of an H100 step
at batch 256). The model also pays two copies around them: q, k and v are strided views of the fused qkv Linear
output, and their gradients are stacked back into one (B, N, 3·D) tensor. This op takes that tensor as it is
and returns the output in the (B, N, D) layout the `proj` Linear reads; its backward writes dq, dk, dv straight into
one (B, N, 3·D) gradient. Layout (timm, `vit.Attention`): channel c of qkv is [q | k | v][head][dim], i.e.
qkv.reshape(B, N, 3, H, hd).

Kernels (FlashAttention-2 in Triton, fp32 statistics, exp2 with the scale folded in):
  forward  one program per (batch·head, query block): loops over key blocks with an online softmax, writes O and
           the row log-sum-exp (log2 base, (B, H, N) fp32) for the backward.
  dk, dv   one program per (batch·head, key block): loops over query blocks, recomputing P from the saved lse.
  dq       one program per (batch·head, query block): loops over key blocks.
  delta    rowsum(dO·O) per query row (fp32), read by both backward kernels.
No atomics: every output element is written by exactly one program, so results are deterministic.
On CUDA the block sizes are autotuned (keys N, hd and D) over a few configurations; the interpreter uses one.
"""

import numbers

import torch

from ._runtime import interpreter_active, jit, tl, triton, use_triton

HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs >= 16 and the loads a power of two
_LOG2E = 1.4426950408889634


def reference_packed_attention(qkv_BNC: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The specification, in plain PyTorch (qkv's dtype): (B, N, 3·H·hd) -> (B, N, H·hd). Same numbers as
    `matpac_fast.vit.attention_math` on the model's q, k, v views."""
    B, N, C = qkv_BNC.shape
    hd = C // (3 * num_heads)
    q, k, v = qkv_BNC.reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    o = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return o.transpose(1, 2).reshape(B, N, C // 3)


@jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs get exact fp32 products (tl.dot would use TF32 otherwise); bf16/fp16 products are exact anyway.
    # A bool rather than the string input_precision as the kernels' constexpr: user kernels under torch.compile have
    # been run with bool constexprs on our GPUs (centered_xent's PROB_CENTER), strings never.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@jit
def _program_ids(N, BLOCK: tl.constexpr):
    # A 1-D grid of B·H·cdiv(N, BLOCK) programs, the blocks of one (batch, head) adjacent so that they run together
    # and share its K/V in L2 (a 2-D grid with B·H on axis 1 would also cap B·H at 65,535).
    n_blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    return pid // n_blocks, pid % n_blocks


@jit
def _rows(base, rows, stride, N, HD: tl.constexpr):
    """Rows `rows` of a head's (N, HD) slice at `base` (row stride `stride`); rows past N read as zeros."""
    offs_d = tl.arange(0, HD)
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=(rows < N)[:, None], other=0.0)


@jit
def _store_rows(base, rows, stride, N, x, HD: tl.constexpr):
    offs_d = tl.arange(0, HD)
    tl.store(base + rows[:, None] * stride + offs_d[None, :], x.to(base.dtype.element_ty), mask=(rows < N)[:, None])


@jit
def _head(pid_bh, H, s_b, HD: tl.constexpr):
    """Offset of head (b, h)'s first channel in a (B, N, ·) tensor with batch stride s_b (int64)."""
    return (pid_bh // H).to(tl.int64) * s_b + (pid_bh % H) * HD


@jit
def _attn_delta_kernel(o_ptr, do_ptr, delta_ptr, N, H, s_ob, s_on, s_db, s_dn, HD: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta = rowsum(dO · O) per (b, h, n), fp32, in lse's (B, H, N) layout: FlashAttention-2's preprocessing step.
    pid_bh, pid_m = _program_ids(N, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _rows(o_ptr + _head(pid_bh, H, s_ob, HD), rows, s_on, N, HD)
    do = _rows(do_ptr + _head(pid_bh, H, s_db, HD), rows, s_dn, N, HD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@jit
def _attn_fwd_kernel(
    qkv_ptr, o_ptr, lse_ptr, N, H, s_qb, s_qn, s_ob, s_on, qk_scale,
    DM: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes a Python float as fp64: keep the loop's types fp32
    pid_bh, pid_m = _program_ids(N, BLOCK_M)
    q_base = qkv_ptr + _head(pid_bh, H, s_qb, HD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _rows(q_base, rows, s_qn, N, HD)
    # Running max and sum of exp2 per query row (log2 domain: qk_scale = hd^-0.5 · log2 e).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _rows(q_base + DM, cols, s_qn, N, HD)
        v = _rows(q_base + 2 * DM, cols, s_qn, N, HD)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where((cols < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far all score -inf (an -inf in q or k) has m_new = -inf: subtracting 0 instead keeps
        # alpha and p at exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN (FlashAttention's guard).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    _store_rows(o_ptr + _head(pid_bh, H, s_ob, HD), rows, s_on, N, acc / l_i[:, None], HD)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + rows, m_i + tl.log2(l_i), mask=rows < N)


@jit
def _attn_bwd_dkdv_kernel(
    qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, N, H, s_qb, s_qn, s_db, s_dn, s_gb, s_gn, qk_scale, sm_scale,
    DM: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 under torch.compile
    pid_bh, pid_n = _program_ids(N, BLOCK_N)
    q_base = qkv_ptr + _head(pid_bh, H, s_qb, HD)
    do_base = do_ptr + _head(pid_bh, H, s_db, HD)
    stat_base = pid_bh.to(tl.int64) * N
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's keys
    k = _rows(q_base + DM, cols, s_qn, N, HD)
    v = _rows(q_base + 2 * DM, cols, s_qn, N, HD)
    dk = tl.zeros([BLOCK_N, HD], tl.float32)
    dv = tl.zeros([BLOCK_N, HD], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        m_ok = rows < N
        q = _rows(q_base, rows, s_qn, N, HD)
        do = _rows(do_base, rows, s_dn, N, HD)
        lse = tl.load(lse_ptr + stat_base + rows, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + stat_base + rows, mask=m_ok, other=0.0)
        # Transposed scores (keys × queries): P = exp2(s - lse) is the forward's softmax, recomputed.
        p_t = tl.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])
        # Padding: rows (keys) past N are never stored and padded queries have dO = 0, so this is defensive; the
        # mask that matters is dq's (a zero-loaded key scores 0, and exp2(0 - lse) overflows when lse << 0).
        p_t = tl.where((cols < N)[:, None] & m_ok[None, :], p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, IEEE)
        dp_t = _dot(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, IEEE)
    g_base = dqkv_ptr + _head(pid_bh, H, s_gb, HD)
    _store_rows(g_base + DM, cols, s_gn, N, dk * sm_scale, HD)
    _store_rows(g_base + 2 * DM, cols, s_gn, N, dv, HD)


@jit
def _attn_bwd_dq_kernel(
    qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, N, H, s_qb, s_qn, s_db, s_dn, s_gb, s_gn, qk_scale, sm_scale,
    DM: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 under torch.compile
    pid_bh, pid_m = _program_ids(N, BLOCK_M)
    q_base = qkv_ptr + _head(pid_bh, H, s_qb, HD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's queries
    m_ok = rows < N
    q = _rows(q_base, rows, s_qn, N, HD)
    do = _rows(do_ptr + _head(pid_bh, H, s_db, HD), rows, s_dn, N, HD)
    stat_base = pid_bh.to(tl.int64) * N
    lse = tl.load(lse_ptr + stat_base + rows, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + stat_base + rows, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HD], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _rows(q_base + DM, cols, s_qn, N, HD)
        v = _rows(q_base + 2 * DM, cols, s_qn, N, HD)
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        p = tl.where(m_ok[:, None] & (cols < N)[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    _store_rows(dqkv_ptr + _head(pid_bh, H, s_gb, HD), rows, s_gn, N, dq * sm_scale, HD)


# Block sizes. The interpreter runs one configuration (64 x 64 exercises the multi-block loops and padding at the
# tests' sizes). On CUDA each kernel is autotuned per (N, hd, D) over a few configurations, chosen once per shape at
# the first call (inductor: at run time as well); configurations that do not fit the GPU are skipped by triton's
# autotuner. A program's own tile (BLOCK_M for the forward and dq, BLOCK_N for dk/dv) is at least 64 rows in 16-bit:
# at 32, sm_90 code got no wgmma instructions (compiled without a GPU). Every list below compiles for sm_90 without
# register spills at its head widths (`python -m matpac_kernels._compile_check` compiles each one and fails on a
# spill; it is how these were chosen). The lists are not tuned on a GPU; the op's first GPU run (H200, a27f55a) is in
# benchmarks/RESULTS.md.
_INTERP_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
# (BLOCK_M, BLOCK_N, num_warps, num_stages), 16-bit inputs, heads up to 64 wide (the presets' 32 and 64)
_QUERY_TILED = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 2)]  # forward, dq
_KEY_TILED = [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3), (32, 128, 8, 2)]  # dk, dv (at 4 warps 32x128 spilled)
# 128-wide heads double the accumulators: dq at 128x32 and dk/dv at 64x64 and 64x128 spilled there
_QUERY_TILED_HD128 = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)]
_KEY_TILED_HD128 = [(32, 64, 4, 3), (32, 128, 8, 2)]
# fp32 inputs get exact products (FMA code, no tensor cores), which spilled kilobytes per thread at the 16-bit tiles:
# one small tile each (at 128 wide, the forward's 32x32 spilled too)
_IEEE_TILED = [(32, 32, 4, 1)]
_IEEE_TILED_HD128 = {"fwd": [(16, 16, 4, 1)], "bwd": [(32, 32, 8, 1)]}
_DELTA_BLOCK_M = 64
_AUTOTUNED = {}
# Tests set this to one (BLOCK_M, BLOCK_N, num_warps, num_stages) tuple to run every kernel at that configuration
# instead of the autotuner's choice, so that each configuration's code is checked, not only the fastest one.
_forced_config = None


def _configs(fn, hd: int, ieee: bool) -> list[tuple[int, int, int, int]]:
    """The autotuning configurations of kernel `fn` at head width `hd`, fp32 inputs (`ieee`) or 16-bit ones."""
    if ieee:
        return _IEEE_TILED if hd <= 64 else _IEEE_TILED_HD128["fwd" if fn is _attn_fwd_kernel else "bwd"]
    if fn is _attn_bwd_dkdv_kernel:
        return _KEY_TILED if hd <= 64 else _KEY_TILED_HD128
    return _QUERY_TILED if hd <= 64 else _QUERY_TILED_HD128


def _kernel(fn, hd: int, ieee: bool):
    """The launchable kernel: `fn` itself in the interpreter or under `_forced_config`, else its autotuned wrapper
    for this head width and input precision (built once each)."""
    if interpreter_active() or _forced_config is not None:
        return fn
    key = (fn, hd, ieee)
    if key not in _AUTOTUNED:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _configs(fn, hd, ieee)
        ]
        _AUTOTUNED[key] = triton.autotune(configs=configs, key=["N", "HD", "DM"])(fn)
    return _AUTOTUNED[key]


def _launch(kernel, block_name, N, B, H, args, consts, wrap=None):
    """Launch `kernel` over B·H·cdiv(N, block) programs, block = its `block_name` size (see `_program_ids`)."""
    k = _kernel(kernel, consts["HD"], consts["IEEE"])
    k = k if wrap is None else wrap(k)
    if interpreter_active() or _forced_config is not None:
        config = _INTERP_CONFIG
        if _forced_config is not None:
            bm, bn, warps, stages = _forced_config
            config = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        k[(B * H * triton.cdiv(N, config[block_name]),)](*args, **consts, **config)
    else:
        k[lambda meta: (B * H * triton.cdiv(N, meta[block_name]),)](*args, **consts)


def _shape(qkv, num_heads):
    B, N, C = qkv.shape
    dm = C // 3
    return B, N, dm, dm // num_heads


def _consts(qkv, num_heads):
    _, _, dm, hd = _shape(qkv, num_heads)
    return dict(DM=dm, HD=hd, IEEE=qkv.dtype == torch.float32)


def _fwd_launch(qkv, num_heads, wrap=None):
    B, N, dm, hd = _shape(qkv, num_heads)
    o = torch.empty((B, N, dm), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((B, num_heads, N), dtype=torch.float32, device=qkv.device)
    args = (qkv, o, lse, N, num_heads, qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1), hd**-0.5 * _LOG2E)
    _launch(_attn_fwd_kernel, "BLOCK_M", N, B, num_heads, args, _consts(qkv, num_heads), wrap)
    return o, lse


def _bwd_launch(grad_o, qkv, o, lse, num_heads, wrap=None):
    B, N, dm, hd = _shape(qkv, num_heads)
    grad_o = grad_o if grad_o.stride(-1) == 1 else grad_o.contiguous()
    delta = torch.empty_like(lse)
    k = _attn_delta_kernel if wrap is None else wrap(_attn_delta_kernel)
    k[(B * num_heads * triton.cdiv(N, _DELTA_BLOCK_M),)](
        o, grad_o, delta, N, num_heads, o.stride(0), o.stride(1), grad_o.stride(0), grad_o.stride(1),
        HD=hd, BLOCK_M=_DELTA_BLOCK_M,
    )  # fmt: skip
    dqkv = torch.empty((B, N, 3 * dm), dtype=qkv.dtype, device=qkv.device)
    args = (qkv, grad_o, lse, delta, dqkv, N, num_heads, qkv.stride(0), qkv.stride(1), grad_o.stride(0),
            grad_o.stride(1), dqkv.stride(0), dqkv.stride(1), hd**-0.5 * _LOG2E, hd**-0.5)
    consts = _consts(qkv, num_heads)
    _launch(_attn_bwd_dkdv_kernel, "BLOCK_N", N, B, num_heads, args, consts, wrap)
    _launch(_attn_bwd_dq_kernel, "BLOCK_M", N, B, num_heads, args, consts, wrap)
    return dqkv


# Two registrations of the same launchers, as in centered_xent: opaque custom ops for the interpreter (CPU tensors;
# torch.compile traces through them), triton_op + wrap_triton on CUDA so inductor sees the kernels themselves.
@torch.library.custom_op("matpac_kernels::packed_attention_fwd_interp", mutates_args=())
def _fwd_interp(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_launch(qkv, num_heads)


@_fwd_interp.register_fake
def _(qkv, num_heads):
    B, N, C = qkv.shape
    return qkv.new_empty((B, N, C // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op("matpac_kernels::packed_attention_bwd_interp", mutates_args=())
def _bwd_interp(
    grad_o: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int
) -> torch.Tensor:
    return _bwd_launch(grad_o, qkv, o, lse, num_heads)


@_bwd_interp.register_fake
def _(grad_o, qkv, o, lse, num_heads):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


@torch.library.triton_op("matpac_kernels::packed_attention_fwd_cuda", mutates_args=())
def _fwd_cuda(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_launch(qkv, num_heads, wrap=torch.library.wrap_triton)


@torch.library.triton_op("matpac_kernels::packed_attention_bwd_cuda", mutates_args=())
def _bwd_cuda(
    grad_o: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int
) -> torch.Tensor:
    return _bwd_launch(grad_o, qkv, o, lse, num_heads, wrap=torch.library.wrap_triton)


def _register_autograd(fwd_op, bwd_op):
    def setup_context(ctx, inputs, output):
        qkv, num_heads = inputs
        ctx.num_heads = num_heads
        ctx.save_for_backward(qkv, output[0], output[1])

    def backward(ctx, grad_o, _grad_lse):  # lse is a by-product for the backward, never differentiated
        qkv, o, lse = ctx.saved_tensors
        return bwd_op(grad_o, qkv, o, lse, ctx.num_heads), None

    fwd_op.register_autograd(backward, setup_context=setup_context)


_register_autograd(_fwd_interp, _bwd_interp)
_register_autograd(_fwd_cuda, _bwd_cuda)


def _compute_dtype(qkv_BNC) -> torch.dtype:
    """qkv's dtype, or for fp32 input under autocast on its device the autocast dtype: the reference's matmuls (and
    SDPA) run in it there, and autocast does not cast a custom op's inputs itself."""
    device = qkv_BNC.device.type
    if qkv_BNC.dtype == torch.float32 and device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return qkv_BNC.dtype


def _check_inputs(qkv_BNC, num_heads) -> str:
    """One-line errors for inputs no path can take; returns why the kernel cannot take valid ones ("" if it can)."""
    if not isinstance(num_heads, numbers.Integral) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if qkv_BNC.dim() != 3 or qkv_BNC.shape[-1] % (3 * num_heads) != 0 or qkv_BNC.shape[-1] == 0:
        raise ValueError(
            f"qkv must be (B, N, 3 * num_heads * head_dim) (the fused qkv Linear's output); got shape "
            f"{tuple(qkv_BNC.shape)} with num_heads={num_heads}"
        )
    if not qkv_BNC.dtype.is_floating_point:  # the reference's matmul failed on it with a dtype-mismatch error
        raise ValueError(f"qkv must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {qkv_BNC.dtype}")
    if qkv_BNC.shape[1] < 1:
        return "no tokens (N = 0)"  # an empty result, which the reference gives
    hd = qkv_BNC.shape[-1] // (3 * num_heads)
    if hd not in HEAD_DIMS:
        return f"head_dim={hd} not in {HEAD_DIMS}"
    dtype = _compute_dtype(qkv_BNC)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype}"
    if dtype == torch.bfloat16 and interpreter_active():
        # Triton's interpreter holds bf16 as uint16 and its tl.dot multiplies those bit patterns: outputs ~1e9, silently
        return "bf16 in Triton's interpreter (its tl.dot multiplies bf16 bit patterns); use fp32 or fp16 there"
    return ""


def packed_attention(qkv_BNC: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q·kᵀ/√hd)·v over all tokens (no mask), from the fused qkv projection to the `proj` input.

    Args: qkv_BNC (B, N, 3·num_heads·hd): the output of `Attention.qkv`, channels [q | k | v][head][dim] (timm's
    layout), fp32/bf16/fp16, any strides with the last dimension contiguous (others are copied); num_heads.
    Returns (B, N, num_heads·hd) in qkv's dtype, heads concatenated along the last dimension; differentiable. Under
    autocast, fp32 qkv is computed (and returned) in the autocast dtype, as by the reference's matmuls.
    Runs the Triton kernels on CUDA for hd in (16, 32, 64, 128) (see `matpac_kernels.use_backend`), the reference
    elsewhere; in Triton's interpreter (TRITON_INTERPRET=1) not for bf16, which its tl.dot gets wrong. No double
    backward through the kernels (`create_graph=True` works, the second backward then raises torch's "no autograd
    formula" error): use the reference backend for that.
    """
    why = _check_inputs(qkv_BNC, num_heads)
    num_heads = int(num_heads)  # a numpy integer too: the custom op's schema takes a Python int
    if not use_triton(qkv_BNC.device, supported=not why, why=why):
        return reference_packed_attention(qkv_BNC, num_heads)
    qkv = qkv_BNC.to(_compute_dtype(qkv_BNC))
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    fwd = _fwd_cuda if qkv.is_cuda and not interpreter_active() else _fwd_interp
    return fwd(qkv, num_heads)[0]
