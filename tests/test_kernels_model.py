"""The tiny MATPAC model with `use_kernels=True` gives the loss, statistics and gradients of the reference path.

fp32, on CPU through Triton's interpreter (or compiled on CUDA when a GPU is present). See tests/test_kernels.py for
why TRITON_INTERPRET is set before anything imports triton, and for the subprocess fallback used when that was too
late in this pytest process.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matpac_kernels as mk  # noqa: E402

from matpac_fast import model as model_mod  # noqa: E402  (the project's own module: missing, it fails, not skips)
from matpac_fast.config import get_model_config  # noqa: E402
from matpac_fast.masking import make_masks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_IN_PROCESS = torch.cuda.is_available() or mk.interpreter_active()


def _tiny_pair(center_mode):
    torch.manual_seed(0)
    ref = model_mod.MATPAC(get_model_config("tiny", use_kernels=False, center_mode=center_mode)).to(DEVICE)
    fast = model_mod.MATPAC(get_model_config("tiny", use_kernels=True, center_mode=center_mode)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    # A non-zero centre so that the centring is exercised (it starts at zero).
    with torch.no_grad():
        c = torch.randn(ref.center.shape, generator=torch.Generator().manual_seed(1)) * 0.3
        ref.center.copy_(c)
        fast.center.copy_(c)
    return ref, fast


def _batch(cfg, B=2):
    gen = torch.Generator().manual_seed(2)
    lms = torch.randn(B, 1, cfg.n_mels, cfg.crop_frames, generator=gen) * 4.2 - 7.1
    vis, mask = make_masks(B, cfg.n_patches, cfg.n_visible, generator=gen)
    return {"lms": lms.to(DEVICE), "vis_idx": vis.to(DEVICE), "mask_idx": mask.to(DEVICE)}


@pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1; see subprocess test")
@pytest.mark.parametrize("center_mode,B", [("prob", 2), ("logit", 1)])  # small: the interpreter is slow
def test_tiny_model_kernels_match_reference(center_mode, B):
    ref, fast = _tiny_pair(center_mode)
    batch = _batch(ref.cfg, B)
    step = model_mod.StepState(tau_t=0.05, mcl_temperature=0.1)
    loss_ref, stats_ref = ref(batch, step)
    with mk.use_backend("triton"):  # on CPU "auto" would quietly pick the reference: force the kernels
        loss_fast, stats_fast = fast(batch, step)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-5)
    assert stats_fast.keys() == stats_ref.keys()
    for name in stats_ref:
        torch.testing.assert_close(stats_fast[name], stats_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    _assert_same_grads(ref, loss_ref, fast, loss_fast)


@pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1; see subprocess test")
@pytest.mark.parametrize("overrides", [{"mcl_heads": 3}, {"alpha": 0.0}, {"alpha": 1.0}],
                         ids=["matpac++ 3 heads", "alpha 0", "alpha 1 (m2d, no heads)"])
def test_kernel_path_follows_the_reference_over_training_steps(overrides):
    """Three optimizer steps with EMA and centre updates, the kernels against the reference: MATPAC++'s multiple-choice
    heads (the hard minimum at the last step's temperature), α = 0 (classification only) and α = 1 (no heads: the
    cross-entropy kernel unused, the patchify kernel still in). Losses at each step; centres, teachers at the end."""
    from matpac_fast.ema import ema_update

    torch.manual_seed(0)
    models = [model_mod.MATPAC(get_model_config("tiny", use_kernels=k, **overrides)).to(DEVICE) for k in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    # SGD, not Adam: Adam scales a ~0 gradient (a key bias's, which softmax ignores) up to a full step whose sign
    # is rounding noise, different on the two paths
    opts = [torch.optim.SGD(m.student_parameters(), lr=0.05) for m in models]
    batch = _batch(models[0].cfg, B=2)
    for step, mcl_t in enumerate((0.1, 0.05, 1e-5)):  # 1e-5: at or below mcl_t_min, the hard minimum
        state = model_mod.StepState(tau_t=0.05, mcl_temperature=mcl_t)
        losses = []
        for m, opt in zip(models, opts):
            with mk.use_backend("triton" if m.cfg.use_kernels else "reference"):
                loss, stats = m(batch, state)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            (te, se), (th, sh) = m.ema_pairs()
            ema_update(te, se, 0.9)
            ema_update(th, sh, 0.8)
            if "center_batch" in stats:
                m.update_center(stats["center_batch"].detach())
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5, msg=f"step {step}")
    fast_state = models[1].state_dict()
    for name, value in models[0].state_dict().items():
        torch.testing.assert_close(fast_state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _assert_same_grads(ref, loss_ref, fast, loss_fast):
    loss_ref.backward()
    loss_fast.backward()
    fast_params = dict(fast.named_parameters())
    n_grads = 0
    for name, p in ref.named_parameters():
        q = fast_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
            n_grads += 1
    assert n_grads > 10  # the student encoder, predictor and head all received gradients


@pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1; see subprocess test")
def test_tiny_model_triton_attention_matches_math():
    """attn_impl="triton" (matpac_kernels.packed_attention in every block: student, teacher under no_grad, predictor)
    gives the explicit reference's loss and gradients."""
    torch.manual_seed(0)
    cfg = dict(pred_heads=2)  # predictor heads 16 wide: the kernel takes 16 to 128 (tiny's default is 8)
    ref = model_mod.MATPAC(get_model_config("tiny", attn_impl="math", **cfg)).to(DEVICE)
    fast = model_mod.MATPAC(get_model_config("tiny", attn_impl="triton", **cfg)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    batch = _batch(ref.cfg, 2)
    step = model_mod.StepState(tau_t=0.05, mcl_temperature=0.1)
    loss_ref, _ = ref(batch, step)
    with mk.use_backend("triton"):  # forced: "auto" on CPU would take the reference and compare it with itself
        loss_fast, _ = fast(batch, step)
        torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-5)
        _assert_same_grads(ref, loss_ref, fast, loss_fast)


@pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1; see subprocess test")
def test_tiny_model_auto_backend_as_on_cuda_runs_every_kernel(kernels_auto_as_on_cuda):
    """The trainer's default backend, "auto", deciding as on CUDA (tests/conftest.py): a model with use_kernels=True and
    attn_impl="triton" must run all three kernels (patchify, centred xent forward and backward, attention forward and
    backward) and none of their references, with the plain model's loss and gradients. The tests above force
    "triton", so they would pass with "auto" quietly taking the references on a GPU."""
    calls = kernels_auto_as_on_cuda
    torch.manual_seed(0)
    cfg = dict(pred_heads=2)  # predictor heads 16 wide: the attention kernel takes 16 to 128
    ref = model_mod.MATPAC(get_model_config("tiny", attn_impl="math", **cfg)).to(DEVICE)
    fast = model_mod.MATPAC(get_model_config("tiny", use_kernels=True, attn_impl="triton", **cfg)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    batch = _batch(ref.cfg, 1)
    step = model_mod.StepState(tau_t=0.05, mcl_temperature=0.1)
    loss_fast, _ = fast(batch, step)
    assert not any(k.endswith("reference") for k in calls), calls
    assert calls["patchify launch"] == 1 and calls["xent fwd_launch"] >= 1, calls
    assert calls["attention fwd_launch"] >= 2, calls  # the student's blocks at least (the teacher's too, no grad)
    loss_ref, _ = ref(batch, step)  # use_kernels=False, attn_impl="math": matpac_fast's own code, no matpac_kernels
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-5)
    _assert_same_grads(ref, loss_ref, fast, loss_fast)
    assert calls["xent bwd_launch"] == calls["xent fwd_launch"] and calls["attention bwd_launch"] >= 1, calls
    assert not any(k.endswith("reference") for k in calls), calls


def test_model_kernel_tests_in_subprocess():
    if TRITON_IN_PROCESS:
        pytest.skip("the kernel model tests ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
