"""matpac_kernels: Triton kernels against their PyTorch references, hand-computed cases and user errors.

On a CPU-only machine the kernels run in Triton's interpreter (fp32). The interpreter must be chosen before triton is
first imported in the process, hence the environment variable below, set before `matpac_kernels` (which imports
triton) is imported. If another test module imported triton first, the interpreter tests here are skipped and
`test_interpreter_tests_in_subprocess` runs this file again in a fresh interpreter-mode process instead. On a CUDA
machine the variable is left alone and the same tests run the compiled kernels on the GPU; the bf16 and speed tests
are marked `gpu`.
"""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matpac_kernels as mk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_IN_PROCESS = torch.cuda.is_available() or mk.interpreter_active()
_NO_TRITON_WHY = ("triton is not installed (test_triton_is_installed_where_it_is_a_dependency fails for it)"
                  if not mk._runtime.HAVE_TRITON else
                  "triton was imported before TRITON_INTERPRET=1; the subprocess test runs these")
needs_triton = pytest.mark.skipif(not TRITON_IN_PROCESS, reason=_NO_TRITON_WHY)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp32 tolerances of the acceptance criterion: 1e-5 relative, plus a small absolute term for values near zero.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture
def triton_backend():
    with mk.use_backend("triton"):
        yield


# ------------------------------------------------------------------------------------------------ patchify_gather
def _random_masks(B, n_patches, n_vis, n_mask, gen, sort=True):
    perm = torch.stack([torch.randperm(n_patches, generator=gen) for _ in range(B)])
    vis, mask = perm[:, :n_vis], perm[:, n_vis : n_vis + n_mask]
    if sort:
        vis, mask = vis.sort(1).values, mask.sort(1).values
    return vis, mask


PATCHIFY_GRIDS = [
    # (B, F, T, patch, Nv, Nm)
    pytest.param(2, 80, 608, 16, 57, 133, id="paper-5x38-57-133"),
    pytest.param(3, 64, 160, 16, 10, 30, id="4x10"),
    pytest.param(1, 80, 1008, 16, 63, 250, id="5x63-partial-mask"),
    pytest.param(2, 32, 48, 16, 1, 5, id="2x3-one-visible"),
    pytest.param(3, 16, 40, 8, 3, 4, id="patch8-2x5"),
]


@needs_triton
@pytest.mark.parametrize("B,F,T,patch,n_vis,n_mask", PATCHIFY_GRIDS)
def test_patchify_gather_matches_reference(triton_backend, B, F, T, patch, n_vis, n_mask):
    gen = torch.Generator().manual_seed(B * 1000 + T)
    lms = torch.randn(B, 1, F, T, generator=gen) * 4.2 - 7.1
    vis, mask = _random_masks(B, (F // patch) * (T // patch), n_vis, n_mask, gen, sort=(T != 1008))
    lms, vis, mask = lms.to(DEVICE), vis.to(DEVICE), mask.to(DEVICE)
    got = mk.patchify_gather(lms, -7.056, 4.193, vis, mask, patch=patch)
    want = mk.reference_patchify_gather(lms, -7.056, 4.193, vis, mask, patch=patch)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@needs_triton
def test_patchify_gather_strided_half_input_int32_indices(triton_backend):
    """A time crop of a longer fp16 clip (non-contiguous view) and int32 indices, as a loader might hand them over."""
    gen = torch.Generator().manual_seed(1)
    full = (torch.randn(2, 1, 80, 700, generator=gen) * 4 - 7).half()
    lms = full[..., 37 : 37 + 608]
    assert not lms.is_contiguous()
    vis, mask = _random_masks(2, 190, 57, 133, gen)
    vis, mask = vis.int(), mask.int()
    lms, vis, mask = lms.to(DEVICE), vis.to(DEVICE), mask.to(DEVICE)
    got = mk.patchify_gather(lms, -7.0, 4.0, vis, mask)
    want = mk.reference_patchify_gather(lms, -7.0, 4.0, vis, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _hand_case():
    # patch 2 on a 4 x 6 image: n_f = 2, n_t = 3; pixel value 100 * f + t makes every token readable by eye.
    f = torch.arange(4)[:, None]
    t = torch.arange(6)[None, :]
    lms = (100 * f + t).float()[None, None]  # (1, 1, 4, 6)
    vis = torch.tensor([[4]])  # f_idx 1, t_idx 1 -> rows 2..3, cols 2..3
    mask = torch.tensor([[2, 3]])  # (0, 2) -> rows 0..1, cols 4..5 and (1, 0) -> rows 2..3, cols 0..1
    want_vis = torch.tensor([[[202.0, 203.0, 302.0, 303.0]]])
    want_mask = torch.tensor([[[4.0, 5.0, 104.0, 105.0], [200.0, 201.0, 300.0, 301.0]]])
    return lms, vis, mask, (want_vis - 2.0) / 4.0, (want_mask - 2.0) / 4.0


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_patchify_gather_hand_computed(backend):
    lms, vis, mask, want_vis, want_mask = _hand_case()
    with mk.use_backend(backend):
        got_vis, got_mask = mk.patchify_gather(lms.to(DEVICE), 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE), patch=2)
    torch.testing.assert_close(got_vis.cpu(), want_vis, rtol=0, atol=0)
    torch.testing.assert_close(got_mask.cpu(), want_mask, rtol=0, atol=0)


OUT_OF_RANGE = [
    pytest.param("mask", [[2, 6]], id="mask-above"),  # the hand case has 6 patches: index 6 is out of range
    pytest.param("mask", [[-1, 2]], id="mask-negative"),
    pytest.param("vis", [[7]], id="vis-above"),
]


@pytest.mark.parametrize("which,bad", OUT_OF_RANGE)
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_patchify_gather_out_of_range_index_is_an_error(backend, which, bad):
    """A drop-in for the reference: an out-of-range index raises (RuntimeError, like torch.gather) on every path,
    eager and compiled, instead of NaN tokens (on CUDA it is a device-side assert: see the gpu test below)."""
    lms, vis, mask, _, _ = _hand_case()
    vis, mask = (torch.tensor(bad), mask) if which == "vis" else (vis, torch.tensor(bad))
    args = (lms.to(DEVICE), 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE))
    with mk.use_backend(backend):
        with pytest.raises(RuntimeError, match="out of bounds" if backend == "reference" else "outside"):
            mk.patchify_gather(*args, patch=2)
        if backend == "triton":
            with pytest.raises(RuntimeError, match=r"outside \[0, n_patches\)"):
                torch.compile(mk.patchify_gather, fullgraph=True)(*args, patch=2)


@needs_triton
def test_patchify_gather_kernel_never_reads_out_of_bounds():
    """Behind the check, the kernel itself writes NaN tokens for an out-of-range index (no out-of-bounds read) and
    clears the index flag of the program that read it (the flags are what the public function asserts on)."""
    import importlib

    launch = importlib.import_module("matpac_kernels.patchify_gather")._launch
    lms, vis, mask, want_vis, _ = _hand_case()
    bad = torch.tensor([[2, 6]])
    got_vis, got_mask, ok = launch(lms.to(DEVICE), 2.0, 4.0, vis.to(DEVICE), bad.to(DEVICE), 2, torch.float32)
    assert torch.equal(got_vis.cpu(), want_vis)
    assert torch.isfinite(got_mask[0, 0]).all() and torch.isnan(got_mask[0, 1]).all()
    # one program per block of 4 tokens: [visible block, masked block]; only the masked one read index 6
    assert ok.cpu().tolist() == [1, 0]
    *_, ok = launch(lms.to(DEVICE), 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE), 2, torch.float32)
    assert ok.cpu().tolist() == [1, 1]
    # several batch rows and blocks: each flag belongs to its (row, block), whatever the other programs read
    # (5 visible tokens = 2 blocks, 1 masked = 1 block, per row: flags [r0v0, r0v1, r0m0, r1v0, r1v1, r1m0])
    lms2 = lms.expand(2, -1, -1, -1).contiguous().to(DEVICE)
    idx = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    *_, ok = launch(lms2, 2.0, 4.0, idx[:, :5].to(DEVICE), idx[:, 5:].to(DEVICE), 2, torch.float32)
    assert ok.cpu().tolist() == [1, 1, 1, 1, 1, 1]
    idx[1, 5] = -1  # row 1's fifth visible token: its second visible block
    *_, ok = launch(lms2, 2.0, 4.0, idx[:, 1:].to(DEVICE), idx[:, :1].to(DEVICE), 2, torch.float32)
    assert ok.cpu().tolist() == [1, 1, 1, 1, 0, 1]


