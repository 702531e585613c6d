"""DINO self-distillation loss (Caron et al. 2021): cross-entropy between the centred, sharpened
teacher distribution of each global view and the student distribution of every other view."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import is_distributed, world_size
from ..errors import InvalidInputError, InvalidOptionError

__all__ = ["DINOLoss", "entropy"]


class DINOLoss(nn.Module):
    """``loss = mean over (t, s), s != t of  mean_b  -sum_k P_t[b, k] log P_s[b, k]`` with
    ``P_t = softmax((teacher_t - c) / tau_t)`` for the teacher's global views t and
    ``P_s = softmax(student_s / tau_s)`` for every student view s (globals first).

    The centre ``c`` (a buffer) is an EMA of the teacher's batch mean, averaged over ranks when
    distributed; centring and sharpening together keep the teacher from collapsing to one
    prototype (centring alone gives uniform outputs, sharpening alone one-hot ones). ``tau_t``
    warms up linearly over the first steps, then stays constant.

    Args:
        out_dim: prototypes K of the DINO head.
        n_global: global views per image (the teacher sees only these).
        student_temp: tau_s.
        teacher_temp: tau_t after warm-up.
        warmup_teacher_temp: tau_t at step 0.
        warmup_teacher_temp_steps: length of the linear warm-up, in the caller's steps (or epochs).
        center_momentum: EMA momentum of the centre.
        skip_same_view: DINO's rule that a student view is not compared with the teacher's
            output of the same view. ``False`` for a cross-sensor term, where student view ``i``
            and teacher view ``i`` are two sensors' images of one footprint.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 0,
        center_momentum: float = 0.9,
        skip_same_view: bool = True,
    ) -> None:
        super().__init__()
        temperatures = {"student_temp": student_temp, "teacher_temp": teacher_temp, "warmup_teacher_temp": warmup_teacher_temp}
        bad = [name for name, value in temperatures.items() if value <= 0]
        if bad or warmup_teacher_temp_steps < 0:
            raise InvalidOptionError(
                "DINOLoss temperatures must be > 0 and the warm-up length >= 0.",
                field=bad[0] if bad else "warmup_teacher_temp_steps",
            )
        self.n_global, self.student_temp, self.center_momentum = n_global, student_temp, center_momentum
        self.skip_same_view = skip_same_view
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_steps = warmup_teacher_temp_steps
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Entropies (nats) of the last call's teacher distributions: per image (mean) and of the
        # batch-mean distribution; ln K is the ceiling of both.
        self.stats: dict[str, float] = {}

    def teacher_temp_at(self, step: int) -> float:
        """tau_t at ``step``: linear from ``warmup_teacher_temp`` to ``teacher_temp``, then flat."""
        if step >= self.warmup_steps:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / self.warmup_steps

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, step: int) -> torch.Tensor:
        """``student_out``: (V * B) x K logits of V views, view-major, the ``n_global`` global
        views first; ``teacher_out``: (n_global * B) x K logits of the global views. Returns the
        0-d loss and then updates the centre with ``teacher_out``."""
        batch = teacher_out.shape[0] // self.n_global
        if batch == 0 or batch * self.n_global != teacher_out.shape[0] or student_out.shape[0] % batch:
            raise InvalidInputError(
                f"DINOLoss: teacher output {tuple(teacher_out.shape)} is not {self.n_global} global views "
                f"of one batch, or student output {tuple(student_out.shape)} is not whole views of it.",
                field="student_out" if batch and batch * self.n_global == teacher_out.shape[0] else "teacher_out",
            )
        log_p_student = self.student_log_probs(student_out).split(batch)
        p_teacher = self.teacher_probs(teacher_out, step)
        terms = [
            -(p_t * log_p_s).sum(dim=-1).mean()
            for t, p_t in enumerate(p_teacher.split(batch))
            for s, log_p_s in enumerate(log_p_student)
            if s != t or not self.skip_same_view
        ]
        self._update_center(teacher_out.detach().float())
        with torch.no_grad():  # collapse monitors (see xstars_models.training.monitors)
            self.stats = {
                "teacher_entropy": float(entropy(p_teacher).mean()),
                "teacher_marginal_entropy": float(entropy(p_teacher.mean(dim=0))),
            }
        return torch.stack(terms).mean()

    # float32 in both: the teacher's temperature (0.04) would amplify half-precision rounding.
    def student_log_probs(self, student_out: torch.Tensor) -> torch.Tensor:
        """``log softmax(student / tau_s)`` along the last dimension, in float32."""
        return (student_out.float() / self.student_temp).log_softmax(dim=-1)

    def teacher_probs(self, teacher_out: torch.Tensor, step: int) -> torch.Tensor:
        """``softmax((teacher - c) / tau_t)`` at ``step``, in float32, without gradient."""
        return ((teacher_out.float() - self.center) / self.teacher_temp_at(step)).softmax(dim=-1).detach()

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the global batch (all ranks)."""
        batch_sum = teacher_out.sum(dim=0, keepdim=True)
        if is_distributed():
            dist.all_reduce(batch_sum)
        batch_mean = batch_sum / (teacher_out.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of distributions along the last dimension."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
