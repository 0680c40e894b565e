"""The MATPAC model: gradients, masking, patchify, attention paths, centring, presets, FLOPs, purity of forward."""

import copy
import math

import pytest
import torch

from matpac_fast.config import get_model_config
from matpac_fast.flops import flops_breakdown, flops_per_sample
from matpac_fast.masking import make_masks, patchify, patchify_gather_reference
from matpac_fast.model import MATPAC, StepState
from matpac_fast.pos_embed import sincos_2d
from matpac_fast.vit import Attention

torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared 2-core machine


def _batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lms = torch.randn(b, 1, cfg.n_mels, cfg.crop_frames, generator=g) * 4 - 7
    vis, mask = make_masks(b, cfg.n_patches, cfg.n_visible, generator=g)
    return {"lms": lms, "vis_idx": vis, "mask_idx": mask}


def _model(name="tiny", seed=0, **kw):
    torch.manual_seed(seed)
    return MATPAC(get_model_config(name, **kw))


# ------------------------------------------------------------------------------------------------ masking
def test_mask_counts_constant_and_partition():
    cfg = get_model_config("matpac")
    assert (cfg.n_patches, cfg.n_visible, cfg.n_masked) == (190, 57, 133)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # "steps"
        vis, mask = make_masks(8, cfg.n_patches, cfg.n_visible, generator=g)
        assert vis.shape == (8, 57) and mask.shape == (8, 133) and vis.dtype == torch.int64
        both = torch.cat([vis, mask], 1).sort(1).values
        assert torch.equal(both, torch.arange(190).expand(8, -1))  # a partition of the patches
        assert torch.all(vis[:, 1:] > vis[:, :-1]) and torch.all(mask[:, 1:] > mask[:, :-1])  # sorted
    a = make_masks(4, 190, 57, generator=torch.Generator().manual_seed(1))
    b = make_masks(4, 190, 57, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][0], a[0][1])  # per-sample masks differ
    # other grids and ratios
    cfg2 = get_model_config("tiny", crop_frames=304, mask_ratio=0.5)
    assert (cfg2.n_patches, cfg2.n_visible, cfg2.n_masked) == (95, 47, 48)
    with pytest.raises(ValueError):
        make_masks(2, 10, 10)


# ------------------------------------------------------------------------------------------------ patchify
def test_patchify_matches_conv_and_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 80, 608, generator=g)
    conv = torch.nn.Conv2d(1, 8, 16, stride=16)
    tokens = patchify(x)
    assert tokens.shape == (2, 190, 256)
    ref = conv(x).flatten(2).transpose(1, 2)
    got = tokens @ conv.weight.reshape(8, 256).T + conv.bias
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # patch index f*38 + t, pixels (f, t) row-major
    f, t, i, j = 3, 17, 5, 9
    assert tokens[1, f * 38 + t, i * 16 + j] == x[1, 0, f * 16 + i, t * 16 + j]


def test_patchify_gather_reference_normalises_in_float32():
    cfg = get_model_config("tiny")
    batch = _batch(cfg)
    lms16 = batch["lms"].half()
    vis, mask = patchify_gather_reference(lms16, -7.056, 4.193, batch["vis_idx"], batch["mask_idx"])
    assert vis.dtype == torch.float32 and vis.shape == (4, 57, 256) and mask.shape == (4, 133, 256)
    full = patchify((lms16.float() + 7.056) / 4.193)
    torch.testing.assert_close(vis[2, 10], full[2, batch["vis_idx"][2, 10]])
    torch.testing.assert_close(mask[3, 100], full[3, batch["mask_idx"][3, 100]])