@needs_triton
def test_patchify_gather_under_torch_compile(triton_backend):
    gen = torch.Generator().manual_seed(2)
    lms = (torch.randn(2, 1, 80, 608, generator=gen) * 4 - 7).to(DEVICE)
    vis, mask = (x.to(DEVICE) for x in _random_masks(2, 190, 57, 133, gen))
    compiled = torch.compile(mk.patchify_gather, fullgraph=True)
    got = compiled(lms, -7.056, 4.193, vis, mask)
    want = mk.reference_patchify_gather(lms, -7.056, 4.193, vis, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape,idx_shape,match",
    [
        ((2, 80, 608), (2, 5), r"\(B, 1, F, T\)"),
        ((2, 1, 80, 600), (2, 5), "multiples of patch"),
        ((2, 1, 80, 608), (3, 5), "vis_idx must have shape"),
    ],
)
def test_patchify_gather_user_errors(shape, idx_shape, match):
    idx = torch.zeros(idx_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        mk.patchify_gather(torch.zeros(shape), 0.0, 1.0, idx, idx)
    with pytest.raises(ValueError, match="int32 or int64"):
        mk.patchify_gather(torch.zeros(2, 1, 80, 608), 0.0, 1.0, torch.zeros(2, 5), torch.zeros(2, 5))
    for std in (0.0, float("inf"), float("nan")):  # inf made every patch 0
        with pytest.raises(ValueError, match="std must be positive and finite"):
            mk.patchify_gather(torch.zeros(2, 1, 80, 608), 0.0, std, idx[:2], idx[:2])
    for mean in (float("nan"), float("-inf")):  # every patch NaN
        with pytest.raises(ValueError, match="mean must be finite"):
            mk.patchify_gather(torch.zeros(2, 1, 80, 608), mean, 1.0, idx[:2], idx[:2])
    for mean, std in (("0", 1.0), (0.0, "1"), (True, 1.0), (None, 1.0)):  # "0" ran on the kernel path only
        with pytest.raises(TypeError, match="must be a float or a one-element tensor"):
            mk.patchify_gather(torch.zeros(2, 1, 80, 608), mean, std, idx[:2], idx[:2])
    for patch in (0, True, 16.0):  # 0 was a ZeroDivisionError
        with pytest.raises(ValueError, match="patch must be a positive integer"):
            mk.patchify_gather(torch.zeros(2, 1, 80, 608), 0.0, 1.0, idx[:2], idx[:2], patch=patch)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_patchify_gather_out_dtype_is_one_rule_on_both_backends(backend):
    """None and `float` ran on the reference (no cast; float64) and failed inside the kernel's op schema; complex ran
    on the reference and raised KeyError in the kernel."""
    lms, vis, mask, _, _ = _hand_case()
    with mk.use_backend(backend):
        for out_dtype in (None, float, "float16", torch.complex64, torch.int64):
            with pytest.raises(ValueError, match="out_dtype must be a floating-point torch.dtype"):
                mk.patchify_gather(lms.to(DEVICE), 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE), 2, out_dtype)


def test_patchify_gather_takes_a_numpy_integer_patch():
    """A patch size read from a numpy array or config (np.int64) is an integer like any other."""
    lms, vis, mask, want_vis, want_mask = _hand_case()
    with mk.use_backend("reference"):
        got_vis, got_mask = mk.patchify_gather(lms, 2.0, 4.0, vis, mask, patch=np.int64(2))
    assert torch.equal(got_vis, want_vis) and torch.equal(got_mask, want_mask)


@needs_triton
def test_patchify_gather_kernel_refuses_an_input_that_needs_a_gradient(triton_backend):
    """The kernel has no backward: its outputs used to claim requires_grad and fail only at backward()."""
    lms, vis, mask, want_vis, _ = _hand_case()
    lms = lms.to(DEVICE).requires_grad_()
    with pytest.raises(ValueError, match=r"lms requires grad and the kernel has no gradient: pass lms.detach\(\)"):
        mk.patchify_gather(lms, 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE), patch=2)
    with torch.no_grad():  # no graph is built: allowed
        got_vis, _ = mk.patchify_gather(lms, 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE), patch=2)
    assert torch.equal(got_vis.cpu(), want_vis)
    with mk.use_backend("reference"):  # the reference differentiates
        got_vis, _ = mk.patchify_gather(lms, 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE), patch=2)
        got_vis.sum().backward()
    assert lms.grad is not None and lms.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ centred xent
def _xent_inputs(M, K, gen, scale=2.0):
    student = (torch.randn(M, K, generator=gen) * scale).to(DEVICE).requires_grad_()
    teacher = (torch.randn(M, K, generator=gen) * scale).to(DEVICE)
    center = (torch.randn(K, generator=gen) * 0.3).to(DEVICE)
    upstream = torch.rand(M, generator=gen).to(DEVICE) + 0.5  # non-uniform d(total)/d(loss_m)
    return student, teacher, center, upstream


def _forward_backward(fn, student, teacher, center, upstream, tau_s, tau_t, mode):
    student.grad = None
    outs = fn(student, teacher, center, tau_s, tau_t, mode)
    (outs[0] * upstream).sum().backward()
    return [o.detach() for o in outs], student.grad.detach().clone()


