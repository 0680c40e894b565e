"""Hand-computed cases for the prediction loss, the classification loss and both centring variants."""

import math

import pytest
import torch

from matpac_fast.losses import (
    centered_softmax_xent_reference,
    mcl_prediction_loss,
    prediction_loss,
    standardize_tokens,
)


def test_prediction_loss_hand_cases():
    pred = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[4.0, 3.0], [-2.0, 0.0], [0.0, 5.0]])
    # cos = 24/25, -1, 1
    expected = torch.tensor([2 - 2 * 24 / 25, 4.0, 0.0])
    torch.testing.assert_close(prediction_loss(pred, target), expected, rtol=0, atol=1e-6)


def test_prediction_loss_m2d_standardisation():
    target = torch.tensor([[1.0, 2.0, 3.0]])  # mean 2, unbiased var 1 -> [-1, 0, 1] / sqrt(1 + 1e-6)
    torch.testing.assert_close(standardize_tokens(target), torch.tensor([[-1.0, 0.0, 1.0]]) / math.sqrt(1 + 1e-6))
    # Standardised, the target points along [-1, 0, 1]: prediction [1, 0, 0] has cos -1/sqrt(2).
    got = prediction_loss(torch.tensor([[1.0, 0.0, 0.0]]), target, standardize=True)
    torch.testing.assert_close(got, torch.tensor([2 + math.sqrt(2)]), rtol=0, atol=1e-6)
    # Without standardisation the same pair has cos = 1/sqrt(14).
    got = prediction_loss(torch.tensor([[1.0, 0.0, 0.0]]), target)
    torch.testing.assert_close(got, torch.tensor([2 - 2 / math.sqrt(14)]), rtol=0, atol=1e-6)


def test_prediction_loss_gradient_only_to_prediction():
    pred = torch.randn(2, 3, 8, requires_grad=True)
    target = torch.randn(2, 3, 8, requires_grad=True)
    prediction_loss(pred, target).sum().backward()
    assert pred.grad is not None and target.grad is None


def test_mcl_soft_and_hard_assignment():
    target = torch.tensor([[[1.0, 0.0]]])  # (B=1, M=1, D=2)
    hyps = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], requires_grad=True)  # r = 2: losses 0 and 2
    loss, best = mcl_prediction_loss(hyps, target, temperature=1.0)
    w2 = math.exp(-2) / (1 + math.exp(-2))
    torch.testing.assert_close(loss, torch.tensor([[2 * w2]]), rtol=0, atol=1e-6)
    assert best.tolist() == [[0]]
    loss, _ = mcl_prediction_loss(hyps, target, temperature=1e-4)  # T <= T_min: hard minimum
    torch.testing.assert_close(loss, torch.tensor([[0.0]]), rtol=0, atol=1e-7)
    loss, _ = mcl_prediction_loss(hyps, target, temperature=torch.tensor(0.5))  # tensor T works the same
    w2_half = math.exp(-4) / (1 + math.exp(-4))
    torch.testing.assert_close(loss, torch.tensor([[2 * w2_half]]), rtol=0, atol=1e-6)
    loss, _ = mcl_prediction_loss(hyps, target, temperature=torch.tensor(1e-4))
    torch.testing.assert_close(loss, torch.tensor([[0.0]]), rtol=0, atol=1e-7)
    # The weights are constants: the gradient on hypothesis 2 is w2 times that of its own loss.
    hyps.grad = None
    loss, _ = mcl_prediction_loss(hyps, target, temperature=1.0)
    loss.sum().backward()
    ref = torch.tensor([[0.0, 1.0]], requires_grad=True)
    prediction_loss(ref, target[0, 0]).sum().backward()
    torch.testing.assert_close(hyps.grad[0, 0, 1], w2 * ref.grad[0], rtol=1e-6, atol=1e-7)


def _two_tokens():
    # Token 1: teacher softmax [0.1, 0.2, 0.3, 0.4]; student uniform.
    # Token 2: teacher uniform; student logits/tau_s = [0, 0, 0, ln 5] -> softmax [1/8, 1/8, 1/8, 5/8].
    teacher = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)], [0.0, 0.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5 * math.log(5)]], requires_grad=True)
    return student, teacher


def test_classification_loss_hand_case_prob_centre():
    student, teacher = _two_tokens()
    loss, csum, ent, pmax = centered_softmax_xent_reference(student, teacher, torch.zeros(4), 0.5, 1.0, "prob")
    p1 = [0.1, 0.2, 0.3, 0.4]
    exp_loss = [
        math.log(4),  # student token 1 is uniform: loss = ln 4 whatever the teacher
        -0.25 * (3 * math.log(1 / 8) + math.log(5 / 8)),
    ]
    torch.testing.assert_close(loss, torch.tensor(exp_loss), rtol=0, atol=1e-6)
    torch.testing.assert_close(csum, torch.tensor([0.35, 0.45, 0.55, 0.65]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, torch.tensor([-sum(p * math.log(p) for p in p1), math.log(4)]), rtol=0, atol=1e-6)
    torch.testing.assert_close(pmax, torch.tensor([0.4, 0.25]), rtol=0, atol=1e-6)
    loss.sum().backward()
    # d loss / d student = (softmax(student / tau_s) - p_teacher) / tau_s
    grad1 = (torch.full((4,), 0.25) - torch.tensor(p1)) / 0.5
    torch.testing.assert_close(student.grad[0], grad1, rtol=0, atol=1e-6)


def test_classification_loss_logit_centre_statistic():
    student, teacher = _two_tokens()
    _, csum, _, _ = centered_softmax_xent_reference(student, teacher, torch.zeros(4), 0.5, 1.0, "logit")
    torch.testing.assert_close(csum, torch.tensor([0.0, math.log(2), math.log(3), math.log(4)]), rtol=0, atol=1e-6)


def test_centre_and_sharpening_applied_to_teacher():
    student = torch.zeros(1, 4)
    teacher = torch.zeros(1, 4)
    center = torch.tensor([math.log(2), 0.0, 0.0, 0.0])
    # softmax([-ln 2, 0, 0, 0]) = [1/7, 2/7, 2/7, 2/7]
    _, csum, _, pmax = centered_softmax_xent_reference(student, teacher, center, 0.1, 1.0, "prob")
    torch.testing.assert_close(csum, torch.tensor([1 / 7, 2 / 7, 2 / 7, 2 / 7]), rtol=0, atol=1e-6)
    # tau_t = 0.5 squares the ratios: softmax([-2 ln 2, 0, 0, 0]) = [1/13, 4/13, 4/13, 4/13]
    _, csum, _, _ = centered_softmax_xent_reference(student, teacher, center, 0.1, 0.5, "prob")
    torch.testing.assert_close(csum, torch.tensor([1 / 13, 4 / 13, 4 / 13, 4 / 13]), rtol=0, atol=1e-6)
    # The logit centre statistic ignores the centre (it is the raw teacher logits).
    _, csum, _, _ = centered_softmax_xent_reference(student, teacher, center, 0.1, 0.5, "logit")
    torch.testing.assert_close(csum, torch.zeros(4))


def test_teacher_gets_no_gradient_and_bad_mode_is_an_error():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    loss, *_ = centered_softmax_xent_reference(student, teacher, torch.zeros(4), 0.1, 0.04)
    loss.sum().backward()
    assert teacher.grad is None
    with pytest.raises(ValueError, match="center_mode"):
        centered_softmax_xent_reference(student, teacher, torch.zeros(4), 0.1, 0.04, "mean")
