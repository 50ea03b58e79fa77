"""Recovery objectives as pure functions of logits and labels (positions labelled -100 are ignored).

- Continued pretraining (large-v3-turbo): token cross-entropy on transcripts.
- Distillation (distil-whisper, Gandhi et al. 2023, eq. 3-4): α_kl · T² · KL(p_teacher^T ‖ p_student^T)
  + α_ce · CE(labels). We use the paper's weights α_kl=0.8, α_ce=1.0 and T=2; the public training script
  has the two α swapped. KL is averaged over labelled tokens; T² keeps its gradient scale independent of T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens; logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       temperature: float = 2.0) -> torch.Tensor:
    """Mean over labelled tokens of KL(softmax(teacher/T) ‖ softmax(student/T)) (not yet scaled by T²)."""
    mask = labels != IGNORE_INDEX
    s = F.log_softmax(student_logits.float()[mask] / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float()[mask] / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() if mask.any() else student_logits.sum() * 0.0


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 2.0, alpha_kl: float = 0.8, alpha_ce: float = 1.0) -> dict[str, torch.Tensor]:
    """Distillation loss and its parts: {'loss', 'kl', 'ce'}."""
    kl = kl_teacher_student(student_logits, teacher_logits, labels, temperature)
    ce = ce_loss(student_logits, labels)
    return {"loss": alpha_kl * temperature ** 2 * kl + alpha_ce * ce, "kl": kl, "ce": ce}


def kd_loss_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 labels: torch.Tensor, temperature: float = 2.0, alpha_kl: float = 0.8,
                 alpha_ce: float = 1.0) -> dict[str, torch.Tensor]:
    """Distillation from cached teacher top-K log-probs (no teacher forward): {'loss', 'kl', 'ce'}.

    Approximation: the KL is taken over the teacher's top-K support only. The teacher's tempered distribution
    restricted to its K ids is renormalized to 1 (log_softmax(logprob / T) over K, which equals
    softmax(logit / T) restricted and renormalized), and so is the student's (log_softmax of its logits / T
    gathered at the same ids). It equals the full-vocabulary KL when both put (nearly) all their tempered mass
    on those K ids; otherwise the teacher's tail is dropped (more of it at higher T) and the student's mass
    outside the support is not penalised by the KL term (CE on the labels still is).
    student_logits [B, T, V]; topk_ids, topk_logprobs [B, T, K] (teacher log-probs at T=1); labels [B, T].
    """
    student_on_support = torch.gather(student_logits, -1, topk_ids.long())  # [B, T, K]
    kl = kl_teacher_student(student_on_support, topk_logprobs, labels, temperature)
    ce = ce_loss(student_logits, labels)
    return {"loss": alpha_kl * temperature ** 2 * kl + alpha_ce * ce, "kl": kl, "ce": ce}


def turbo_lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "linear") -> float:
    """LR multiplier: linear warm-up to the peak, then constant or linear decay to zero at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
