"""DINO self-distillation loss (Caron et al. 2021): cross-entropy between the centred, sharpened
teacher distribution of each global view and the student distribution of every other view."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import is_distributed, world_size

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Args:
        out_dim: prototypes K of the DINO head.
        n_global: global views per image (the teacher sees only these).
        student_temp: student softmax temperature.
        teacher_temp: teacher temperature after warm-up.
        warmup_teacher_temp, warmup_teacher_temp_steps: linear warm-up of the teacher
            temperature from this value over this many steps.
        center_momentum: EMA momentum of the centre subtracted from teacher outputs.
    """

    def __init__(
        self,
        out_dim: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 0,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.n_global, self.student_temp, self.center_momentum = n_global, student_temp, center_momentum
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_steps = warmup_teacher_temp_steps
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp_at(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / self.warmup_steps

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, step: int) -> torch.Tensor:
        """``student_out``: (V * B) x K for V views (globals first); ``teacher_out``:
        (n_global * B) x K. Updates the centre after computing the loss."""
        batch = teacher_out.shape[0] // self.n_global
        if batch * self.n_global != teacher_out.shape[0] or student_out.shape[0] % batch:
            raise ValueError(
                f"DINOLoss: teacher output {tuple(teacher_out.shape)} is not {self.n_global} global views "
                f"of one batch, or student output {tuple(student_out.shape)} is not whole views of it."
            )
        student = (student_out.float() / self.student_temp).log_softmax(dim=-1).chunk(student_out.shape[0] // batch)
        teacher = ((teacher_out.float() - self.center) / self.teacher_temp_at(step)).softmax(dim=-1).detach()
        teacher = teacher.chunk(self.n_global)
        terms = [
            -(t * s).sum(dim=-1).mean()
            for ti, t in enumerate(teacher)
            for si, s in enumerate(student)
            if si != ti
        ]
        self._update_center(teacher_out.detach().float())
        return torch.stack(terms).mean()

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.sum(dim=0, keepdim=True)
        if is_distributed():
            dist.all_reduce(batch_center)
        batch_center /= teacher_out.shape[0] * world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