def _assert_xent_close(got, want):
    (outs, grad), (ref_outs, ref_grad) = got, want
    for name, o, r in zip(("loss", "center_sum", "entropy", "max_prob"), outs, ref_outs):
        assert o.dtype == torch.float32 and o.shape == r.shape, name
        torch.testing.assert_close(o, r, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad: {m}")


XENT_GRID = [
    # (M, K, center_mode) - odd row counts; K covers a non-power of two, the paper's 2048 and 4096
    pytest.param(7, 65, "prob", id="M7-K65-prob"),
    pytest.param(9, 65, "logit", id="M9-K65-logit"),
    pytest.param(5, 2048, "prob", id="M5-K2048-prob"),
    pytest.param(3, 2048, "logit", id="M3-K2048-logit"),
    pytest.param(7, 4096, "prob", id="M7-K4096-prob"),
    pytest.param(1, 4096, "logit", id="M1-K4096-logit"),
]


@needs_triton
@pytest.mark.parametrize("M,K,mode", XENT_GRID)
def test_xent_forward_backward_match_reference(triton_backend, M, K, mode):
    gen = torch.Generator().manual_seed(M * 10000 + K)
    inputs = _xent_inputs(M, K, gen)
    # The paper's temperatures: tau_s = 0.1, tau_t = 0.04 -> very peaked teacher rows (the hard case for precision).
    got = _forward_backward(mk.centered_softmax_xent, *inputs, 0.1, 0.04, mode)
    want = _forward_backward(mk.reference_centered_softmax_xent, *inputs, 0.1, 0.04, mode)
    _assert_xent_close(got, want)


@needs_triton
@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_xent_under_torch_compile_fullgraph(triton_backend, mode):
    gen = torch.Generator().manual_seed(3)
    inputs = _xent_inputs(7, 2048, gen)
    # tau_t as a 0-d tensor, as the trainer passes it (no recompiles when the schedule moves it)
    tau_t = torch.tensor(0.05, device=DEVICE)
    compiled = torch.compile(mk.centered_softmax_xent, fullgraph=True)
    got = _forward_backward(compiled, *inputs, 0.1, tau_t, mode)
    want = _forward_backward(mk.reference_centered_softmax_xent, *inputs, 0.1, tau_t, mode)
    _assert_xent_close(got, want)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_xent_hand_computed(backend, mode):
    # teacher (0, ln 3), centre 0, tau_t 1 -> p = (1/4, 3/4); student (0, 0) -> q = (1/2, 1/2).
    ln3 = torch.log(torch.tensor(3.0)).item()
    student = torch.zeros(1, 2, device=DEVICE, requires_grad=True)
    teacher = torch.tensor([[0.0, ln3]], device=DEVICE)
    with mk.use_backend(backend):
        loss, center_sum, entropy, max_prob = mk.centered_softmax_xent(
            student, teacher, torch.zeros(2, device=DEVICE), 1.0, 1.0, mode
        )
    loss.sum().backward()
    ln2, ln4, ln43 = [torch.log(torch.tensor(v)).item() for v in (2.0, 4.0, 4 / 3)]
    expect_center = [0.25, 0.75] if mode == "prob" else [0.0, ln3]
    torch.testing.assert_close(loss.cpu(), torch.tensor([ln2]))  # -(1/4 + 3/4) ln 1/2
    torch.testing.assert_close(center_sum.cpu(), torch.tensor(expect_center))
    torch.testing.assert_close(entropy.cpu(), torch.tensor([0.25 * ln4 + 0.75 * ln43]))
    torch.testing.assert_close(max_prob.cpu(), torch.tensor([0.75]))
    torch.testing.assert_close(student.grad.cpu(), torch.tensor([[0.25, -0.25]]))  # (q - p) / tau_s


# Hand-sized rows (M = 3, K = 4). At the paper's temperatures the rows are peaked: the student gradient spans 1e-10
# to 10, so it is compared entry by entry (rtol) with an absolute floor (1e-8) far below most entries.
XENT_SMALL_STUDENT = [[0.3, -1.2, 0.8, 0.05], [2.0, 0.0, -0.5, 1.1], [-0.7, 0.4, 0.4, -2.2]]
XENT_SMALL_TEACHER = [[1.0, 0.2, -0.3, 0.6], [0.0, -1.5, 0.9, 0.25], [0.8, 0.8, -0.1, 0.3]]
XENT_SMALL_CENTER = [0.1, -0.2, 0.05, 0.3]
XENT_SMALL_UPSTREAM = [1.0, 0.5, 2.0]


def _xent_loss_float64(student, teacher, center, tau_s, tau_t):
    """The loss written out in float64 (not the package's reference, which computes in fp32)."""
    p = torch.softmax((teacher.double() - center.double()) / tau_t, dim=-1)
    return -(p * torch.log_softmax(student / tau_s, dim=-1)).sum(-1)


def _small64(values):
    """The fp32 inputs the op gets, widened to float64 (so only the op's arithmetic differs)."""
    return torch.tensor(values, dtype=torch.float32).double()


def _xent_grads_float64(tau_s, tau_t):
    """d(sum_m upstream_m * loss_m) / d student and / d tau_s by float64 autograd, with the float64 loss."""
    student = _small64(XENT_SMALL_STUDENT).requires_grad_()
    tau = torch.tensor(tau_s, dtype=torch.float64, requires_grad=True)
    loss = _xent_loss_float64(student, _small64(XENT_SMALL_TEACHER), _small64(XENT_SMALL_CENTER), tau, tau_t)
    (loss * _small64(XENT_SMALL_UPSTREAM)).sum().backward()
    return loss.detach(), student.grad, tau.grad


XENT_SMALL_TAUS = [(0.1, 0.04), (0.7, 0.3), (2.5, 1.5)]  # the paper's pair, then both milder, then tau_s > 1


@needs_triton
@pytest.mark.parametrize("tau_s,tau_t", XENT_SMALL_TAUS)
def test_xent_kernel_student_gradient_matches_float64_autograd(triton_backend, tau_s, tau_t):
    """The fused backward's d loss / d student against float64 autograd of the loss formula, with a non-zero centre
    and a different upstream gradient per row. The student is a column slice of a wider leaf (row stride 7, offset 1):
    the kernels read it in place, and the gradient must land in those columns of the leaf and nowhere else."""
    want_loss, want_grad, _ = _xent_grads_float64(tau_s, tau_t)
    wide = torch.zeros(3, 7)
    wide[:, 1:5] = torch.tensor(XENT_SMALL_STUDENT)
    wide = wide.to(DEVICE).requires_grad_()
    student = wide[:, 1:5]
    assert student.stride() == (7, 1) and student.storage_offset() == 1
    teacher, center, upstream = (torch.tensor(v).to(DEVICE) for v in
                                 (XENT_SMALL_TEACHER, XENT_SMALL_CENTER, XENT_SMALL_UPSTREAM))
    loss = mk.centered_softmax_xent(student, teacher, center, tau_s, tau_t)[0]
    (loss * upstream).sum().backward()
    torch.testing.assert_close(loss.detach().cpu().double(), want_loss, rtol=1e-6, atol=1e-6)
    grad = wide.grad.cpu()
    torch.testing.assert_close(grad[:, 1:5].double(), want_grad, rtol=1e-5, atol=1e-8)
    assert grad[:, 0].abs().max() == 0 and grad[:, 5:].abs().max() == 0


@pytest.mark.parametrize("tau_s,tau_t", XENT_SMALL_TAUS)
def test_xent_learnable_tau_s_gradient_matches_float64_autograd(kernels_auto_as_on_cuda, tau_s, tau_t):
    """A tau_s that requires grad, with the backend "auto" deciding as on CUDA (where it must not pick the kernels,
    which give tau_s no gradient): d loss / d tau_s and d loss / d student against float64 autograd. The float64
    tau_s gradient is also checked against its closed form, sum_m u_m (1 / tau_s²) sum_k (p_mk - q_mk) s_mk."""
    calls = kernels_auto_as_on_cuda
    _, want_student, want_tau = _xent_grads_float64(tau_s, tau_t)
    s64, t64, c64, u64 = map(_small64, (XENT_SMALL_STUDENT, XENT_SMALL_TEACHER, XENT_SMALL_CENTER, XENT_SMALL_UPSTREAM))
    p, q = torch.softmax((t64 - c64) / tau_t, -1), torch.softmax(s64 / tau_s, -1)
    torch.testing.assert_close(want_tau, (u64 * ((p - q) * s64).sum(-1)).sum() / tau_s**2, rtol=1e-12, atol=1e-12)

    student = torch.tensor(XENT_SMALL_STUDENT, device=DEVICE, requires_grad=True)
    tau = torch.tensor(tau_s, device=DEVICE, requires_grad=True)
    teacher, center, upstream = (torch.tensor(v).to(DEVICE) for v in
                                 (XENT_SMALL_TEACHER, XENT_SMALL_CENTER, XENT_SMALL_UPSTREAM))
    (mk.centered_softmax_xent(student, teacher, center, tau, tau_t)[0] * upstream).sum().backward()
    assert calls == {"xent reference": 1}, calls
    assert tau.grad is not None, "tau_s got no gradient"
    torch.testing.assert_close(tau.grad.cpu().double(), want_tau, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(student.grad.cpu().double(), want_student, rtol=1e-5, atol=1e-8)
    assert want_tau.abs() > 1e-2


@needs_triton
def test_xent_only_loss_is_differentiable_and_centre_sum_deterministic(triton_backend):
    gen = torch.Generator().manual_seed(4)
    student, teacher, center, _ = _xent_inputs(9, 65, gen)
    loss, center_sum, entropy, max_prob = mk.centered_softmax_xent(student, teacher, center, 0.1, 0.04)
    assert loss.requires_grad and not any(t.requires_grad for t in (center_sum, entropy, max_prob))
    again = mk.centered_softmax_xent(student, teacher, center, 0.1, 0.04)[1]
    assert torch.equal(center_sum, again)  # no atomics: the same bits every call


def test_xent_reference_is_the_models_reference():
    """Two copies of the specification exist (kernels and matpac_fast.losses): they must agree exactly."""
    from matpac_fast import losses
    gen = torch.Generator().manual_seed(5)
    student, teacher, center, _ = _xent_inputs(5, 33, gen)
    for mode in ("prob", "logit"):
        ours = mk.reference_centered_softmax_xent(student, teacher, center, 0.1, 0.04, mode)
        theirs = losses.centered_softmax_xent_reference(student, teacher, center, 0.1, 0.04, mode)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_patchify_gather_auto_runs_the_reference_for_an_input_that_needs_a_gradient(monkeypatch):
    """"auto" raised for an lms that requires grad on CUDA only (on CPU it is the reference anyway), so code tested on
    CPU failed on a GPU. It now falls back to the reference, as for a learnable tau_s. `use_triton` is replaced by
    "auto"'s rule on a CUDA device (Triton whenever the op supports the arguments), so the dispatch is tested here."""
    import importlib

    pg = importlib.import_module("matpac_kernels.patchify_gather")  # the module (the package exports the function)
    calls = []
    monkeypatch.setattr(pg, "use_triton", lambda device, supported=True, why="": calls.append(why) or supported)
    lms, vis, mask, want_vis, _ = _hand_case()
    lms = lms.requires_grad_()
    got_vis, _ = mk.patchify_gather(lms, 2.0, 4.0, vis, mask, patch=2)
    assert calls == ["lms requires grad and the kernel has no gradient: pass lms.detach()"]
    assert got_vis.requires_grad and torch.equal(got_vis.detach(), want_vis)
    got_vis.sum().backward()
    assert lms.grad is not None and lms.grad.abs().sum() > 0


@needs_triton
def test_xent_learnable_tau_s_gets_its_gradient():
    """A tau_s tensor that requires grad got no gradient from the kernels (silently None): "auto" now runs the
    reference for it, a forced Triton backend says why it cannot. (On CPU "auto" is the reference anyway: the
    comparison below tests the dispatch on CUDA only; the forced-Triton refusal tests it everywhere.)"""
    gen = torch.Generator().manual_seed(8)
    student, teacher, center, upstream = _xent_inputs(5, 33, gen)
    grads = {}
    for backend in ("auto", "reference"):
        tau_s = torch.tensor(0.1, device=DEVICE, requires_grad=True)
        with mk.use_backend(backend):
            (mk.centered_softmax_xent(student, teacher, center, tau_s, 0.04)[0] * upstream).sum().backward()
        grads[backend] = tau_s.grad
    assert grads["auto"] is not None and grads["auto"].abs() > 0
    torch.testing.assert_close(grads["auto"], grads["reference"])
    with mk.use_backend("triton"), pytest.raises(ValueError, match="tau_s requires grad"):
        mk.centered_softmax_xent(student, teacher, center, torch.tensor(0.1, requires_grad=True), 0.04)
    with mk.use_backend("triton"), torch.no_grad():  # no gradient wanted: the kernels run, with the same numbers
        got = mk.centered_softmax_xent(student, teacher, center, torch.tensor(0.1, requires_grad=True), 0.04)
    want = mk.reference_centered_softmax_xent(student.detach(), teacher, center, 0.1, 0.04)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


@needs_triton
def test_xent_centre_updated_in_place_before_backward(triton_backend):
    """A DINO-style in-place centre update between the loss and backward() raised an autograd error with the kernels
    (the centre was saved for backward as is), not with the reference."""
    gen = torch.Generator().manual_seed(9)
    student, teacher, center, upstream = _xent_inputs(5, 33, gen)
    want = _forward_backward(mk.reference_centered_softmax_xent, student, teacher, center.clone(), upstream, 0.1,
                             0.04, "prob")
    student.grad = None
    buffer = center.clone()
    outs = mk.centered_softmax_xent(student, teacher, buffer, 0.1, 0.04)
    buffer.mul_(0.9).add_(outs[1] / 5, alpha=0.1)
    (outs[0] * upstream).sum().backward()
    _assert_xent_close(([o.detach() for o in outs], student.grad), want)


def test_xent_references_keep_fp32_for_a_float64_tau():
    """A one-element (1,) float64 tau made the references' outputs float64; the kernels return fp32."""
    from matpac_fast import losses
    gen = torch.Generator().manual_seed(10)
    student, teacher, center, _ = _xent_inputs(3, 9, gen)
    tau = torch.tensor([0.04], dtype=torch.float64)
    for fn in (mk.reference_centered_softmax_xent, losses.centered_softmax_xent_reference):
        outs = fn(student, teacher, center, tau * 2.5, tau, "prob")
        assert [o.dtype for o in outs] == [torch.float32] * 4 and outs[0].shape == (3,)


def test_patchify_reference_is_the_models_reference():
    from matpac_fast import masking
    gen = torch.Generator().manual_seed(6)
    lms = torch.randn(2, 1, 80, 608, generator=gen)
    vis, mask = _random_masks(2, 190, 57, 133, gen)
    ours = mk.reference_patchify_gather(lms, -7.0, 4.0, vis, mask)
    theirs = masking.patchify_gather_reference(lms, -7.0, 4.0, vis, mask)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "s_shape,c_shape,mode,tau_s,match",
    [
        ((4, 8), (8,), "mean", 0.1, "center_mode"),
        ((4, 8, 2), (8,), "prob", 0.1, r"\(M, K\)"),
        ((4, 8), (7,), "prob", 0.1, "center must have shape"),
        ((4, 8), (8,), "prob", 0.0, "tau_s must be positive"),
        ((4, 0), (0,), "prob", 0.1, "K = 0 columns"),  # the kernels returned a silent NaN loss
    ],
)
def test_xent_user_errors(s_shape, c_shape, mode, tau_s, match):
    with pytest.raises(ValueError, match=match):
        mk.centered_softmax_xent(torch.zeros(s_shape), torch.zeros(s_shape), torch.zeros(c_shape), tau_s, 0.04, mode)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("tau", ["0.1", True, None])
def test_xent_temperature_types_are_one_rule_on_both_backends(backend, tau):
    # "0.1" ran on the Triton path (float() took it) and failed inside the reference's division
    args = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(8)
    with mk.use_backend(backend):
        for taus in ((tau, 0.04), (0.1, tau)):
            with pytest.raises(TypeError, match="must be a float or a one-element tensor"):
                mk.centered_softmax_xent(*args, *taus)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_xent_any_real_temperature_on_both_backends(backend):
    """A Fraction passes the numbers.Real check: the kernel path took it (float()), the reference's division did not."""
    from fractions import Fraction

    student, teacher, center = torch.randn(3, 5, generator=torch.Generator().manual_seed(14)).to(DEVICE).unbind(0)
    args = student[None], teacher[None], center
    with mk.use_backend(backend):
        got = mk.centered_softmax_xent(*args, Fraction(1, 10), Fraction(1, 25))
    for g, w in zip(got, mk.reference_centered_softmax_xent(*args, 0.1, 0.04)):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("where", ["teacher", "center", "tau_t"])
def test_xent_inputs_on_another_device_are_refused(backend, where):
    """A kernel would read another device's tensor as garbage: every tensor input must share the student's device
    (a one-element tau may also be a CPU tensor)."""
    student, teacher, center = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(8)
    tau_t = torch.tensor(0.04)
    inputs = {"teacher": teacher, "center": center, "tau_t": tau_t}
    inputs[where] = inputs[where].to("meta")
    with mk.use_backend(backend), pytest.raises(ValueError, match=f"{where} is on meta but student is on cpu"):
        mk.centered_softmax_xent(student, inputs["teacher"], inputs["center"], 0.1, inputs["tau_t"])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_complex_inputs_are_one_line_errors(backend):
    """A complex tensor failed inside the kernels with KeyError: 'complex64', while the references silently dropped
    the imaginary part: both refuse it now, as packed_attention did."""
    lms = torch.zeros(1, 1, 16, 16, dtype=torch.complex64)
    idx = torch.zeros(1, 1, dtype=torch.int64)
    with mk.use_backend(backend), pytest.raises(ValueError, match="lms must be real"):
        mk.patchify_gather(lms, 0.0, 1.0, idx, idx, patch=16)
    real = torch.zeros(2, 4)
    for name in ("student", "teacher", "center"):
        args = {"student": real, "teacher": real, "center": torch.zeros(4)}
        args[name] = args[name].to(torch.complex64)
        with mk.use_backend(backend), pytest.raises(ValueError, match=f"{name} must be real logits"):
            mk.centered_softmax_xent(args["student"], args["teacher"], args["center"], 0.1, 0.04)


def test_xent_k_above_kernel_limit():
    s = torch.zeros(2, 8193)
    c = torch.zeros(8193)
    with mk.use_backend("triton"), pytest.raises(ValueError, match="K=8193"):
        mk.centered_softmax_xent(s, s, c, 0.1, 0.04)
    with mk.use_backend("auto"):  # auto falls back to the reference
        loss = mk.centered_softmax_xent(s, s, c, 0.1, 0.04)[0]
    torch.testing.assert_close(loss, torch.full((2,), torch.log(torch.tensor(8193.0)).item()))


def test_unknown_backend_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        mk.set_backend("cuda")


# ------------------------------------------------------------------------------------------------ packed attention
def _qkv(B, N, H, hd, gen, dtype=torch.float32):
    qkv = (torch.randn(B, N, 3 * H * hd, generator=gen) * 1.5).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(B, N, H * hd, generator=gen).to(DEVICE, dtype)
    return qkv, grad


def _attention_and_grad(fn, qkv, grad, heads):
    out = fn(qkv, heads)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    return out.detach(), dqkv


ATTN_GRID = [
    # (B, N, H, hd): one key block and several (64 per block in the interpreter), padding in both, one token,
    # every supported head width; the model's 58 / 191 token counts
    pytest.param(2, 58, 3, 16, id="B2-N58-H3-hd16"),
    pytest.param(1, 191, 2, 32, id="B1-N191-H2-hd32"),
    pytest.param(2, 70, 2, 64, id="B2-N70-H2-hd64"),
    pytest.param(1, 5, 1, 128, id="B1-N5-H1-hd128"),
    pytest.param(3, 1, 2, 16, id="B3-N1"),
    pytest.param(1, 128, 1, 32, id="B1-N128-exact-blocks"),
]


@needs_triton
@pytest.mark.parametrize("B,N,H,hd", ATTN_GRID)
def test_packed_attention_forward_backward_match_reference(triton_backend, B, N, H, hd):
    gen = torch.Generator().manual_seed(B * 1000 + N * 10 + hd)
    qkv, grad = _qkv(B, N, H, hd, gen)
    out, dqkv = _attention_and_grad(mk.packed_attention, qkv, grad, H)
    # The specification in float64, so the tolerance measures the kernel's fp32 error alone.
    qkv64 = qkv.detach().double().requires_grad_()
    ref, dref = _attention_and_grad(mk.reference_packed_attention, qkv64, grad.double(), H)
    assert out.shape == (B, N, H * hd) and out.dtype == torch.float32 and dqkv.shape == qkv.shape
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dqkv.double(), dref, rtol=RTOL, atol=ATOL)


