"""The groups of a :class:`~.config.TrainConfig` (as DINOv2 groups its config): one small frozen
dataclass per part of the recipe, each checking its own values, and the check of one setting
shared by the groups, the run-level settings and :meth:`~.config.TrainConfig.from_dict`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from ..precision import TRAINING_PRECISIONS

__all__ = [
    "AnchorConfig", "ContrastConfig", "CropsConfig", "DINOConfig", "GROUPS", "IBOTConfig", "MSADConfig", "MonitorConfig",
    "OptimConfig", "check_setting",
]

# No number may be negative (each is a count, rate, weight, temperature or fraction); these
# settings have a narrower range: (holds, what it must be).
_AT_LEAST_ONE = (lambda v: v >= 1, "a whole number >= 1")
_RANGES = {
    **dict.fromkeys(
        (
            "steps", "batch_size", "checkpoint_every", "crops.n_global", "monitor.every", "monitor.images",
            # sizes: a head of 0 prototypes or a 0-wide bottleneck, a crop of 0 tokens
            "dino.out_dim", "dino.bottleneck", "crops.global_tokens", "crops.local_tokens",
        ),
        _AT_LEAST_ONE,
    ),
    "dino.student_temp": (lambda v: v > 0, "a number > 0"),
    "dino.teacher_temp": (lambda v: v > 0, "a number > 0"),
    "dino.warmup_teacher_temp": (lambda v: v > 0, "a number > 0"),
    "dino.teacher_momentum": (lambda v: v <= 1, "a number in [0, 1]"),
    "contrast.temperature": (lambda v: v > 0, "a number > 0"),
    "crops.color_jitter": (lambda v: v < 1, "a number in [0, 1)"),
    "crops.grey_p": (lambda v: v <= 1, "a probability in [0, 1]"),
}
# The (low, high) settings and what their bounds are: only the crop scales are area fractions.
_PAIRS = {
    "crops.global_scale": (True, "[low, high] area fractions with 0 < low <= high <= 1"),
    "crops.local_scale": (True, "[low, high] area fractions with 0 < low <= high <= 1"),
    # At least one patch masked and one left.
    "ibot.mask_ratio": (False, "[low, high] fractions of the patches with 0 < low <= high < 1"),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_setting(name: str, kind: str, value: Any, where: str) -> Any:
    """``value`` for the setting ``name`` (dotted, e.g. ``"optim.lr"``) whose annotation is
    ``kind``, normalised as JSON would not give it (whole numbers as floats for the float
    settings, lists as tuples for the pairs), or a :class:`ConfigError` that starts with ``where``
    (left out when empty) and carries ``field=name``."""

    def refuse(expected: str, note: str = "") -> ConfigError:
        prefix = f"{where}: " if where else ""
        return ConfigError(f"{prefix}expected {expected}, got {value!r}{note}.", field=name)

    if kind == "bool":
        if not isinstance(value, bool):
            raise refuse("true or false")
    elif kind == "str":
        if not isinstance(value, str):
            raise refuse("a string")
        if name == "precision" and value not in TRAINING_PRECISIONS:
            raise refuse(f"one of {TRAINING_PRECISIONS}", " (int8 is for inference only)" if value == "int8" else "")
    elif kind.startswith("tuple"):
        upper_inclusive, expected = _PAIRS[name]
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_number, value))
                and 0 < value[0] <= value[1] and (value[1] <= 1 if upper_inclusive else value[1] < 1)):
            raise refuse(expected)
        value = (float(value[0]), float(value[1]))
    elif kind == "int":
        # A negative count of a setting with a narrower range is refused below with that range.
        if not isinstance(value, int) or isinstance(value, bool) or (value < 0 and name not in _RANGES):
            raise refuse("a whole number >= 0")
    else:  # float
        if not _number(value) or value < 0:
            raise refuse("a finite number >= 0")
        value = float(value)
    if name in _RANGES and not _RANGES[name][0](value):
        raise refuse(_RANGES[name][1])
    return value


class _Group:
    """Checks and normalises every field of a group when it is made (``prefix``: the group's
    name in a TrainConfig)."""

    prefix: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # each group is a dataclass
            name = f"{self.prefix}.{f.name}"
            value = check_setting(name, str(f.type), getattr(self, f.name), f"TrainConfig.{name}")
            object.__setattr__(self, f.name, value)


@dataclass(frozen=True)
class OptimConfig(_Group):
    """AdamW and its schedules, in optimisation steps.

    Attributes:
        lr: peak learning rate, reached linearly after ``warmup_steps``, then cosine-decayed to
            ``min_lr`` at the last step.
        min_lr: learning rate at the last step.
        warmup_steps: steps of the linear warm-up from 0 to ``lr``.
        weight_decay: AdamW's decoupled weight decay of the weight matrices (biases, norms, tokens
            and temperatures are not decayed).
        grad_clip: largest L2 norm of all gradients together, or 0 for no clipping.
        freeze_last_layer_steps: steps during which the DINO head's last layer is not updated
            (DINO's trick against an early collapse).
    """

    prefix: ClassVar[str] = "optim"
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    grad_clip: float = 3.0
    freeze_last_layer_steps: int = 0


@dataclass(frozen=True)
class DINOConfig(_Group):
    """DINO's self-distillation: the head, the temperatures, the EMA teacher and KoLeo.

    Attributes:
        out_dim: prototypes K of the DINO head (65536 in DINO; smaller for small data).
        bottleneck: width of the head's L2-normalised bottleneck.
        student_temp: temperature of the student's softmax.
        teacher_temp: temperature of the teacher's softmax after its warm-up.
        warmup_teacher_temp: the teacher's temperature at step 0.
        warmup_teacher_temp_steps: steps of the linear warm-up of the teacher's temperature.
        teacher_momentum: EMA momentum of the teacher at step 0, cosine-increased to 1 at the last
            step.
        koleo_weight: weight of DINOv2's KoLeo term on the head's normalised bottleneck of the
            student's global views (spreads the batch; 0.1 in DINOv2).
        cross_sensor: :func:`~.recipes.adapt` only: the teacher also sees the old sensor's view of
            each footprint and the student's new-sensor view of it must match that distribution
            (a DINO term across sensors, with its own centre), which aligns the global embedding.
    """

    prefix: ClassVar[str] = "dino"
    out_dim: int = 4096
    bottleneck: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    teacher_momentum: float = 0.996
    koleo_weight: float = 0.0
    cross_sensor: bool = False


@dataclass(frozen=True)
class IBOTConfig(_Group):
    """iBOT's masked-token loss (``losses.MaskedTokenLoss``): the student's global views after
    the first have patches replaced by a learnt mask token and must give, there, the teacher's
    prototype distribution of the whole view's patch tokens (patch-level self-distillation).

    Attributes:
        weight: weight of the term (1 in DINOv2); 0 (off) by default; needs ``crops.n_global`` >= 2.
        mask_ratio: (low, high) fraction of the patches masked in each such view, drawn uniformly
            per image (DINOv2: 0.1 to 0.5).
    """

    prefix: ClassVar[str] = "ibot"
    weight: float = 0.0
    mask_ratio: tuple[float, float] = (0.1, 0.5)


@dataclass(frozen=True)
class MSADConfig(_Group):
    """MSAD, the dense alignment of two sensors' tokens (``docs/method.md``).

    Attributes:
        alpha: weight of the MSAD loss in ``DINO + alpha * MSAD`` (official default 0.1); 0
            trains DINO only.
        share_view: the un-augmented MSAD view of a sensor is also its first DINO global view, so
            one student forward gives both the DINO output and the MSAD tokens (MSAD then costs
            only the frozen reference's forward and the projection heads). ``False`` runs the
            MSAD view separately, as the official code does.
    """

    prefix: ClassVar[str] = "msad"
    alpha: float = 0.1
    share_view: bool = True


@dataclass(frozen=True)
class ContrastConfig(_Group):
    """InfoNCE terms and the gap between two sensors' embeddings.

    Attributes:
        weight: weight of an InfoNCE: between the DINO head bottlenecks of the student's two
            global views of a sensor in :func:`~.recipes.pretrain` (plus one between the sensors'
            CLS tokens when there are several), between the student's new-sensor CLS and the
            frozen model's old-sensor CLS of the same footprint in :func:`~.recipes.adapt`.
        temperature: of that InfoNCE (its logits are cosine similarities divided by it).
        gap_weight: weight of the squared distance between the batch means of the two sensors'
            L2-normalised CLS tokens, plus the same for their mean patch tokens
            (``losses.sensor_gap``), between the sensors of the InfoNCE across sensors. The
            InfoNCE leaves a constant offset between the sensors, which retrieval by cosine pays for.
    """

    prefix: ClassVar[str] = "contrast"
    weight: float = 0.0
    temperature: float = 0.1
    gap_weight: float = 0.0


@dataclass(frozen=True)
class CropsConfig(_Group):
    """DINO's multi-crop views and their photometric augmentation.

    Crop sizes are in tokens per side, not pixels: each sensor's crops are ``tokens x patch size``
    pixels, so the crops of every sensor cover the same ground and have the same token grid (8
    tokens = 64 px of Sentinel-2 with patch 8 = 640 m).

    Attributes:
        global_tokens: side of the global views (and of the MSAD views), in tokens.
        local_tokens: side of the local views, in tokens.
        n_global: global views per image (the teacher sees only these).
        n_local: local views per image.
        global_scale: (low, high) area fraction of the image that a global view's random resized
            crop covers.
        local_scale: the same for the local views.
        native: views are crops of exactly their size at random positions, never resized
            (``MultiCropAugment(native=True)``): the scales are unused and training images must
            be at least the global view's size; the MSAD views are windows of the global size over
            the same ground in every sensor, and the monitor batch central windows. Keeps the GSD
            of every view, so the scale of textures stays a cue.
        color_jitter: largest relative change of each view's contrast and of its brightness
            (0.3: +-30 %). Brightness and colour carry much of what tells land covers apart at
            10-30 m, so invariance to them is not free for remote sensing.
        grey_p: probability of turning an RGB view grey.
    """

    prefix: ClassVar[str] = "crops"
    global_tokens: int = 8
    local_tokens: int = 4
    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    native: bool = False
    color_jitter: float = 0.3
    grey_p: float = 0.2


@dataclass(frozen=True)
class AnchorConfig(_Group):
    """:func:`~.recipes.pretrain` only: a frozen copy of the starting model that each sensor's
    tokens stay near, for continued pretraining (e.g. a joint stage after :func:`~.recipes.adapt`)
    that aligns the sensors while keeping what the starting model learnt on data it no longer sees.

    Attributes:
        weight: weight of ``1 - cosine similarity`` between every token of each sensor's first
            global view and the frozen copy's, averaged over tokens and sensors; 0 (no frozen
            copy) by default.
    """

    prefix: ClassVar[str] = "anchor"
    weight: float = 0.0


@dataclass(frozen=True)
class MonitorConfig(_Group):
    """The effective-rank collapse monitor (``training.monitors``).

    Attributes:
        every: compute the effective rank of the teacher's CLS embeddings of a fixed batch every
            this many steps (and at the first and last).
        images: size of that fixed batch (the first items of the data set, un-augmented).
    """

    prefix: ClassVar[str] = "monitor"
    every: int = 50
    images: int = 128


# Group name -> class (typed loosely: each class takes its own keywords).
GROUPS: dict[str, Any] = {
    cls.prefix: cls
    for cls in (OptimConfig, DINOConfig, IBOTConfig, MSADConfig, ContrastConfig, CropsConfig, AnchorConfig, MonitorConfig)
}
