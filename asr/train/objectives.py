"""Recovery objectives as pure functions of logits and labels (positions labelled IGNORE_INDEX are ignored).
Logits come as [B, T, V] with labels [B, T], or as the labelled positions alone, [N, V] with labels [N].

- Continued pretraining (large-v3-turbo): token cross-entropy on transcripts.
- Distillation (distil-whisper, Gandhi et al. 2023, eq. 3-4): α_kl · T² · KL(p_teacher^T ‖ p_student^T)
  + α_ce · CE(labels). We use the paper's weights α_kl=0.8, α_ce=1.0 and T=2; the public training script
  has the two α swapped. KL is averaged over labelled tokens; T² keeps its gradient scale independent of T.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from asr.data.features import IGNORE_INDEX


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens; logits [..., V] and labels [...]: [B, T] positions, or the [N]
    labelled positions alone (the training step computes logits only there)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _labelled(mask: torch.Tensor) -> Any:
    """The index of the labelled positions: `...` (a view, no copy) when all are, as in the step's [N, V] logits;
    None when none is. The loss's one host sync, however many tensors it indexes. Index before `.float()`: bf16
    logits of a padded batch are cast at the labelled rows only, not copied whole in fp32."""
    labelled = int(mask.sum())
    return None if labelled == 0 else ... if labelled == mask.numel() else mask


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       temperature: float = 2.0) -> torch.Tensor:
    """Mean over labelled tokens of KL(softmax(teacher/T) ‖ softmax(student/T)) (not yet scaled by T²)."""
    at = _labelled(labels != IGNORE_INDEX)
    if at is None:
        return student_logits.sum() * 0.0
    s = F.log_softmax(student_logits[at].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[at].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 2.0, alpha_kl: float = 0.8, alpha_ce: float = 1.0) -> dict[str, torch.Tensor]:
    """Distillation loss and its parts: {'loss', 'kl', 'ce'}, the parts as `kl_teacher_student` and `ce_loss`
    define them, computed in one pass (`_DistillCE`); only the loss carries a gradient, the parts are for logs."""
    at = _labelled(labels != IGNORE_INDEX)
    if at is None:  # no labelled token: ce is nan (as cross_entropy's mean over none), so the step is skipped
        kl, ce = student_logits.sum() * 0.0, ce_loss(student_logits, labels)
        return {"loss": alpha_kl * temperature ** 2 * kl + alpha_ce * ce, "kl": kl, "ce": ce}
    loss, kl, ce = _DistillCE.apply(student_logits[at], teacher_logits[at].detach(), labels[at], temperature,
                                    alpha_kl, alpha_ce)
    return {"loss": loss, "kl": kl, "ce": ce}


class _DistillCE(torch.autograd.Function):
    """α_kl·T²·KL(teacher^T ‖ student^T) + α_ce·CE over [N, V] logits, and its gradient, row block by row block.

    The loss of a step over cached teacher states is the vocabulary wide part of a small decoder's step: written
    with autograd it walks [N, V] tensors a dozen times (tempered and plain log-softmax, exp, difference, and their
    backward). Here each block of rows is read once into fp32, while it is in cache, and the gradient is kept:
    d/dz = α_kl·T·(softmax(z/T) - p_teacher)/N + α_ce·(softmax(z) - onehot(label))/N. The quickstart's loss took
    0.5 s instead of 1.1 s per step of 400 labelled tokens (one core). Memory is one fp32 [N, V] gradient plus a
    block's temporaries, where the autograd graph kept three fp32 [N, V] log-softmaxes (for large-v3 at 14k labelled
    tokens a step, 2.9 GB each). Blocks: 32 rows on a CPU (they stay in cache), 256 on a GPU (fewer kernel launches)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                alpha_kl: float, alpha_ce: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = logits.shape[0]
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        kl = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce = torch.zeros((), dtype=torch.float32, device=logits.device)
        block = 32 if logits.device.type == "cpu" else 256
        for start in range(0, n, block):
            rows = slice(start, start + block)
            z, y, g = logits[rows].float(), labels[rows], grad[rows]
            t = F.log_softmax(teacher[rows].float() / temperature, dim=-1)
            p_teacher = t.exp()
            s = F.log_softmax(z / temperature, dim=-1)
            kl += (p_teacher * (t - s)).sum()
            torch.sub(s.exp_(), p_teacher, out=g).mul_(alpha_kl * temperature / n)
            plain = F.log_softmax(z, dim=-1)
            picked = plain.gather(-1, y[:, None])
            ce -= picked.sum()
            g.add_(plain.exp_(), alpha=alpha_ce / n)
            g.scatter_add_(-1, y[:, None], torch.full_like(picked, -alpha_ce / n))
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        kl, ce = kl / n, ce / n
        ctx.mark_non_differentiable(kl, ce)
        return alpha_kl * temperature ** 2 * kl + alpha_ce * ce, kl, ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_) -> tuple:
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.dtype), None, None, None, None, None


def kl_topk_and_rest(student_logits: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                     labels: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Mean over labelled tokens of KL(teacher^T ‖ student^T) over K+1 outcomes: each of the teacher's top-K ids,
    and "any other token" (the rest of each distribution's tempered mass); not yet scaled by T².

    `teacher_logprobs` are the teacher's log-probs at this temperature, normalized over the whole vocabulary, so
    the teacher's rest is 1 - Σ exp(teacher_logprobs). Only how each side spreads its rest over the tail is lost.
    """
    at = _labelled(labels != IGNORE_INDEX)
    if at is None:
        return student_logits.sum() * 0.0
    s = F.log_softmax(student_logits[at].float() / temperature, dim=-1)
    ids, t = topk_ids[at].long(), teacher_logprobs[at].float()
    s_top = s.gather(-1, ids)
    kl = (t.exp() * (t - s_top)).sum(-1)
    if ids.shape[-1] < s.shape[-1]:  # a rest outcome exists
        t_rest = (1 - t.exp().sum(-1)).clamp(min=0)
        s_rest = s.scatter(-1, ids, float("-inf")).logsumexp(-1)
        kl = kl + torch.xlogy(t_rest, t_rest) - t_rest * s_rest
    return kl.mean()


def kd_loss_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 labels: torch.Tensor, temperature: float = 2.0, alpha_kl: float = 0.8,
                 alpha_ce: float = 1.0) -> dict[str, torch.Tensor]:
    """Distillation from the cached teacher top-K (no teacher forward): {'loss', 'kl', 'ce'}.

    Approximation: KL over the teacher's K ids plus one "rest" outcome (`kl_topk_and_rest`), with the top-K stored
    at the training temperature. At T=2 Whisper's top 32 tokens hold only ~20% of the tempered mass, so how the
    student spreads the rest is left free, and a student trained this way drifts to where the full KL still has
    large gradients the top-K loss cannot see. For KD equal to the live teacher's, cache the teacher's final
    decoder states instead (`asr pseudo-label --teacher-states`). Measured effect: README "Cached teacher targets".
    student_logits [..., V]; topk_ids, topk_logprobs [..., K] (teacher log-probs at T); labels [...].
    """
    kl = kl_topk_and_rest(student_logits, topk_ids, topk_logprobs, labels, temperature)
    ce = ce_loss(student_logits, labels)
    return {"loss": alpha_kl * temperature ** 2 * kl + alpha_ce * ce, "kl": kl, "ce": ce}


def turbo_lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "linear") -> float:
    """LR multiplier: linear warm-up to the peak, then constant or linear decay to zero at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