@pytest.fixture
def forced_attention_config():
    """Run the attention kernels at one given (BLOCK_M, BLOCK_N, warps, stages) instead of the default/autotuned."""
    import matpac_kernels.attention as pa

    def force(config):
        pa._forced_config = config

    yield force
    pa._forced_config = None


def _extreme_qkv(kind, gen, B=2, N=37, H=2, hd=16):
    """"peaked": large random logits (softmax rows near one-hot); "negative": every query points away from every key,
    so all scores and the row log-sum-exp are hugely negative and exp2(-lse) overflows to inf in fp32. A padded key
    (loaded as zero) then scores 0, far above the real ones: only the explicit masks keep it out."""
    qkv, grad = _qkv(B, N, H, hd, gen)
    qkv = qkv.detach()
    if kind == "peaked":
        qkv = qkv * 12
    else:
        d = H * hd
        qkv[..., :d] = qkv[..., :d] * 0.1 - 6.0  # q ~ -6 in every dim
        qkv[..., d : 2 * d] = qkv[..., d : 2 * d] * 0.1 + 6.0  # k ~ +6: q·k/sqrt(hd) ~ -144, exp2(-lse) > 2^200
    return qkv.requires_grad_(), grad


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # numpy, in the interpreter: expected
@pytest.mark.parametrize("kind", ["peaked", "negative"])
@pytest.mark.parametrize("config", [(16, 16, 4, 1), (128, 32, 4, 2), (32, 128, 4, 2)], ids=str)
def test_packed_attention_extreme_scores_any_block_size(triton_backend, forced_attention_config, config, kind):
    """Extreme scores with N off every block multiple, at several block shapes (the loops' tails at each): padded
    key columns and query rows must be masked out, not merely zero-loaded, or they take weight (forward) or leak
    NaN/inf into the gradients (backward)."""
    forced_attention_config(config)
    qkv, grad = _extreme_qkv(kind, torch.Generator().manual_seed(11))
    out, dqkv = _attention_and_grad(mk.packed_attention, qkv, grad, 2)
    qkv64 = qkv.detach().double().requires_grad_()
    ref, dref = _attention_and_grad(mk.reference_packed_attention, qkv64, grad.double(), 2)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    # Scores in the hundreds: an fp32 ulp of a score moves exp() by ~1e-5 relative, so the error scales with the
    # largest value (measured: ~4e-6 of it for the output, ~1e-5 for the gradient).
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=2e-5 * ref.abs().max().item())
    torch.testing.assert_close(dqkv.double(), dref, rtol=RTOL, atol=2e-5 * dref.abs().max().item())


