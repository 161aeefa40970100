"""Distillation objective: KL(teacher ‖ student) on next-token distributions, optionally mixed with cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Objective:
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, parts) for logits (batch, seq, vocab); KL averaged over every position, CE over next tokens."""
        loss = student_logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        if self.kl_weight:
            kl = kl_divergence(student_logits, teacher_logits, self.temperature)
            loss = loss + self.kl_weight * kl
            parts["kl"] = float(kl.detach())
        if self.ce_weight:
            ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
            loss = loss + self.ce_weight * ce
            parts["ce"] = float(ce.detach())
        return loss, parts

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight != 0


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(p_teacher ‖ p_student) at `temperature`, scaled by T² (Hinton et al.)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
