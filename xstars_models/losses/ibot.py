"""iBOT's masked-token loss (Zhou et al., ICLR 2022, as in DINOv2): the student sees a global
view with some patch tokens replaced by a learnt mask token and must give, at those positions,
the teacher's (centred, sharpened) prototype distribution of the whole view's patch tokens.
DINO's loss only constrains the CLS token; this one asks every patch token to carry what the
teacher sees in that part of the ground, which is the patch-level semantics MSAD then aligns."""

from __future__ import annotations

import torch

from ..errors import InvalidInputError, InvalidOptionError
from .dino import DINOLoss

__all__ = ["MaskedTokenLoss", "check_mask_ratio", "random_patch_mask"]


class MaskedTokenLoss(DINOLoss):
    """``loss = mean over masked images of  mean over its masked tokens n  -sum_k P_t[n, k] log P_s[n, k]``
    with ``P_t = softmax((teacher - c) / tau_t)`` and ``P_s = softmax(student / tau_s)``.

    The centre ``c``, the teacher-temperature warm-up and both distributions are DINO's
    (:class:`DINOLoss`), with their own state: patch tokens have another mean output than the
    CLS token. Each image counts once whatever its number of masked tokens, as in iBOT.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 0,
    ) -> None:
        super().__init__(
            out_dim, n_global=1, student_temp=student_temp, teacher_temp=teacher_temp,
            warmup_teacher_temp=warmup_teacher_temp, warmup_teacher_temp_steps=warmup_teacher_temp_steps,
        )

    def forward(  # type: ignore[override]
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, image_index: torch.Tensor, step: int
    ) -> torch.Tensor:
        """``student_out``, ``teacher_out``: M x K logits of the M masked tokens of a batch
        (student: mask token in the input; teacher: the whole view); ``image_index``: the image
        (0..B-1) each token belongs to. Returns the 0-d loss, then updates the centre."""
        if student_out.shape != teacher_out.shape or image_index.shape != student_out.shape[:1]:
            raise InvalidInputError(
                f"MaskedTokenLoss: student {tuple(student_out.shape)}, teacher {tuple(teacher_out.shape)} and "
                f"image index {tuple(image_index.shape)} must describe the same M masked tokens.",
                field="teacher_out" if student_out.shape != teacher_out.shape else "image_index",
            )
        if not len(student_out):
            raise InvalidInputError("MaskedTokenLoss: no masked token in the batch (a mask ratio of 0?).", field="student_out")
        per_token = -(self.teacher_probs(teacher_out, step) * self.student_log_probs(student_out)).sum(dim=-1)
        images, inverse, counts = image_index.unique(return_inverse=True, return_counts=True)
        per_token = per_token / counts[inverse]
        self._update_center(teacher_out.detach().float())
        return per_token.sum() / len(images)


def random_patch_mask(
    batch: int, tokens: int, ratio: tuple[float, float], generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """B x N booleans: for each image, ``round(r * N)`` (at least 1) patch positions drawn at
    random, ``r`` uniform in ``ratio`` (fractions of the N patch tokens)."""
    check_mask_ratio(ratio)
    low, high = ratio
    counts = (low + (high - low) * torch.rand(batch, generator=generator)).mul(tokens).round().clamp(1, tokens - 1)
    ranks = torch.rand(batch, tokens, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks < counts[:, None]).to(device)


def check_mask_ratio(ratio: tuple[float, float], name: str = "ratio") -> None:
    """Raise :class:`InvalidOptionError` (``field=name``) unless ``ratio`` is (low, high)
    fractions with 0 < low <= high < 1: at least one patch masked, at least one left."""
    if not 0 < ratio[0] <= ratio[1] < 1:
        raise InvalidOptionError(f"{name} must be (low, high) with 0 < low <= high < 1, got {ratio!r}.", field=name)