@needs_triton
def test_packed_attention_reads_strided_input(triton_backend):
    """qkv as a column slice of a wider tensor (row stride > 3·D), and one whose last dim is not contiguous."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 40, 3 * 32 + 24, generator=gen).to(DEVICE)
    grad = torch.randn(2, 40, 32, generator=gen).to(DEVICE)
    for qkv in (wide[..., 8 : 8 + 96], torch.randn(2, 96, 40, generator=gen).to(DEVICE).transpose(1, 2)):
        leaf = qkv.detach().requires_grad_()
        got = _attention_and_grad(mk.packed_attention, leaf, grad, 2)
        want = _attention_and_grad(mk.reference_packed_attention, leaf, grad, 2)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_packed_attention_hand_computed(backend):
    """Two keys with scores (0, ln 3) after the 1/sqrt(hd) scale -> weights (1/4, 3/4); values 4 and 8 -> 7.
    Gradients by hand: d out / d v = weights; d out / d s = w * (v - out) = (1/4 * -3, 3/4 * 1) = (-3/4, 3/4)."""
    hd, ln3 = 16, math.log(3.0)
    scale = hd**0.5
    qkv = torch.zeros(1, 2, 3 * hd)
    qkv[0, :, 0] = 1.0  # q = e0 for both queries
    qkv[0, 1, hd] = ln3 * scale  # k1 = ln3 * sqrt(hd) * e0, k0 = 0
    qkv[0, 0, 2 * hd :] = 4.0  # v0 = 4, v1 = 8 in every dim
    qkv[0, 1, 2 * hd :] = 8.0
    qkv = qkv.to(DEVICE).requires_grad_()
    grad = torch.zeros(1, 2, hd, device=DEVICE)
    grad[0, 0, 0] = 1.0  # d(out[query 0, dim 0])
    with mk.use_backend(backend):
        out, dqkv = _attention_and_grad(mk.packed_attention, qkv, grad, 1)
    torch.testing.assert_close(out.cpu(), torch.full((1, 2, hd), 7.0))
    dqkv = dqkv.cpu()[0]
    # d/dv: weights of query 0 on dim 0 only
    torch.testing.assert_close(dqkv[:, 2 * hd], torch.tensor([0.25, 0.75]))
    assert dqkv[:, 2 * hd + 1 :].abs().max() == 0
    # d/dk_j = ds_j * q / sqrt(hd) for query 0 (q = e0): (-3/4, 3/4) / 4 on dim 0
    torch.testing.assert_close(dqkv[:, hd], torch.tensor([-0.1875, 0.1875]))
    # d/dq0 = sum_j ds_j * k_j / sqrt(hd) = 3/4 * ln 3 on dim 0; query 1 has no upstream gradient
    torch.testing.assert_close(dqkv[0, 0], torch.tensor(0.75 * ln3))
    assert dqkv[1, :hd].abs().max() == 0


def test_packed_attention_reference_is_the_models_attention():
    from matpac_fast.vit import Attention

    torch.manual_seed(0)
    attn = Attention(64, 4, "math")
    x = torch.randn(3, 58, 64)
    want = attn(x)
    got = attn.proj(mk.reference_packed_attention(attn.qkv(x), 4))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_triton
def test_packed_attention_under_torch_compile_fullgraph(triton_backend):
    gen = torch.Generator().manual_seed(6)
    qkv, grad = _qkv(2, 58, 2, 32, gen)
    compiled = torch.compile(mk.packed_attention, fullgraph=True)
    got = _attention_and_grad(compiled, qkv, grad, 2)
    want = _attention_and_grad(mk.reference_packed_attention, qkv, grad, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "shape, heads, match",
    [
        ((2, 5, 96), 0, "num_heads must be a positive integer"),
        ((2, 5, 96), True, "num_heads must be a positive integer"),
        ((5, 96), 2, r"qkv must be \(B, N, 3 \* num_heads \* head_dim\)"),
        ((2, 5, 100), 2, "got shape .2, 5, 100. with num_heads=2"),
    ],
)
def test_packed_attention_user_errors(shape, heads, match):
    with pytest.raises(ValueError, match=match):
        mk.packed_attention(torch.zeros(shape), heads)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_packed_attention_inputs_no_path_takes_are_one_rule_on_both_backends(backend):
    """No channels (head_dim 0) and integer qkv: the reference failed deep inside (ZeroDivisionError from hd**-0.5, a
    matmul dtype error) while a forced Triton backend said "use backend 'auto'"."""
    with mk.use_backend(backend):
        with pytest.raises(ValueError, match=r"got shape \(2, 5, 0\) with num_heads=1"):
            mk.packed_attention(torch.zeros(2, 5, 0), 1)
        with pytest.raises(ValueError, match="qkv must be a floating-point tensor .* got torch.int64"):
            mk.packed_attention(torch.zeros(2, 5, 48, dtype=torch.long), 1)


def test_backend_variable_set_but_empty_is_the_default():
    """`MATPAC_KERNELS_BACKEND=` (set, empty) made `import matpac_kernels` fail; it means the default, as unset."""
    code = "import matpac_kernels as mk; print(mk.get_backend())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MATPAC_KERNELS_BACKEND": ""})
    assert proc.returncode == 0 and proc.stdout.strip() == "auto", proc.stderr[-2000:]


@needs_triton
# numpy's warnings from the interpreter: the block's padding rows (beyond N, never stored) load q = 0, and 0 · -inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice:RuntimeWarning")
def test_packed_attention_keys_at_minus_inf_in_the_first_block(triton_backend):
    """Every key of the first 64-key block scoring -inf (an -inf in k) made the kernel's running max -inf and its
    output NaN (exp2(-inf + inf)); the reference's softmax gives the later keys' weights."""
    gen = torch.Generator().manual_seed(11)
    qkv = torch.rand(1, 70, 3 * 1 * 16, generator=gen)
    qkv[0, :64, 16] = float("-inf")  # k[:, 0] of the first 64 keys: q (positive) . k = -inf
    got = mk.packed_attention(qkv, 1)
    want = mk.reference_packed_attention(qkv.double(), 1).float()
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@needs_triton
def test_packed_attention_drop_in_edges():
    """As the reference: N = 0 gives an empty result ("auto"; a forced Triton backend says why it cannot) and a numpy
    integer head count is taken (both were refused)."""
    empty = torch.zeros(2, 0, 96)
    with mk.use_backend("auto"):
        assert mk.packed_attention(empty, 2).shape == (2, 0, 32)
    with mk.use_backend("triton"), pytest.raises(ValueError, match=r"no tokens \(N = 0\)"):
        mk.packed_attention(empty, 2)
    qkv = torch.randn(1, 5, 96)
    with mk.use_backend("reference"):
        torch.testing.assert_close(mk.packed_attention(qkv, np.int64(2)), mk.reference_packed_attention(qkv, 2))


def test_model_config_knows_the_kernels_head_widths():
    from matpac_fast.config import TRITON_HEAD_DIMS

    assert TRITON_HEAD_DIMS == mk.attention.HEAD_DIMS


def test_packed_attention_unsupported_head_width():
    """hd = 24: a forced Triton backend refuses in one line; "auto" takes the reference."""
    qkv = torch.randn(1, 7, 3 * 2 * 24)
    with mk.use_backend("triton"), pytest.raises(ValueError, match="head_dim=24"):
        mk.packed_attention(qkv, 2)
    with mk.use_backend("auto"):
        torch.testing.assert_close(mk.packed_attention(qkv, 2), mk.reference_packed_attention(qkv, 2))


@pytest.mark.skipif(not mk.interpreter_active(), reason="Triton's interpreter only")
def test_packed_attention_refuses_bf16_in_the_interpreter():
    """The interpreter's tl.dot multiplies bf16 bit patterns (stored as uint16): a forced Triton backend returned
    outputs ~1e9 without a word. It now says why it cannot; "auto" takes the reference (as on CPU anyway)."""
    qkv = torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(12)).bfloat16()
    with mk.use_backend("triton"), pytest.raises(ValueError, match="bf16 in Triton's interpreter"):
        mk.packed_attention(qkv, 1)
    with mk.use_backend("auto"):
        torch.testing.assert_close(mk.packed_attention(qkv, 1), mk.reference_packed_attention(qkv, 1))


@needs_triton
def test_packed_attention_under_autocast_computes_in_its_dtype(triton_backend):
    """fp32 qkv under autocast: the reference's matmuls run in the autocast dtype and return it; the kernels (a custom
    op, which autocast does not cast) returned fp32, computed in the slow exact-fp32 path. (fp16: the interpreter
    cannot run bf16.)"""
    qkv, grad = _qkv(1, 5, 1, 16, torch.Generator().manual_seed(13))
    with torch.autocast(DEVICE, dtype=torch.float16):
        got = _attention_and_grad(mk.packed_attention, qkv, grad, 1)
        with mk.use_backend("reference"):
            want = _attention_and_grad(mk.packed_attention, qkv, grad, 1)
    assert got[0].dtype == want[0].dtype == torch.float16 and got[1].dtype == torch.float32
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------------ "auto" on CUDA
def test_auto_backend_rule_on_each_device():
    """The rule itself (no kernel runs): "auto" is Triton for a CUDA device when triton is installed and the op
    supports the arguments, the reference for a CPU device or unsupported arguments; "reference" never Triton."""
    import importlib

    runtime = importlib.import_module("matpac_kernels._runtime")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with mk.use_backend("auto"):
        assert runtime.use_triton(cuda) is runtime.HAVE_TRITON
        assert runtime.use_triton(cuda, supported=False, why="K=9000 > 8192") is False
        assert runtime.use_triton(cpu) is False
    with mk.use_backend("reference"):
        assert runtime.use_triton(cuda) is False


@needs_triton
def test_auto_on_cuda_runs_the_xent_kernels(kernels_auto_as_on_cuda):
    """"auto" as on CUDA: the fused forward and backward run (and give the reference's numbers); had "auto" fallen
    back to the reference there, the numbers would agree as well, so the launches are counted."""
    calls = kernels_auto_as_on_cuda
    inputs = _xent_inputs(5, 33, torch.Generator().manual_seed(21))
    got = _forward_backward(mk.centered_softmax_xent, *inputs, 0.1, 0.04, "prob")
    assert calls == {"xent fwd_launch": 1, "xent bwd_launch": 1}, calls
    want = _forward_backward(mk.reference_centered_softmax_xent, *inputs, 0.1, 0.04, "prob")
    _assert_xent_close(got, want)


@needs_triton
def test_auto_on_cuda_runs_the_patchify_kernel(kernels_auto_as_on_cuda):
    calls = kernels_auto_as_on_cuda
    lms, vis, mask, want_vis, want_mask = _hand_case()
    got_vis, got_mask = mk.patchify_gather(lms.to(DEVICE), 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE), patch=2)
    assert calls == {"patchify launch": 1}, calls
    assert torch.equal(got_vis.cpu(), want_vis) and torch.equal(got_mask.cpu(), want_mask)


@needs_triton
def test_auto_on_cuda_runs_the_attention_kernels(kernels_auto_as_on_cuda):
    calls = kernels_auto_as_on_cuda
    qkv, grad = _qkv(1, 9, 2, 16, torch.Generator().manual_seed(22))
    got = _attention_and_grad(mk.packed_attention, qkv, grad, 2)
    assert calls == {"attention fwd_launch": 1, "attention bwd_launch": 1}, calls
    want = _attention_and_grad(mk.reference_packed_attention, qkv, grad, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


def test_auto_on_cuda_takes_the_reference_for_what_a_kernel_cannot_do(kernels_auto_as_on_cuda):
    """Where a kernel cannot run, "auto" as on CUDA takes the reference (and no kernel launches): K above the xent
    kernel's limit, a learnable tau_s (the kernels give it no gradient), an lms that needs a gradient, a head width
    the attention kernel lacks, no tokens."""
    calls = kernels_auto_as_on_cuda
    s = torch.zeros(2, 8193, device=DEVICE)
    loss = mk.centered_softmax_xent(s, s, torch.zeros(8193, device=DEVICE), 0.1, 0.04)[0]
    torch.testing.assert_close(loss.cpu(), torch.full((2,), math.log(8193.0)))
    assert calls == {"xent reference": 1}, calls

    student, teacher, center, _ = _xent_inputs(3, 7, torch.Generator().manual_seed(23))
    tau_s = torch.tensor(0.1, device=DEVICE, requires_grad=True)
    mk.centered_softmax_xent(student, teacher, center, tau_s, 0.04)[0].sum().backward()
    assert calls == {"xent reference": 2}, calls
    assert tau_s.grad is not None and tau_s.grad.abs() > 0

    lms, vis, mask, want_vis, _ = _hand_case()
    lms = lms.to(DEVICE).requires_grad_()
    got_vis, _ = mk.patchify_gather(lms, 2.0, 4.0, vis.to(DEVICE), mask.to(DEVICE), patch=2)
    assert calls == {"xent reference": 2, "patchify reference": 1}, calls
    assert got_vis.requires_grad and torch.equal(got_vis.detach().cpu(), want_vis)

    mk.packed_attention(torch.randn(1, 5, 3 * 2 * 24, device=DEVICE), 2)  # head_dim 24
    assert mk.packed_attention(torch.zeros(2, 0, 96, device=DEVICE), 2).shape == (2, 0, 32)
    assert calls == {"xent reference": 2, "patchify reference": 1, "attention reference": 2}, calls


# ------------------------------------------------------------------------------------------------ fallback
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="triton is a dependency on Linux only")
def test_triton_is_installed_where_it_is_a_dependency():
    """On Linux triton is a dependency (pyproject.toml). Without it matpac_kernels still imports (the references run),
    `needs_triton` skips every kernel test and the subprocess fallback below passes with all of them skipped: a
    missing dependency would read as a green run. It must fail instead."""
    import importlib

    assert importlib.import_module("matpac_kernels._runtime").HAVE_TRITON, "triton is not installed"


def test_interpreter_tests_in_subprocess():
    """When triton was imported before this module could select the interpreter, run this file in a fresh process."""
    if TRITON_IN_PROCESS:
        pytest.skip("the Triton tests ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _no_interpreter_env():
    if not sys.platform.startswith("linux"):
        pytest.skip("triton is a dependency on Linux only (pyproject.toml)")
    from pathlib import Path

    import triton  # a dependency on Linux: missing, this fails (it used to skip)

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_without_interpreter(code: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -c code` with Triton's real compiler (TRITON_INTERPRET unset), output captured."""
    return subprocess.run([sys.executable, "-c", code], env=_no_interpreter_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter skips Triton's compiler; compile every kernel variant (each attention autotuning
    configuration at each head width, 16-bit and fp32) for sm_90 with the wheel's ptxas: none may spill."""
    cmd = [sys.executable, "-m", "matpac_kernels._compile_check", "--arch", "90"]
    proc = subprocess.run(cmd, env=_no_interpreter_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 18 xent + 2 patchify + attention: 16-bit 12 x 3 widths + 8 at 128 + 4 delta, fp32 3 x 4 widths + 4 delta;
    # then with fp64 float scalars, as torch.compile passes them: 2 patchify + 3 attention x 2 precisions
    assert proc.stdout.count("ok  sm_90") == 92, proc.stdout
    assert proc.stdout.count(" STACK:0 ") == 92 and "spills" not in proc.stderr, proc.stderr
    assert proc.stdout.count(" fp64 scalars ") == 8, proc.stdout


def test_compile_check_sees_register_spills():
    """The check read cuobjdump's LOCAL alone, which stays 0 when registers spill (ptxas puts spills in the stack
    frame), so it passed attention variants that spilled kilobytes per thread. A tile known to spill at sm_90 (dk/dv,
    16-bit, 64-wide heads, 32x128 at 4 warps: replaced by 8 warps for that reason) must be reported as spilling."""
    code = (
        "from matpac_kernels import _compile_check as cc\n"
        "from matpac_kernels.attention import _attn_bwd_dkdv_kernel as k\n"
        "u = cc.compile_variant(cc._attention(k, 'bf16', 64, (32, 128, 4, 2)))\n"
        "print(u, cc.spills(u))\n"
    )
    proc = _run_without_interpreter(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STACK:" in proc.stdout and "STACK:0 " not in proc.stdout, proc.stdout
    assert proc.stdout.split()[-1] == "True", proc.stdout


def _check_variants(tmp_path, module: str, kernel_source: str, variants_code: str) -> subprocess.CompletedProcess:
    """Run the compile check's main on the variants `variants_code` builds (a list expression over `kernel`) of the
    one `@triton.jit` kernel in `kernel_source`, written as a module (Triton reads a kernel's source from its file)."""
    header = "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
    (tmp_path / f"{module}.py").write_text(header + kernel_source)
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        f"from {module} import {module} as kernel\n"
        "from matpac_kernels import _compile_check as cc\n"
        f"cc.variants = lambda quick: {variants_code}\n"
        "sys.exit(cc.main([]))\n"
    )
    return _run_without_interpreter(code, timeout=300)


def test_compile_check_reports_a_kernel_that_fp64_scalars_break(tmp_path):
    """torch.compile passes a Python float to a Triton kernel as fp64, an eager launch as fp32: a kernel whose loop
    variable takes the scalar's type compiles one way only (the attention forward did, and failed on the first GPU
    that ran it compiled). The check must name such a variant in one line and exit 1, not stop at a traceback."""
    proc = _check_variants(
        tmp_path, "clash",
        "def clash(x_ptr, scale, N, BLOCK: tl.constexpr):\n"
        "    m = tl.full([BLOCK], 1.0, tl.float32)\n"
        "    for _ in range(0, N, BLOCK):\n"
        "        m = m * scale\n"
        "    tl.store(x_ptr + tl.arange(0, BLOCK), m)\n",
        "[(f'clash {t}', (kernel, {'x_ptr': '*fp32', 'scale': t, 'N': 'i32', 'BLOCK': 'constexpr'}, {'BLOCK': 16}, 4))"
        " for t in ('fp32', 'fp64')]")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"^ok  sm_90  clash fp32 ", proc.stdout, re.M), proc.stdout
    fails = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAIL ")]
    assert len(fails) == 1 and fails[0].startswith("FAIL sm_90  clash fp64: ") and "fp64" in fails[0], proc.stderr
    assert "1 variant(s) do not compile: clash fp64" in proc.stderr


def test_compile_check_sees_fp64_arithmetic(tmp_path):
    """An fp64 scalar that a kernel does not cast first turns the arithmetic it touches into fp64, which compiles
    (5702997's attention backward and patchify did so under torch.compile): the check must name such a variant and
    exit 1, and pass the same kernel with the scalar cast to fp32 on entry."""
    proc = _check_variants(
        tmp_path, "scaled",
        "def scaled(x_ptr, scale, CAST: tl.constexpr, BLOCK: tl.constexpr):\n"
        "    if CAST:\n"
        "        scale = tl.cast(scale, tl.float32)\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * scale)\n",
        "[(f'scaled {t} cast={c}', (kernel, {'x_ptr': '*fp32', 'scale': t, 'CAST': 'constexpr', "
        "'BLOCK': 'constexpr'}, {'CAST': c, 'BLOCK': 16}, 4)) for t in ('fp32', 'fp64') for c in (False, True)]")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok  sm_90  scaled ") == 4 and proc.stdout.count(" F64:") == 1, proc.stdout
    assert re.search(r"^ok  sm_90  scaled fp64 cast=False .* F64:\S*mul\S*\.f64", proc.stdout, re.M), proc.stdout
    assert "1 variant(s) compute in fp64: scaled fp64 cast=False" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------ GPU only
@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_xent_bf16_cuda(mode):
    """bf16 logits (the training dtype): the kernel upcasts to fp32 like the reference, so only the bf16 gradient
    rounding differs."""
    gen = torch.Generator().manual_seed(7)
    M, K = 4 * 133, 2048
    student = (torch.randn(M, K, generator=gen) * 2).cuda().bfloat16().requires_grad_()
    teacher = (torch.randn(M, K, generator=gen) * 2).cuda().bfloat16()
    center = (torch.randn(K, generator=gen) * 0.3).cuda()
    upstream = (torch.rand(M, generator=gen) + 0.5).cuda()
    with mk.use_backend("triton"):
        got = _forward_backward(mk.centered_softmax_xent, student, teacher, center, upstream, 0.1, 0.04, mode)
    want = _forward_backward(mk.reference_centered_softmax_xent, student, teacher, center, upstream, 0.1, 0.04, mode)
    for o, r in zip(got[0], want[0]):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    assert got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=1e-3)


