"""Hyper-parameters of a training run, saved with every checkpoint and in the model's record:
the run-level settings and one group per part of the recipe (:mod:`.groups`), as DINOv2 nests its
config. Configs written before the settings were grouped (flat names) still load."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .groups import (
    GROUPS,
    AnchorConfig,
    ContrastConfig,
    CropsConfig,
    DINOConfig,
    IBOTConfig,
    MonitorConfig,
    MSADConfig,
    OptimConfig,
    check_setting,
)

__all__ = ["FLAT_NAMES", "TrainConfig", "dotted_settings"]

# The name of every setting before the settings were grouped -> its dotted name now. Old
# config.json files and checkpoints use these names, ``TrainConfig(lr=...)`` still takes them, and
# so do the flags of ``xstars adapt``.
FLAT_NAMES: dict[str, str] = {
    **{name: name for name in ("steps", "batch_size", "seed", "precision", "num_workers", "checkpoint_every", "neighbour_group")},
    "lr": "optim.lr", "min_lr": "optim.min_lr", "warmup_steps": "optim.warmup_steps", "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip", "freeze_last_layer_steps": "optim.freeze_last_layer_steps",
    "dino_out_dim": "dino.out_dim", "dino_bottleneck": "dino.bottleneck", "student_temp": "dino.student_temp",
    "teacher_temp": "dino.teacher_temp", "warmup_teacher_temp": "dino.warmup_teacher_temp",
    "warmup_teacher_temp_steps": "dino.warmup_teacher_temp_steps", "teacher_momentum": "dino.teacher_momentum",
    "koleo_weight": "dino.koleo_weight", "cross_sensor_dino": "dino.cross_sensor",
    "ibot_weight": "ibot.weight", "mask_ratio": "ibot.mask_ratio",
    "alpha": "msad.alpha", "share_msad_view": "msad.share_view",
    "contrast_weight": "contrast.weight", "contrast_temp": "contrast.temperature", "gap_weight": "contrast.gap_weight",
    "global_tokens": "crops.global_tokens", "local_tokens": "crops.local_tokens", "global_crops": "crops.n_global",
    "local_crops": "crops.n_local", "global_scale": "crops.global_scale", "local_scale": "crops.local_scale",
    "native_crops": "crops.native", "color_jitter": "crops.color_jitter", "grey_p": "crops.grey_p",
    "anchor_weight": "anchor.weight", "monitor_every": "monitor.every", "monitor_images": "monitor.images",
}
# ``amp`` (bf16 autocast: None = on CUDA only) was replaced by ``precision``.
_AMP_PRECISION = {None: "auto", True: "bf16", False: "fp32"}


@dataclass(frozen=True, init=False)
class TrainConfig:
    """Settings shared by :func:`~.recipes.pretrain` and :func:`~.recipes.adapt`: the run-level
    ones below and one group per part of the recipe. Each recipe refuses, by name, a setting it
    would ignore (:meth:`check_recipe`).

    Groups (see each class): ``optim`` (:class:`OptimConfig`: learning rate, schedule, clipping),
    ``dino`` (:class:`DINOConfig`: head, temperatures, EMA teacher, KoLeo, the cross-sensor term),
    ``ibot`` (:class:`IBOTConfig`), ``msad`` (:class:`MSADConfig`: its weight ``alpha``),
    ``contrast`` (:class:`ContrastConfig`: InfoNCE, sensor gap), ``crops``
    (:class:`CropsConfig`: multi-crop views, in tokens), ``anchor`` (:class:`AnchorConfig`) and
    ``monitor`` (:class:`MonitorConfig`).

    ``TrainConfig(steps=2000, msad=MSADConfig(alpha=1.0))``; the flat names of the settings
    before they were grouped (:data:`FLAT_NAMES`) are taken too: ``TrainConfig(steps=2000, alpha=1.0)``.

    Attributes:
        steps: optimisation steps in total (not epochs).
        batch_size: pairs per step on each process.
        seed: seeds every random draw of the run: the augmentation, the order of the batches,
            the initial weights of what the run creates (new stem, heads, LoRA) and the steps' draws
            (:mod:`.seeding`; the caller's own random state is left as it was).
        precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` (see :mod:`xstars_models.precision`);
            ``"int8"`` is inference only. The DINO teacher softmax and the MSAD targets are
            computed in fp32 under any precision.
        num_workers: data-loading processes (0: in the training process).
        checkpoint_every: write ``last.pt`` every this many steps (and at the end).
        neighbour_group: 0 for batches drawn at random; ``g`` >= 2 for batches of
            ``batch_size / g`` groups of ``g`` spatially neighbouring windows (a random window and
            its nearest ones), which makes the InfoNCE terms tell a footprint from its shifted
            neighbours. Needs a data set with ``windows`` (e.g. ``GeoPairDataset``).
    """

    steps: int
    batch_size: int
    seed: int
    precision: str
    num_workers: int
    checkpoint_every: int
    neighbour_group: int
    optim: OptimConfig
    dino: DINOConfig
    ibot: IBOTConfig
    msad: MSADConfig
    contrast: ContrastConfig
    crops: CropsConfig
    anchor: AnchorConfig
    monitor: MonitorConfig

    def __init__(
        self, *, steps: int = 1000, batch_size: int = 32, seed: int = 0, precision: str = "auto", num_workers: int = 0,
        checkpoint_every: int = 100, neighbour_group: int = 0, optim: OptimConfig | None = None,
        dino: DINOConfig | None = None, ibot: IBOTConfig | None = None, msad: MSADConfig | None = None,
        contrast: ContrastConfig | None = None, crops: CropsConfig | None = None, anchor: AnchorConfig | None = None,
        monitor: MonitorConfig | None = None, **flat: Any,
    ) -> None:
        run = dict(
            steps=steps, batch_size=batch_size, seed=seed, precision=precision, num_workers=num_workers,
            checkpoint_every=checkpoint_every, neighbour_group=neighbour_group,
        )
        given: dict[str, Any] = dict(
            optim=optim, dino=dino, ibot=ibot, msad=msad, contrast=contrast, crops=crops, anchor=anchor, monitor=monitor
        )
        grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for name, value in flat.items():
            dotted = FLAT_NAMES.get(name, "")
            if "." not in dotted:  # the run-level names are this method's own keywords
                raise ConfigError(
                    f"TrainConfig got an unknown setting {name!r}; it takes the groups {sorted(GROUPS)} and the "
                    f"settings by their flat names {sorted(FLAT_NAMES)}.",
                    field=name,
                )
            group, key = dotted.split(".")
            if given[group] is not None:
                raise ConfigError(
                    f"TrainConfig got both {group}= and {name}= (which sets {dotted}): give it in one place.", field=dotted
                )
            grouped[group][key] = value
        kinds = _kinds()
        for name, value in run.items():
            object.__setattr__(self, name, check_setting(name, kinds[name], value, f"TrainConfig.{name}"))
        for group, cls in GROUPS.items():
            value = given[group] if given[group] is not None else cls(**grouped[group])
            if not isinstance(value, cls):
                raise ConfigError(f"TrainConfig.{group} must be a {cls.__name__}, got {type(value).__name__}.", field=group)
            object.__setattr__(self, group, value)
        self._check_across_groups()

    def _check_across_groups(self) -> None:
        if self.neighbour_group == 1 or (self.neighbour_group and self.batch_size % self.neighbour_group):
            raise ConfigError(
                f"TrainConfig.neighbour_group must be 0 (random batches) or >= 2 and divide batch_size "
                f"({self.batch_size}), got {self.neighbour_group}.",
                field="neighbour_group",
            )
        if self.ibot.weight > 0 and self.crops.n_global < 2:
            raise ConfigError(
                f"TrainConfig.ibot.weight={self.ibot.weight} masks the global views after the first: set "
                f"crops.n_global >= 2 (got {self.crops.n_global}) or ibot.weight=0.",
                field="ibot.weight",
            )
        if self.ibot.weight > 0 and self.crops.global_tokens < 2:
            raise ConfigError(
                f"TrainConfig.ibot.weight={self.ibot.weight} masks some patches of a global view and keeps others: "
                f"set crops.global_tokens >= 2 (got {self.crops.global_tokens}: one patch per view) or ibot.weight=0.",
                field="ibot.weight",
            )
        if self.crops.n_global == 1 and self.crops.n_local == 0:
            raise ConfigError(
                "TrainConfig.crops.n_local=0 with crops.n_global=1: DINO matches each teacher view with the "
                "student's other views, and there would be none. Set crops.n_local >= 1 or crops.n_global >= 2.",
                field="crops.n_local",
            )
        if self.dino.koleo_weight > 0 and self.batch_size < 2:
            raise ConfigError(
                f"TrainConfig.dino.koleo_weight={self.dino.koleo_weight} spreads each view's batch by the distance to "
                f"its nearest neighbour, which needs batch_size >= 2 (got {self.batch_size}); or set "
                "dino.koleo_weight=0.",
                field="dino.koleo_weight",
            )

    def to_dict(self) -> dict[str, Any]:
        """The run-level settings, then one mapping per group (what ``config.json`` and the
        checkpoints hold)."""
        return dataclasses.asdict(self)

    def dotted(self) -> dict[str, Any]:
        """Every setting by its dotted name (``"optim.lr"``; run-level ones by their own name)."""
        return dotted_settings(self.to_dict())

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting's default value, by dotted name."""
        return cls().dotted()

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "TrainConfig", field_sources: Mapping[str, str] | None = None
    ) -> TrainConfig:
        """A config from a mapping as read from JSON: nested by group (what :meth:`to_dict`
        writes), with dotted names (``"optim.lr"``), or with the flat names of configs written
        before the settings were grouped (``"lr"``, :data:`FLAT_NAMES`), in any mix.

        Every value is checked against its setting's type and range (counts and rates >= 0, crop
        scales ``[low, high]`` area fractions...); lists become tuples for the pairs and whole
        numbers become floats for the float settings. Unknown keys are refused, named.

        Args:
            data: setting -> value; settings left out keep their defaults.
            source: where ``data`` came from (e.g. ``"--config train.json"``), named in errors.
            field_sources: for keys (as written in ``data``) whose values came from elsewhere (e.g.
                a command-line flag), what their errors name instead of ``source``; an empty string
                names nothing (the caller names the setting itself).

        Raises:
            ConfigError: with ``field`` the dotted name of the setting at fault.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object (mapping) of TrainConfig settings, got {type(data).__name__}.")
        kinds = _kinds()
        where = dict(field_sources or {})
        values: dict[str, Any] = {}
        unknown = []
        for written, dotted, value in _items(data):
            if dotted in GROUPS:
                raise ConfigError(
                    f"{source}: field {written!r}: expected a JSON object of {dotted} settings, got {value!r}.", field=dotted
                )
            if dotted not in kinds:
                unknown.append(written)
                continue
            if dotted in values:
                raise ConfigError(f"{source}: {dotted} is given twice (as {written!r} and another key).", field=dotted)
            label = where.get(written, f"{source}: field {written!r}")
            values[dotted] = check_setting(dotted, kinds[dotted], value, label)
        if unknown:
            raise ConfigError(
                f"{source}: unknown TrainConfig fields {sorted(unknown)}; known: {sorted(kinds)} "
                "(or their flat names of configs written before the settings were grouped).",
                field=unknown[0] if len(unknown) == 1 else None,
            )
        run: dict[str, Any] = {name: value for name, value in values.items() if "." not in name}
        groups: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for name, value in values.items():
            if "." in name:
                group, key = name.split(".")
                groups[group][key] = value
        return cls(**run, **{group: GROUPS[group](**settings) for group, settings in groups.items()})

    def check_recipe(self, recipe: str, sensors: int) -> None:
        """Refuse a setting that ``recipe`` (``"pretrain"`` or ``"adapt"``) would ignore for a
        model trained on ``sensors`` sensors (adapt: always 2, the old and the new).

        Raises:
            ConfigError: naming the setting (``field``), the recipe and what to do.
        """
        if recipe == "adapt" and self.anchor.weight > 0:
            raise ConfigError(
                "{anchor.weight} is a setting of pretrain (a frozen copy of the starting model); adapt already keeps "
                "the base model frozen for the old sensor, so it would ignore it. Set it to 0.",
                field="anchor.weight", settings={"anchor.weight": self.anchor.weight},
            )
        if recipe != "pretrain":
            return
        if self.dino.cross_sensor:
            raise ConfigError(
                "{dino.cross_sensor} is a setting of adapt (the teacher also sees the old sensor's view of each "
                "footprint); pretrain has no old sensor, so it would ignore it. Turn it off, or use adapt.",
                field="dino.cross_sensor", settings={"dino.cross_sensor": True},
            )
        if sensors > 1:
            return
        default = MSADConfig()
        alone = {  # settings between two sensors, which a one-sensor pretrain never computes, and their off values
            "msad.alpha": (self.msad.alpha not in (0.0, default.alpha), 0.0),
            "msad.share_view": (self.msad.share_view != default.share_view, default.share_view),
            "contrast.gap_weight": (self.contrast.gap_weight > 0, 0.0),
        }
        for name, (set_here, off) in alone.items():
            if set_here:
                raise ConfigError(
                    "{" + name + "} acts between two sensors, and pretrain on a model with one sensor would ignore it. "
                    f"Set it to {off}, or pretrain a model with several sensors.",
                    field=name, settings={name: self.dotted()[name]},
                )
        if self.contrast.weight > 0 and self.crops.n_global < 2:
            raise ConfigError(
                "{contrast.weight} contrasts two global views of a sensor (or two sensors), and with {crops.n_global} "
                "on a model with one sensor pretrain has no pair, so it would ignore it. Set crops.n_global >= 2, or "
                "contrast.weight to 0.",
                field="contrast.weight",
                settings={"contrast.weight": self.contrast.weight, "crops.n_global": self.crops.n_global},
            )


def _kinds() -> dict[str, str]:
    """The annotation of every setting, by dotted name."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig) if f.name not in GROUPS}
    for group, cls in GROUPS.items():
        kinds.update({f"{group}.{f.name}": str(f.type) for f in dataclasses.fields(cls)})
    return kinds


def _items(data: Mapping[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """``(key as written, dotted name, value)`` of every setting in ``data`` (nested, dotted or
    flat); an unknown key's dotted name is the key itself."""
    for key, value in data.items():
        if key in GROUPS and isinstance(value, Mapping):
            for name, inner in value.items():
                yield f"{key}.{name}", f"{key}.{name}", inner
        elif key == "amp" and "precision" not in data and (value is None or isinstance(value, bool)):
            yield key, "precision", _AMP_PRECISION[value]
        else:
            yield key, FLAT_NAMES.get(key, key), value


def dotted_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (as :meth:`TrainConfig.to_dict` writes it, or a config written before the
    settings were grouped) by dotted names, unchecked: unknown keys are kept as they are. What a
    resumed run compares with its checkpoint's settings."""
    return {dotted: value for _, dotted, value in _items(data)}