# ------------------------------------------------------------------------------------------------ blocks
def test_sdpa_and_math_attention_agree():
    torch.manual_seed(0)
    a = Attention(64, 4, "sdpa")
    b = copy.deepcopy(a)
    b.impl = "math"
    x = torch.randn(3, 58, 64, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(ya.square().sum(), x)[0]
    gb = torch.autograd.grad(yb.square().sum(), x)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl, compiled", [("sdpa", False), ("flash", True)])
def test_whole_model_sdpa_vs_math(impl, compiled):
    """SDPA (PyTorch's choice, or the flash backend pinned: CPU has one too) gives the explicit reference's numbers;
    torch.compile traces through the backend pin."""
    cfg = get_model_config("tiny")
    batch = _batch(cfg)
    a = _model(attn_impl=impl)
    b = _model(attn_impl="math")
    b.load_state_dict(a.state_dict())
    lb, _ = b(batch, StepState())
    for model in (a, torch.compile(a, backend="aot_eager")) if compiled else (a,):  # the trace; Inductor: ~15 s
        la, _ = model(batch, StepState())
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


def test_stream_dtype_amp_carries_the_residual_stream_in_bf16():
    """stream_dtype="amp": under autocast every block (encoder, predictor) reads and writes bf16, the loss stays within
    bf16 rounding of the float32 stream's, gradients match; without autocast it changes nothing."""
    cfg = get_model_config("tiny")
    batch = _batch(cfg)

    def run(stream, autocast, compiled=False):
        m = _model(stream_dtype=stream)
        seen = []
        for blk in (*m.student_encoder.blocks, *m.teacher_encoder.blocks, *m.predictor.decoder_blocks):
            blk.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            # aot_eager: dynamo's trace (the hooks, the casts) and AOT autograd without Inductor's code generation,
            # ~20 s of the suite; the trainer's compiled step is checked against eager with Inductor elsewhere
            loss, _ = (torch.compile(m, backend="aot_eager") if compiled else m)(batch, StepState())
        loss.backward()
        return loss.detach(), m.student_encoder.blocks[0].mlp.fc1.weight.grad, seen

    l32, g32, seen32 = run("fp32", True)
    lamp, gamp, seen_amp = run("amp", True)
    n_blocks = 2 * cfg.depth + cfg.pred_depth
    assert seen32 == [(torch.float32, torch.float32)] * n_blocks  # autocast's default: a float32 stream
    assert seen_amp == [(torch.bfloat16, torch.bfloat16)] * n_blocks
    torch.testing.assert_close(lamp, l32, rtol=2e-3, atol=2e-3)
    assert torch.nn.functional.cosine_similarity(gamp.flatten(), g32.flatten(), dim=0) > 0.99
    lc, _, seen_c = run("amp", True, compiled=True)
    assert seen_c == seen_amp  # dynamo replays the hooks' side effects
    torch.testing.assert_close(lc, lamp, rtol=2e-3, atol=2e-3)
    # no autocast: identical to the float32 stream, bit for bit
    a, ga, seen_a = run("amp", False)
    b, gb, _ = run("fp32", False)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert {d for pair in seen_a for d in pair} == {torch.float32}


def test_sincos_table_layout():
    tab = sincos_2d(8, 5, 38)
    assert tab.shape == (1, 191, 8)
    assert torch.all(tab[0, 0] == 0)  # CLS slot
    # first half encodes time: patch (f=2, t=3) -> index 1 + 2*38 + 3
    row = tab[0, 1 + 2 * 38 + 3]
    omega = [1.0, 1 / 100]  # 1 / 10000^(i / 2) for i = 0, 1 (dim 4 per half)
    exp = [math.sin(3 * omega[0]), math.sin(3 * omega[1]), math.cos(3 * omega[0]), math.cos(3 * omega[1])]
    exp += [math.sin(2 * omega[0]), math.sin(2 * omega[1]), math.cos(2 * omega[0]), math.cos(2 * omega[1])]
    torch.testing.assert_close(row, torch.tensor(exp, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", ["tiny", "tiny++"])
def test_every_student_param_gets_grad_and_teacher_none(name):
    m = _model("tiny", mcl_heads=5 if name == "tiny++" else 1)
    loss, stats = m(_batch(m.cfg), StepState(tau_t=0.04, mcl_temperature=0.1))
    loss.backward()
    student = {id(p) for p in m.student_parameters()}
    mcl_grad = []
    for n, p in m.named_parameters():
        if id(p) in student:
            assert p.requires_grad and p.grad is not None, n
            if n.startswith("predictor.mcl_heads."):  # r heads: only the winners get a gradient, a head's can be 0
                mcl_grad.append(p.grad.abs().sum().item())
            else:  # everything else (encoder, predictor trunk, student head) is on every head's path
                assert p.grad.abs().sum() > 0, n
        else:
            assert n.startswith(("teacher_encoder.", "teacher_head.")), n
            assert not p.requires_grad and p.grad is None, n
    assert len(mcl_grad) == (2 * 5 if name == "tiny++" else 0) and (not mcl_grad or max(mcl_grad) > 0), mcl_grad
    assert torch.isfinite(loss)
    for k in ("loss_pred", "loss_cls", "teacher_entropy", "teacher_max_prob", "center_norm"):
        assert stats[k].ndim == 0 and not stats[k].requires_grad, k
    assert stats["center_batch"].shape == (m.cfg.n_prototypes,)


def test_student_parameters_exclude_teacher_centre_and_tables():
    m = _model()
    names = {id(p): n for n, p in m.named_parameters()}
    trained = [names[id(p)] for p in m.student_parameters()]
    assert len(trained) == len(set(trained))
    assert not any(n.startswith(("teacher_encoder.", "teacher_head.")) for n in trained)
    assert {"cls_token", "patch_embed.proj.weight", "predictor.mask_token", "student_head.last_layer.weight_g"} <= set(
        trained
    )
    assert set(trained) | {n for n in names.values() if n.startswith("teacher")} == set(names.values())
    buffers = dict(m.named_buffers())
    assert set(buffers) == {"pos_embed", "predictor.decoder_pos_embed", "center"}
    # An optimizer built from student_parameters() never moves the teacher or the centre.
    opt = torch.optim.AdamW(m.student_parameters(), lr=1e-2, weight_decay=0.05)
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("teacher") or k == "center"}
    loss, _ = m(_batch(m.cfg), StepState())
    loss.backward()
    opt.step()
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_forward_is_pure():
    m = _model()
    m.update_center(torch.rand(m.cfg.n_prototypes))
    before = copy.deepcopy(m.state_dict())
    batch = _batch(m.cfg)
    l1, s1 = m(batch, StepState())
    l2, s2 = m(batch, StepState())
    assert torch.equal(l1, l2) and torch.equal(s1["center_batch"], s2["center_batch"])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_teacher_independent_and_heads_initialised_as_authors():
    m = _model()
    s, t = m.student_encoder.state_dict(), m.teacher_encoder.state_dict()
    assert not torch.equal(s["blocks.0.attn.qkv.weight"], t["blocks.0.attn.qkv.weight"])  # independent init
    sh, th = m.student_head.state_dict(), m.teacher_head.state_dict()
    assert torch.equal(sh["last_layer.weight_v"], th["last_layer.weight_v"])
    assert torch.equal(sh["last_layer.weight_g"], torch.ones_like(sh["last_layer.weight_g"]))
    assert not torch.equal(sh["mlp.0.weight"], th["mlp.0.weight"])  # authors: student MLP re-drawn (xavier)
    assert th["mlp.0.weight"].std() < 0.03  # teacher keeps trunc-normal(0.02)
    c = _model(teacher_head_init="copy")
    for k, v in c.student_head.state_dict().items():
        assert torch.equal(v, c.teacher_head.state_dict()[k]), k


# ------------------------------------------------------------------------------------------------ centring
@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_centre_statistic_and_update(mode):
    m = _model(center_mode=mode)
    m.update_center(torch.linspace(0, 1, m.cfg.n_prototypes))  # non-zero centre so that centring matters
    captured = {}

    def hook(module, inputs, output):
        captured["t"] = output.detach().flatten(0, 1)  # returns None: the output is not replaced

    m.teacher_head.register_forward_hook(hook)
    tau_t = 0.05
    _, stats = m(_batch(m.cfg), StepState(tau_t=tau_t))
    teacher = captured["t"]
    p = torch.softmax((teacher - m.center) / tau_t, dim=-1)
    expected = p.mean(0) if mode == "prob" else teacher.mean(0)
    torch.testing.assert_close(stats["center_batch"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["teacher_max_prob"], p.max(-1).values.mean(), rtol=1e-5, atol=1e-6)
    c0 = m.center.clone()
    m.update_center(stats["center_batch"])
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * expected[None], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ presets
def test_presets_and_config_errors():
    mp = get_model_config("matpac")
    assert (mp.dim, mp.depth, mp.heads, mp.pred_dim, mp.pred_depth, mp.pred_heads) == (768, 12, 12, 512, 8, 16)
    assert (mp.n_prototypes, mp.alpha, mp.center_mode, mp.tau_s, mp.mcl_heads) == (2048, 0.5, "prob", 0.1, 1)
    assert (mp.norm_mean, mp.norm_std, mp.grid) == (-7.056, 4.193, (5, 38))
    assert get_model_config("matpac_plusplus").mcl_heads == 5
    m2d = get_model_config("m2d")
    assert m2d.alpha == 1.0 and m2d.target_standardize and not m2d.use_heads
    with pytest.raises(ValueError, match="unknown model preset"):
        get_model_config("vit_h")
    with pytest.raises(ValueError, match="unknown model config field"):
        get_model_config("tiny", dimension=3)
    with pytest.raises(ValueError, match="center_mode"):
        get_model_config("tiny", center_mode="mean")


def test_m2d_mode_trains_without_heads():
    m = _model("tiny", alpha=1.0, target_standardize=True)
    assert m.student_head is None and m.ema_pairs()[1] == ([], [])
    loss, stats = m(_batch(m.cfg), StepState())
    torch.testing.assert_close(loss, stats["loss_pred"])
    loss.backward()
    assert all(p.grad is not None for p in m.student_parameters())


def test_alpha_weighting():
    batch = _batch(get_model_config("tiny"))
    losses = {}
    for alpha in (0.0, 0.3):
        loss, stats = _model(alpha=alpha)(batch, StepState())
        losses[alpha] = loss
        torch.testing.assert_close(loss, alpha * stats["loss_pred"] + (1 - alpha) * stats["loss_cls"])
    torch.testing.assert_close(losses[0.0], _model()(batch, StepState())[1]["loss_cls"])


def test_bad_batch_shapes_are_errors():
    m = _model()
    batch = _batch(m.cfg)
    with pytest.raises(ValueError, match="batch\\['lms'\\]"):
        m({**batch, "lms": batch["lms"][..., :600]}, StepState())
    with pytest.raises(ValueError, match="make_masks"):
        m({**batch, "vis_idx": batch["vis_idx"][:, :10]}, StepState())


def test_kernel_flag_dispatches_to_matpac_kernels(monkeypatch):
    """use_kernels=True calls matpac_kernels.patchify_gather / centered_softmax_xent with the reference contract."""
    import sys
    import types

    from matpac_fast.losses import centered_softmax_xent_reference

    calls = []
    fake = types.ModuleType("matpac_kernels")

    def pg(*a, **k):
        calls.append("patchify_gather")
        return patchify_gather_reference(*a, **k)

    def xe(*a, **k):
        calls.append("centered_softmax_xent")
        return centered_softmax_xent_reference(*a, **k)

    fake.patchify_gather, fake.centered_softmax_xent = pg, xe
    monkeypatch.setitem(sys.modules, "matpac_kernels", fake)
    batch = _batch(get_model_config("tiny"))
    ref, _ = _model()(batch, StepState())
    got, _ = _model(use_kernels=True)(batch, StepState())
    assert calls == ["patchify_gather", "centered_softmax_xent"]
    torch.testing.assert_close(got, ref)


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flops_per_sample_matches_method_section_8():
    b = flops_breakdown(get_model_config("matpac"))
    assert b["student"] / 1e9 == pytest.approx(30, rel=0.05)
    assert b["teacher"] / 1e9 == pytest.approx(23, rel=0.05)
    assert b["predictor"] / 1e9 == pytest.approx(32, rel=0.05)
    assert b["heads"] / 1e9 == pytest.approx(7, rel=0.1)
    # by hand: 190 patches of 256 values into 768 dims forward, plus the weight gradient over the 57 visible ones
    # (no input gradient: the input is data)
    assert b["patch_embed"] == 2 * 190 * 256 * 768 + 2 * 57 * 256 * 768
    assert flops_per_sample(get_model_config("matpac")) / 1e9 == pytest.approx(92, rel=0.02)
    assert flops_per_sample(get_model_config("m2d")) < flops_per_sample(get_model_config("matpac"))
    assert flops_per_sample(get_model_config("tiny")) < 1e9


@pytest.mark.parametrize("kw", [{}, {"mcl_heads": 3}, {"alpha": 1.0}, {"mask_ratio": 0.5, "depth": 3}])
def test_flops_per_sample_is_what_a_training_step_multiplies(kw):
    """The MFU numerator, counted independently: torch's FlopCounterMode over one forward + backward of the model
    (the math attention path, so q·kᵀ and attn·v are plain matmuls it sees). Any layer, token count or backward
    that the model and flops.py disagree on shows here (for all four presets, 91.79 GFLOP for `matpac` included,
    the two agree exactly; the tiny variants keep this test fast)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_model_config("tiny", attn_impl="math", **kw)
    model, batch = MATPAC(cfg), _batch(cfg, b=2)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(batch, StepState())
        loss.backward()
    assert counter.get_total_flops() / 2 == pytest.approx(flops_per_sample(cfg), rel=1e-9)

def test_matpac_preset_builds_with_paper_sizes():
    cfg = get_model_config("matpac")
    m = MATPAC(cfg)
    n_enc = sum(p.numel() for p in m.student_encoder.parameters())
    assert n_enc == pytest.approx(85.05e6, rel=0.01)  # ViT-B blocks + norm
    assert m.pos_embed.shape == (1, 191, 768) and m.center.shape == (1, 2048)


def test_pinned_backend_that_cannot_run_raises():
    """A pinned backend does not silently fall back: cuDNN attention does not exist on CPU."""
    cfg = get_model_config("tiny")
    with pytest.raises(RuntimeError):
        _model(attn_impl="cudnn")(_batch(cfg), StepState())
    with pytest.raises(ValueError, match="attn_impl='fast': use one of sdpa, flash, efficient, cudnn, math, triton"):
        get_model_config("tiny", attn_impl="fast")
    # the Triton attention kernel's head widths: refused up front, not silently run as the reference
    with pytest.raises(ValueError, match=r"takes heads 16, 32, 64, 128 wide, but pred_dim=32 / pred_heads=4 = 8: "
                                         r"change pred_heads or use attn_impl=sdpa"):
        get_model_config("tiny", attn_impl="triton")
    with pytest.raises(ValueError, match=r"but dim=96 / heads=4 = 24: change heads"):
        get_model_config("tiny", attn_impl="triton", dim=96, pred_heads=2)
    assert get_model_config("matpac", attn_impl="triton").attn_impl == "triton"  # 64- and 32-wide heads
    with pytest.raises(ValueError, match="stream_dtype='bf16': use one of fp32, amp"):
        get_model_config("tiny", stream_dtype="bf16")