@gpu
@needs_cuda
def test_xent_cuda_compile_triton_op():
    """On CUDA the op is a triton_op: inductor must compile through it (forward and backward)."""
    gen = torch.Generator().manual_seed(8)
    inputs = _xent_inputs(133, 2048, gen)
    compiled = torch.compile(mk.centered_softmax_xent, fullgraph=True)
    with mk.use_backend("triton"):
        got = _forward_backward(compiled, *inputs, 0.1, torch.tensor(0.04, device="cuda"), "prob")
    want = _forward_backward(mk.reference_centered_softmax_xent, *inputs, 0.1, 0.04, "prob")
    _assert_xent_close(got, want)


@gpu
@needs_cuda
def test_patchify_gather_bf16_cuda():
    gen = torch.Generator().manual_seed(9)
    lms = (torch.randn(8, 1, 80, 608, generator=gen) * 4 - 7).half().cuda()
    vis, mask = (x.cuda() for x in _random_masks(8, 190, 57, 133, gen))
    with mk.use_backend("triton"):
        got = mk.patchify_gather(lms, -7.056, 4.193, vis, mask, out_dtype=torch.bfloat16)
        compiled = torch.compile(mk.patchify_gather, fullgraph=True)(
            lms, -7.056, 4.193, vis, mask, out_dtype=torch.bfloat16
        )
    want = mk.reference_patchify_gather(lms, -7.056, 4.193, vis, mask, out_dtype=torch.bfloat16)
    for g, c, w in zip(got, compiled, want):
        assert g.dtype == torch.bfloat16
        # fp32 (x - mean) / std may differ by an ulp before the bf16 rounding: allow one bf16 step
        torch.testing.assert_close(g.float(), w.float(), rtol=8e-3, atol=1e-6)
        torch.testing.assert_close(c.float(), w.float(), rtol=8e-3, atol=1e-6)


@gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_patchify_gather_out_of_range_is_a_device_assert_on_cuda(compiled):
    """On CUDA an out-of-range index trips a device-side assert (no host sync at the call); it poisons the CUDA
    context, hence a subprocess."""
    code = (
        "import torch, matpac_kernels as mk\n"
        "lms = torch.zeros(1, 1, 4, 6, device='cuda')\n"
        "vis, bad = torch.tensor([[4]], device='cuda'), torch.tensor([[2, 6]], device='cuda')\n"
        f"fn = torch.compile(mk.patchify_gather, fullgraph=True) if {compiled} else mk.patchify_gather\n"
        "with mk.use_backend('triton'):\n"
        "    out = fn(lms, 2.0, 4.0, vis, bad, patch=2)\n"
        "torch.cuda.synchronize()\n"
        "print('NO ERROR', out[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "device-side assert" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]


@gpu
@needs_cuda
def test_xent_cuda_leaner_than_eager():
    """Peak memory of fused forward + backward against eager, at the training shape (B=256, 133 masked tokens,
    K=2048). Speed is the benchmark's business (benchmarks/kernels.py): timing asserts in tests are flaky, and at
    small M both paths measure host overhead rather than the kernels."""
    gen = torch.Generator().manual_seed(10)
    M, K = 256 * 133, 2048
    student = (torch.randn(M, K, generator=gen) * 2).cuda().bfloat16().requires_grad_()
    teacher = (torch.randn(M, K, generator=gen) * 2).cuda().bfloat16()
    center = torch.zeros(K, device="cuda")

    def peak_extra_bytes(fn):
        student.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(student, teacher, center, 0.1, 0.04, "prob")[0].mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    with mk.use_backend("triton"):
        m_kernel = peak_extra_bytes(mk.centered_softmax_xent)
    m_eager = peak_extra_bytes(mk.reference_centered_softmax_xent)
    # The gradient itself (M x K bf16) is the floor for both; eager adds several fp32 (M, K) intermediates.
    assert m_kernel < 1.5 * M * K * 2, m_kernel
    assert m_kernel * 3 < m_eager, (m_kernel, m_eager)


@gpu
@needs_cuda
@pytest.mark.parametrize("N,H,hd,compiled", [
    (58, 12, 64, False), (134, 12, 64, False), (191, 16, 32, False), (191, 16, 32, True),
], ids=["student", "teacher", "pred", "pred-compiled"])
def test_packed_attention_bf16_cuda_matches_sdpa(N, H, hd, compiled):
    """The model's three shapes in bf16 (autotuned kernels), one also compiled (the triton_op under inductor: one
    shape, since each compile costs suite time), against SDPA on the same bf16 q, k, v and against the fp32
    reference: the kernel must be as close to fp32 as SDPA is."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(N)
    B = 16
    qkv32 = torch.randn(B, N, 3 * H * hd, generator=gen).cuda()
    grad32 = torch.randn(B, N, H * hd, generator=gen).cuda()
    qkv, grad = qkv32.bfloat16().requires_grad_(), grad32.bfloat16()
    torch._dynamo.reset()  # static shapes per case, as the model compiles (no automatic-dynamic recompiles)
    fn = torch.compile(mk.packed_attention, fullgraph=True, dynamic=False) if compiled else mk.packed_attention
    with mk.use_backend("triton"):
        out, dqkv = _attention_and_grad(fn, qkv, grad, H)

    def sdpa(x, heads):
        q, k, v = x.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, heads * hd)

    s_out, s_dqkv = _attention_and_grad(sdpa, qkv, grad, H)
    ref_in = qkv.detach().float().requires_grad_()
    r_out, r_dqkv = _attention_and_grad(mk.reference_packed_attention, ref_in, grad.float(), H)
    assert out.dtype == dqkv.dtype == torch.bfloat16
    for got, base, ref in ((out, s_out, r_out), (dqkv, s_dqkv, r_dqkv)):
        err, base_err = (got.float() - ref).abs().max().item(), (base.float() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-3, (err, base_err)


@gpu
@needs_cuda
def test_packed_attention_every_autotuning_config_cuda(forced_attention_config):
    """Each configuration the autotuner may pick, forced in turn, in bf16 at the predictor's shape (N = 191, three
    blocks and a tail), against the fp32 reference: a configuration that compiles to wrong code would otherwise only
    show when the autotuner happened to choose it."""
    import matpac_kernels.attention as pa

    gen = torch.Generator().manual_seed(12)
    qkv32, grad32 = torch.randn(4, 191, 3 * 16 * 32, generator=gen), torch.randn(4, 191, 16 * 32, generator=gen)
    qkv, grad = qkv32.cuda().bfloat16().requires_grad_(), grad32.cuda().bfloat16()
    ref_in = qkv.detach().float().requires_grad_()
    r_out, r_dqkv = _attention_and_grad(mk.reference_packed_attention, ref_in, grad.float(), 16)
    for config in sorted(set(pa._QUERY_TILED + pa._KEY_TILED)):
        forced_attention_config(config)
        with mk.use_backend("triton"):
            out, dqkv = _attention_and_grad(mk.packed_attention, qkv, grad, 16)
        # bf16 outputs: a few bf16 steps of the largest values; a wrong tile would be off by O(1)
        torch.testing.assert_close(out.float(), r_out, rtol=2e-2, atol=2e-2, msg=lambda m, c=config: f"{c}: {m}")
        torch.testing.assert_close(dqkv.float(), r_dqkv, rtol=2e-2, atol=2e-2, msg=lambda m, c=config: f"{c}: {m}")


def test_compile_check_ends_when_a_compiling_process_crashes():
    """With --jobs, a variant whose compilation kills its process (an LLVM assertion aborts) left multiprocessing.Pool
    waiting for its result for ever: the check hung. It must name that variant as failed and exit 1."""
    code = (
        "import os, sys\n"
        "from matpac_kernels import _compile_check as cc\n"
        "cc.variants = lambda quick: [(f'v{i}', (None, {}, {}, 4)) for i in range(3)]\n"
        "def fake(variant, arch):\n"
        "    if variant is cc._TODO[1][0]:\n"
        "        os.abort()\n"
        "    return 'REG:10 STACK:0 SHARED:0 LOCAL:0'\n"
        "cc.compile_variant = fake\n"
        "sys.exit(cc.main(['--jobs', '2']))\n"
    )
    proc = _run_without_interpreter(code, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert re.search(r"^FAIL sm_90  v1: a compiling process died", proc.stderr, re.M), proc.stderr[-3000:]
    assert re.search(r"^ok  sm_90  v0 ", proc.stdout, re.M), proc.stdout
