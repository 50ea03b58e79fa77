"""Objectives against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from asr.data.features import IGNORE_INDEX
from asr.train.objectives import (ce_loss, kd_loss, kd_loss_topk, kl_teacher_student,
                                  turbo_lr_factor)


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)  # [1, T, V]


def test_ce_ignores_masked_positions():
    logits = _logits([math.log(1), math.log(3)], [5.0, -5.0])
    labels = torch.tensor([[1, IGNORE_INDEX]])
    assert ce_loss(logits, labels).item() == pytest.approx(-math.log(3 / 4), abs=1e-6)


def test_kl_matches_hand_computation_at_temperature():
    # teacher logits ln(1), ln(3) at T=1 -> p=(1/4, 3/4); student uniform -> q=(1/2, 1/2)
    t = _logits([0.0, math.log(3)])
    s = _logits([0.0, 0.0])
    labels = torch.tensor([[0]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_teacher_student(s, t, labels, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    # at T=2 the teacher logits are halved: p = softmax(0, ln3/2) = (1/(1+√3), √3/(1+√3))
    p1 = 1 / (1 + math.sqrt(3))
    expected_t2 = p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5)
    assert kl_teacher_student(s, t, labels, temperature=2.0).item() == pytest.approx(expected_t2, abs=1e-6)


def test_kl_is_zero_for_identical_distributions_and_direction_is_teacher_first():
    a, b = _logits([2.0, 0.0, -1.0]), _logits([0.0, 1.0, 0.5])
    labels = torch.tensor([[0]])
    assert kl_teacher_student(a, a, labels).item() == pytest.approx(0.0, abs=1e-7)
    pa, pb = torch.softmax(a[0, 0] / 2, -1), torch.softmax(b[0, 0] / 2, -1)
    forward = (pb * (pb / pa).log()).sum().item()  # KL(teacher=b ‖ student=a)
    assert kl_teacher_student(a, b, labels).item() == pytest.approx(forward, abs=1e-6)


def test_kd_loss_combines_parts_with_paper_weights():
    s = _logits([0.0, 0.0], [1.0, 0.0])
    t = _logits([0.0, math.log(3)], [0.0, 0.0])
    labels = torch.tensor([[1, IGNORE_INDEX]])
    out = kd_loss(s, t, labels)  # defaults: T=2, α_kl=0.8, α_ce=1.0
    assert out["ce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["kl"].item() == pytest.approx(kl_teacher_student(s[:, :1], t[:, :1], labels[:, :1]).item(), abs=1e-7)
    assert out["loss"].item() == pytest.approx(0.8 * 4 * out["kl"].item() + math.log(2), abs=1e-6)


def test_kd_gradient_pulls_student_towards_teacher():
    s = _logits([0.0, 0.0, 0.0]).requires_grad_()
    t = _logits([3.0, 0.0, 0.0])
    kd_loss(s, t, torch.tensor([[0]]), alpha_ce=0.0)["loss"].backward()
    assert s.grad[0, 0, 0] < 0 < s.grad[0, 0, 1]  # descent raises the teacher's favourite token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_in_one_pass_equals_its_parts_written_with_autograd(dtype):
    """kd_loss computes the loss and its gradient block by block; both must equal the loss written with autograd
    from kl_teacher_student and ce_loss, over blocks that do not divide the rows, ignored positions, bf16 logits."""
    torch.manual_seed(0)
    student = (torch.randn(3, 31, 500) * 4).to(dtype).requires_grad_()
    teacher = (torch.randn(3, 31, 500) * 4).to(dtype)
    labels = torch.randint(0, 500, (3, 31))
    labels[0, :7] = IGNORE_INDEX
    out = kd_loss(student, teacher, labels, temperature=2.0, alpha_kl=0.8, alpha_ce=1.0)
    out["loss"].backward()
    fused = student.grad.clone()
    student.grad = None
    kl, ce = kl_teacher_student(student, teacher, labels, 2.0), ce_loss(student, labels)
    (0.8 * 4 * kl + ce).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((0.8 * 4 * kl + ce).item(), rel=1e-5)
    assert fused.dtype == dtype and fused[0, :7].abs().max() == 0
    assert torch.allclose(fused.float(), student.grad.float(), atol=tol * fused.float().abs().max().item())
    empty = kd_loss(student, teacher, torch.full((3, 31), IGNORE_INDEX))
    assert math.isnan(empty["loss"].item())  # no labelled token: not finite, so the step is skipped


def test_turbo_schedule_warmup_then_linear_decay():
    f = [turbo_lr_factor(s, warmup_steps=2, total_steps=10) for s in range(11)]
    assert f[:3] == [0.5, 1.0, 1.0]
    assert f[6] == pytest.approx(0.5) and f[10] == 0.0
    assert turbo_lr_factor(7, 2, 10, "constant") == 1.0


def test_kd_loss_topk_matches_hand_computation():
    # Position 0 (labelled 1): the teacher's top 2 are ids (2, 0) with tempered p = 0.6, 0.2, so 0.2 is "the
    # rest". The student's q at ids 2 and 0 is 1/Z each and its rest (ids 1, 3) is (e^7 + e^-2)/Z.
    # Position 1 is masked: its wildly different top-K must not count.
    student = _logits([0.0, 7.0, 0.0, -2.0], [5.0, -5.0, 0.0, 0.0])
    ids = torch.tensor([[[2, 0], [1, 3]]])
    logprobs = torch.tensor([[[math.log(0.6), math.log(0.2)], [math.log(0.9), math.log(0.05)]]])
    labels = torch.tensor([[1, IGNORE_INDEX]])
    z = 2 + math.exp(7) + math.exp(-2)
    kl_t1 = 0.6 * math.log(0.6 * z) + 0.2 * math.log(0.2 * z) + 0.2 * math.log(0.2 * z / (math.exp(7) + math.exp(-2)))
    out = kd_loss_topk(student, ids, logprobs, labels, temperature=1.0, alpha_kl=1.0, alpha_ce=0.0)
    assert out["kl"].item() == pytest.approx(kl_t1, abs=1e-5)
    # T=2: the stored log-probs are the teacher's at T=2; the student's logits are divided by 2
    z2 = 2 + math.exp(3.5) + math.exp(-1)
    kl_t2 = 0.6 * math.log(0.6 * z2) + 0.2 * math.log(0.2 * z2) + 0.2 * math.log(0.2 * z2 / (math.exp(3.5) + math.exp(-1)))
    ce = math.log(z) - 7  # full-vocabulary CE of label 1 at position 0, at T=1
    out = kd_loss_topk(student, ids, logprobs, labels)  # defaults: T=2, α_kl=0.8, α_ce=1.0
    assert out["kl"].item() == pytest.approx(kl_t2, abs=1e-5)
    assert out["ce"].item() == pytest.approx(ce, abs=1e-5)
    assert out["loss"].item() == pytest.approx(0.8 * 4 * kl_t2 + ce, abs=1e-5)


def test_kd_loss_topk_penalises_student_mass_outside_the_support():
    # Same ratios inside the teacher's top 2; the second student moves most of its mass to the tail.
    ids = torch.tensor([[[0, 1]]])
    teacher = torch.log_softmax(torch.tensor([[[3.0, 2.0, 0.0, 0.0]]]), -1)
    labels = torch.tensor([[0]])
    close, far = torch.tensor([[[3.0, 2.0, 0.0, 0.0]]]), torch.tensor([[[3.0, 2.0, 6.0, 6.0]]])
    kl = [kd_loss_topk(s, ids, teacher.gather(-1, ids), labels, temperature=1.0)["kl"].item() for s in (close, far)]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 1.0


def test_kd_loss_topk_with_the_whole_vocabulary_is_kd_loss():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX]])
    logprobs, ids = torch.log_softmax(teacher / 2.0, -1).topk(5, dim=-1)  # stored at the default T=2
    full, cached = kd_loss(student, teacher, labels), kd_loss_topk(student, ids, logprobs, labels)
    for key in ("loss", "kl", "ce"):
        assert cached[key].item() == pytest.approx(full[key].item(), abs=1e-6)
