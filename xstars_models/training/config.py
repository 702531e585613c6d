"""Hyper-parameters of a training run, saved with every checkpoint and in the model's config."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..losses import check_mask_ratio
from ..precision import TRAINING_PRECISIONS

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Settings shared by :func:`pretrain` and :func:`adapt`.

    Crop sizes are given in tokens per side, not pixels: each sensor's crops are
    ``tokens x patch size`` pixels, so the crops of every sensor cover the same ground and have
    the same token grid (8 tokens = 64 px of Sentinel-2 with patch 8 = 640 m).

    Attributes:
        steps: optimisation steps in total (not epochs).
        batch_size: pairs per step on each process.
        lr: peak AdamW learning rate, reached after ``warmup_steps``, cosine-decayed to ``min_lr``.
        alpha: weight of the MSAD loss in ``DINO + alpha * MSAD`` (official default 0.1); 0
            trains DINO only.
        teacher_momentum: EMA momentum of the teacher at step 0, cosine-increased to 1.
        dino_out_dim: prototypes of the DINO head (65536 in DINO; smaller for small data).
        global_crops, local_crops: number of DINO views of each size.
        global_scale, local_scale: area fractions of the random resized crops.
        native_crops: DINO views are crops of exactly their size at random positions, never
            resized (``MultiCropAugment(native=True)``): the scales are unused and training
            images must be at least the global view's size (wider images give views of
            neighbouring ground); the MSAD views are windows of the global size over the same
            ground in every sensor, and the monitor batch central windows. Keeps the GSD of every
            view, so the scale of textures stays a cue (for the default model it sped DINO up
            but did not change land cover: BENCHMARKS.md, session 8).
        checkpoint_every: write ``last.pt`` every this many steps (and at the end).
        grad_clip: maximum gradient norm, or 0 for none.
        freeze_last_layer_steps: DINO's trick of not updating the head's last layer at first.
        precision: ``"auto"`` (bf16 autocast on CUDA and on CPUs with bf16 matrix units, fp32
            elsewhere), ``"bf16"`` or ``"fp32"``; ``"int8"`` is inference only. The DINO teacher
            softmax and the MSAD targets are computed in fp32 under any precision.
        share_msad_view: the un-augmented MSAD view of a sensor is also its first DINO global
            view, so one student forward gives both the DINO output and the MSAD tokens instead
            of a second forward of a global-sized view (MSAD then costs only the frozen
            reference's forward and the projection heads). DINO keeps its other, augmented
            global and local views. ``False`` runs the MSAD view separately, as the official
            code does.
        koleo_weight: weight of DINOv2's KoLeo term on the DINO head's normalised bottleneck of
            the student's global views (spreads the batch; 0.1 in DINOv2).
        contrast_weight: weight of an InfoNCE (temperature ``contrast_temp``): between the DINO
            head bottlenecks of the student's two global views of a sensor in :func:`pretrain`
            (plus one between the sensors' CLS tokens when there are several), between the
            student's new-sensor CLS and the frozen model's old-sensor CLS of the same
            footprint in :func:`adapt`.
        gap_weight: weight of a term between the same two sensors' embeddings as the InfoNCE across
            sensors: the squared distance between the batch means of their L2-normalised CLS
            tokens, plus the same for their mean patch tokens (``losses.sensor_gap``). The
            InfoNCE leaves a constant offset between the sensors, which cross-sensor retrieval
            by cosine pays for.
        neighbour_group: 0 for batches drawn at random; ``g`` >= 2 for batches of
            ``batch_size / g`` groups of ``g`` spatially neighbouring windows (a random window and
            its nearest ones), which makes the InfoNCE terms tell a footprint from its shifted
            neighbours. Needs a data set with ``windows`` (e.g. ``GeoPairDataset``).
        cross_sensor_dino: in :func:`adapt`, the teacher also sees the old sensor's view of each
            footprint and the student's new-sensor view of it must match that distribution (a
            DINO term across sensors, with its own centre), which aligns the global embedding.
        monitor_every: compute the effective rank of the teacher's CLS embeddings of a fixed
            batch every this many steps (collapse monitor, see ``training.monitors``).
        monitor_images: size of that fixed batch (the first items of the data set, un-augmented).
        color_jitter: largest relative change of each DINO view's contrast and of its brightness
            (0.3: +-30 %). Brightness and colour carry much of what tells land covers apart at
            10-30 m, so invariance to them is not free for remote sensing.
        grey_p: probability of turning an RGB view grey.
        anchor_weight: in :func:`pretrain`, weight of a term that keeps every token of each
            sensor's first global view near a frozen copy of the starting model's (1 - cosine
            similarity, averaged over tokens and sensors): continued pretraining (e.g. a joint
            stage after :func:`adapt`) then aligns the sensors while staying near what the
            starting model learnt on data it no longer sees (for the default model, weight 1
            kept the global target but not the stage-1 land cover: BENCHMARKS.md, session 7).
            0 (no frozen copy) by default.
        ibot_weight: weight of iBOT's masked-token loss (``losses.MaskedTokenLoss``; 1 in
            DINOv2): the student's global views after the first have patches replaced by a learnt
            mask token and must give, there, the teacher's prototype distribution of the whole
            view's patch tokens (patch-level self-distillation). 0 (off) by default; needs
            ``global_crops`` >= 2.
        mask_ratio: (low, high) fraction of the patches masked in each such view, drawn uniformly
            per image (DINOv2: 0.1 to 0.5).
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    alpha: float = 0.1
    teacher_momentum: float = 0.996
    dino_out_dim: int = 4096
    dino_bottleneck: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    global_tokens: int = 8
    local_tokens: int = 4
    global_crops: int = 2
    local_crops: int = 4
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    native_crops: bool = False
    checkpoint_every: int = 100
    grad_clip: float = 3.0
    freeze_last_layer_steps: int = 0
    num_workers: int = 0
    seed: int = 0
    precision: str = "auto"
    share_msad_view: bool = True
    koleo_weight: float = 0.0
    contrast_weight: float = 0.0
    contrast_temp: float = 0.1
    gap_weight: float = 0.0
    neighbour_group: int = 0
    cross_sensor_dino: bool = False
    monitor_every: int = 50
    monitor_images: int = 128
    color_jitter: float = 0.3
    grey_p: float = 0.2
    anchor_weight: float = 0.0
    ibot_weight: float = 0.0
    mask_ratio: tuple[float, float] = (0.1, 0.5)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "global_crops", "monitor_every", "monitor_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("alpha", "koleo_weight", "contrast_weight", "gap_weight", "anchor_weight", "ibot_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.neighbour_group == 1 or (self.neighbour_group and self.batch_size % self.neighbour_group):
            raise ValueError(
                f"TrainConfig.neighbour_group must be 0 (random batches) or >= 2 and divide batch_size "
                f"({self.batch_size}), got {self.neighbour_group}."
            )
        if self.contrast_temp <= 0:
            raise ValueError(f"TrainConfig.contrast_temp must be > 0, got {self.contrast_temp}.")
        if self.precision not in TRAINING_PRECISIONS:
            hint = " (int8 is for inference only)" if self.precision == "int8" else ""
            raise ValueError(f"TrainConfig.precision must be one of {TRAINING_PRECISIONS}{hint}, got {self.precision!r}.")
        if not 0 <= self.color_jitter < 1 or not 0 <= self.grey_p <= 1:
            raise ValueError(
                f"TrainConfig.color_jitter must be in [0, 1) and grey_p in [0, 1], got {self.color_jitter}, {self.grey_p}."
            )
        check_mask_ratio(self.mask_ratio, "TrainConfig.mask_ratio")
        if self.ibot_weight > 0 and self.global_crops < 2:
            raise ValueError(
                f"TrainConfig.ibot_weight={self.ibot_weight} masks the global views after the first: set "
                f"global_crops >= 2 (got {self.global_crops}) or ibot_weight=0."
            )
        if not 0 <= self.teacher_momentum <= 1:
            raise ValueError(f"TrainConfig.teacher_momentum must be in [0, 1], got {self.teacher_momentum}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value, by name."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "TrainConfig", field_sources: Mapping[str, str] | None = None
    ) -> TrainConfig:
        """A config from a mapping of field names to values, as read from JSON (or :meth:`to_dict`).

        Every value is checked against its field's type and range (counts and rates >= 0, crop
        scales ``[low, high]`` area fractions); lists become tuples for the tuple fields and
        whole numbers become floats for the float fields. Unknown keys are refused, named.

        Args:
            data: field name -> value; fields left out keep their defaults.
            source: where ``data`` came from (e.g. ``"--config train.json"``), named in errors.
            field_sources: for fields that came from elsewhere (e.g. a command-line flag), what
                their errors name instead of ``source``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object (mapping) of TrainConfig fields, got {type(data).__name__}.")
        defaults = cls.defaults()
        unknown = sorted(set(data) - set(defaults))
        if unknown:
            raise ValueError(f"{source}: unknown TrainConfig fields {unknown}; known: {sorted(defaults)}")
        where = dict(field_sources or {})
        return cls(**{
            name: _checked_field(value, defaults[name], where.get(name, f"{source}: field {name!r}"))
            for name, value in data.items()
        })


def _checked_field(value: Any, default: Any, where: str) -> Any:
    """``value`` for a field whose default is ``default``, or a ValueError naming ``where``.
    Every numeric field is a count, rate, weight or temperature: none is negative."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}.")
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: expected a whole number >= 0, got {value!r}.")
    elif isinstance(default, float):
        if not number(value) or value < 0:
            raise ValueError(f"{where}: expected a finite number >= 0, got {value!r}.")
        value = float(value)
    elif isinstance(default, tuple):
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(number, value))
                and 0 < value[0] <= value[1] <= 1):
            raise ValueError(f"{where}: expected [low, high] area fractions with 0 < low <= high <= 1, got {value!r}.")
        value = (float(value[0]), float(value[1]))
    elif isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}.")
    return value
