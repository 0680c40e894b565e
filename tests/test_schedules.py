"""Schedules and EMA at their boundaries."""

import math

import pytest
import torch

from matpac_fast import schedules as S
from matpac_fast.config import get_model_config
from matpac_fast.ema import ema_update
from matpac_fast.model import StepState


def test_lr_warmup_then_cosine_to_zero():
    kw = dict(base_lr=3e-4, warmup_steps=100, total_steps=1100)
    assert S.lr_at(0, **kw) == 0.0
    assert S.lr_at(50, **kw) == pytest.approx(1.5e-4)
    assert S.lr_at(100, **kw) == pytest.approx(3e-4)
    assert S.lr_at(600, **kw) == pytest.approx(1.5e-4)  # half-way through the cosine
    assert S.lr_at(350, **kw) == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert S.lr_at(1100, **kw) == 0.0
    assert S.lr_at(5000, **kw) == 0.0
    values = [S.lr_at(s, **kw) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warm-up
    with pytest.raises(ValueError, match="step"):
        S.lr_at(-1, **kw)


def test_ema_decay_linear_over_all_updates():
    assert S.ema_decay_at(0, 0.99995, 0.99999, 294816) == 0.99995
    assert S.ema_decay_at(147408, 0.99995, 0.99999, 294816) == pytest.approx(0.99997, abs=1e-12)
    assert S.ema_decay_at(294816, 0.99995, 0.99999, 294816) == 0.99999
    assert S.ema_decay_at(10**6, 0.998, 1.0, 294816) == 1.0


def test_teacher_temperature_warmup_then_constant():
    assert S.tau_teacher_at(0) == pytest.approx(0.04)
    assert S.tau_teacher_at(9827 // 2, warmup_steps=9826) == pytest.approx(0.055, abs=1e-12)
    assert S.tau_teacher_at(9827) == pytest.approx(0.07)
    assert S.tau_teacher_at(50_000) == pytest.approx(0.07)


def test_mcl_temperature_decay_and_floor():
    assert S.mcl_temperature_at(0) == pytest.approx(0.1)
    assert S.mcl_temperature_at(1000) == pytest.approx(0.1 * 0.99997**1000)
    switch = math.ceil(math.log(1e-3) / math.log(0.99997))  # first step with 0.1 * d^s <= 1e-4
    assert S.mcl_temperature_at(switch - 1) > 1e-4
    assert S.mcl_temperature_at(switch) == 1e-4
    assert S.mcl_temperature_at(10**6) == 1e-4


def test_step_state_from_config():
    cfg = get_model_config("matpac_plusplus")
    s0, s1 = StepState.at(cfg, 0, tau_warmup_steps=10), StepState.at(cfg, 10, tau_warmup_steps=10)
    assert (s0.tau_t, s1.tau_t) == (pytest.approx(0.04), pytest.approx(0.07))
    assert s0.mcl_temperature == pytest.approx(0.1)


def test_ema_update_values():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    s = [torch.tensor([3.0, 6.0]), torch.tensor([[0.0]])]
    ema_update(t, s, 0.75)
    torch.testing.assert_close(t[0], torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(t[1], torch.tensor([[3.0]]))
    ema_update(t, s, 1.0)  # decay 1: unchanged (the authors skip the step)
    torch.testing.assert_close(t[0], torch.tensor([1.5, 3.0]))
    ema_update(t, s, torch.tensor(0.5))  # tensor decay (precomputed schedules on the device)
    torch.testing.assert_close(t[0], torch.tensor([2.25, 4.5]))
    ema_update(t, s, 0.0)  # decay 0: copy
    torch.testing.assert_close(t[0], s[0])


def test_ema_update_with_residual_matches_the_hand_computed_values():
    # 1 - d = 0.25, exact in fp32: the residual stays 0 and the values are those of the plain update
    t, r = [torch.tensor([1.0, 2.0])], [torch.zeros(2)]
    ema_update(t, [torch.tensor([3.0, 6.0])], 0.75, r)
    torch.testing.assert_close(t[0], torch.tensor([1.5, 3.0]), rtol=0, atol=0)
    assert torch.equal(r[0], torch.zeros(2))
    # an update of 2^-25 to 1.0 is half an ulp: rounded away (to even) from t, kept whole in the residual; the second
    # one makes a whole ulp (2^-24 above 1.0 is not representable: 1 + 2^-23 is the next float), and so on
    t, r, s = [torch.tensor([1.0])], [torch.zeros(1)], [torch.tensor([1.0 + 2.0**-20])]
    w = 2.0**-5  # (1 - d)(s - t) = 2^-25
    ema_update(t, s, 1 - w, r)
    assert t[0].item() == 1.0 and r[0].item() == 2.0**-25
    ema_update(t, s, 1 - w, r)  # y = 2^-25 + 2^-25: a tie, to even (1.0); all of it in the residual
    assert t[0].item() == 1.0 and r[0].item() == 2.0**-24
    ema_update(t, s, 1 - w, r)  # y = 3 * 2^-25 = 0.75 ulp: t goes up one ulp, the residual gives back the excess
    assert t[0].item() == 1.0 + 2.0**-23 and r[0].item() == -(2.0**-25)


@pytest.mark.parametrize("decay", [0.99999 ** (256 / 2048), torch.tensor(0.99999 ** (256 / 2048))])
def test_ema_update_at_one_gpus_rescaled_decay_moves_the_teacher(decay):
    """The recipe's final decay rescaled to a 256 batch (rho^kappa, 1 - d = 1.25e-6): with the plain fp32 update
    every teacher weight within ~5 % of its student never moved (each step's change under half an ulp; as a tensor
    decay, d*t + (1 - d)*s, each moved by what its roundings happened to give); with the residual the teacher
    follows the float64 EMA."""
    g = torch.Generator().manual_seed(0)
    t0 = torch.rand(4096, generator=g) + 0.5
    s = [t0 * 1.01]  # the student 1 % away
    plain, compensated, r = [t0.clone()], [t0.clone()], [torch.zeros(4096)]
    exact = t0.double()
    w = 1 - float(decay)
    for _ in range(2000):
        ema_update(plain, s, decay)
        ema_update(compensated, s, decay, r)
        exact = exact + w * (s[0].double() - exact)
    moved = exact - t0.double()

    def share(x):  # of the float64 EMA's move, per weight
        return (x.double() - t0.double()).div(moved)

    if isinstance(decay, float):
        assert torch.equal(plain[0], t0)  # what the plain update did here: nothing
    else:
        assert (share(plain[0]) - 1).abs().max().item() > 0.5  # from 0 to several times the move
    assert (share(compensated[0]) - 1).abs().max().item() < 0.05  # within an ulp of it
    err = (compensated[0].double() + r[0].double() - exact).abs().div(moved).max().item()
    assert err < 1e-5  # teacher + residual: the float64 EMA


def test_the_compiled_compensated_update_is_the_eager_one_and_compiles_once():
    """ema_update(..., compiled=True) (what a compiled training run uses): torch.compile of the same six passes,
    given the weight as a 0-d tensor. On the CPU it is the eager update to the bit, teacher and residual, over
    updates with different decays, and all of them run one graph (a float weight would recompile at every step)."""
    from torch._dynamo.utils import counters

    from matpac_fast.ema import _compensated

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (11, 2, 3)]  # shapes no other test compiles: this test's graph is new
    teacher = [torch.rand(s, generator=g) + 0.5 for s in shapes]
    student = [t * 1.01 for t in teacher]
    eager_t, eager_r = [t.clone() for t in teacher], [torch.randn(t.shape, generator=g) * 1e-9 for t in teacher]
    comp_t, comp_r = [t.clone() for t in eager_t], [r.clone() for r in eager_r]
    before = counters["stats"]["unique_graphs"]
    for decay in (1 - 1.25e-6, 1 - 6.25e-6, 0.99):
        _compensated(eager_t, student, eager_r, torch.full((), 1 - decay))
        ema_update(comp_t, student, decay, comp_r, compiled=True)
        for a, b in zip(eager_t + eager_r, comp_t + comp_r):
            assert torch.equal(a, b)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert not torch.equal(comp_t[0], teacher[0])  # it moved (0.99: 1 % of 1 % of the weight)
    ema_update(comp_t, student, 1.0, comp_r, compiled=True)  # decay 1: nothing, as eager
    assert all(torch.equal(a, b) for a, b in zip(eager_t, comp_t))


def test_ema_update_mixed_precision_student_and_errors():
    t = [torch.zeros(3)]
    ema_update(t, [torch.ones(3, dtype=torch.bfloat16)], 0.5)
    assert t[0].dtype == torch.float32
    torch.testing.assert_close(t[0], torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="teacher tensors"):
        ema_update([torch.zeros(1)], [], 0.5)
    for residual in ([], [torch.zeros(2)], [torch.zeros(1, dtype=torch.float64)]):
        with pytest.raises(ValueError, match="residual needs one tensor of each teacher tensor's shape and dtype"):
            ema_update([torch.zeros(1)], [torch.ones(1)], 0.5, residual)


def test_mcl_temperature_follows_the_authors_curve_over_any_run_length():
    """MATPAC++'s 0.1 * 0.99997**step is the authors' curve over their 294,816 updates (METHOD.md §7; §5: step-count
    schedules scale). It ran on raw steps: a one-GPU paper run (8x the steps) switched to the hard minimum at 10 % of
    training instead of 78 %, a small run never did. Now a run of N steps reads the curve at step * 294,816 / N."""
    from matpac_fast.config import get_model_config
    from matpac_fast.train_config import TrainConfig
    from matpac_fast.trainer import _schedule_arrays

    m = get_model_config("matpac_plusplus")
    switch = 230256  # first step of the authors' run with 0.1 * 0.99997**step <= 1e-4 (the hard minimum)
    assert S.mcl_temperature_at(switch - 1) > 1e-4 >= 0.1 * 0.99997**switch
    for total in (1000, 50000, 600000):  # a short run, a long one (a one-GPU paper run is 8 x 294,816)
        t = _schedule_arrays(TrainConfig(), m, 100, total, 2048)["mcl_t"]
        assert t[0] == pytest.approx(0.1) and t[total] == 1e-4
        assert t[total // 2] == pytest.approx(0.1 * 0.99997 ** (294816 // 2), rel=1e-3)
        first_hard = next(i for i, v in enumerate(t) if v == 1e-4)
        assert first_hard / total == pytest.approx(switch / 294816, abs=2e-3)  # 78 % of any run
    raw = TrainConfig()
    raw.schedule.mcl_reference_steps = 0  # the literal formula on this run's steps
    t = _schedule_arrays(raw, m, 100, 1000, 2048)["mcl_t"]
    assert t[1000] == pytest.approx(0.1 * 0.99997**1000)


def test_a_checkpoint_from_before_mcl_reference_steps_resumes_only_as_raw_steps():
    """Such a run read the MATPAC++ temperature on raw steps: resuming it under the new default would move the
    temperature mid-run (back from the hard minimum to soft), so the field's absence compares as 0 and blocks."""
    from matpac_fast.train_config import TrainConfig, resume_changes

    old = TrainConfig().to_dict()
    del old["schedule"]["mcl_reference_steps"]
    assert resume_changes({**old, "model": {}}, {**TrainConfig().to_dict(), "model": {}}) == (
        ["--mcl-reference-steps 0 -> 294816"], [])
    raw = TrainConfig()
    raw.schedule.mcl_reference_steps = 0
    assert resume_changes({**old, "model": {}}, {**raw.to_dict(), "model": {}}) == ([], [])


def test_an_inductor_change_on_resume_is_free_and_listed():
    """--inductor changes how the step compiles, not what it computes: free on resume, and named on the "resumed
    from" line like --compile-mode (it was not compared at all, so a change went unsaid). A checkpoint from before
    the flag had no options."""
    from matpac_fast.train_config import TrainConfig, resume_changes

    old = TrainConfig().to_dict()
    new = TrainConfig(inductor={"coordinate_descent_tuning": True}).to_dict()
    assert resume_changes({**old, "model": {}}, {**new, "model": {}}) == (
        [], ["--inductor (none) -> coordinate_descent_tuning=True"])
    del old["inductor"]
    assert resume_changes({**old, "model": {}}, {**new, "model": {}})[1] == [
        "--inductor (none) -> coordinate_descent_tuning=True"]
    assert resume_changes({**new, "model": {}}, {**new, "model": {}}) == ([], [])


def test_a_workers_change_on_resume_shows_the_counts_given():
    """0 workers splits an epoch as 1 does (0 -> 1 is no change), but a refusal shows the counts as given: a
    --workers 0 checkpoint was refused with "--workers 1 -> 2"."""
    from matpac_fast.train_config import TrainConfig, resume_changes

    def cfg(workers):
        d = TrainConfig().to_dict()
        return {**d, "data": {**d["data"], "workers": workers}, "model": {}}

    assert resume_changes(cfg(0), cfg(1)) == ([], [])
    assert resume_changes(cfg(0), cfg(2)) == (["--workers 0 -> 2"], [])
    assert resume_changes(cfg(2), cfg(0)) == (["--workers 2 -> 0"], [])
