"""``config.json``: everything needed to rebuild a model from its weight files, and the sha256 of
each of those files so that a folder (local or from the Hub) verifies itself."""

from __future__ import annotations

import difflib
import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer

from .errors import ConfigError, XStarsError
from .io.jsonfile import read_json
from .sensors import SensorSpec

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FileRecord",
    "StemConfig",
    "XStarsConfig",
    "arch_kwargs_problem",
    "parse_file_records",
    "stem_file_name",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WHITENING_NAME = "whitening.safetensors"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# Keywords of timm's VisionTransformer that the encoder sets itself (encoder.build_trunk), and why:
# given again in ``arch_kwargs`` they would clash with its own (a TypeError from inside timm).
SET_BY_MODEL = {
    "in_chans": "the primary sensor's band count",
    "num_classes": "0: the trunk has no classifier",
    "dynamic_img_size": "True: any image size",
    "embed_layer": "the patch embedding that routes each sensor to its stem",
    "device": "the CPU; move the model with .to() or from_pretrained(map_location=...)",
    "dtype": "float32; inference precision is chosen with precision=",
}


def stem_file_name(sensor: str) -> str:
    """File holding the patch embedding of a non-primary sensor."""
    return f"stem-{sensor}.safetensors"


@dataclass(frozen=True)
class StemConfig:
    """A sensor as one model sees it: its spec and the patch size (pixels) of its stem."""

    spec: SensorSpec
    patch_size: int

    @property
    def token_ground_m(self) -> float:
        """Side of the ground square one token covers, in metres."""
        return self.patch_size * self.spec.gsd_m


@dataclass(frozen=True)
class FileRecord:
    """A file's sha256 (hex) and size in bytes."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise ConfigError(f"sha256 must be 64 lowercase hex characters, got {self.sha256!r}.", field="sha256")
        if not isinstance(self.size, int) or self.size < 0:
            raise ConfigError(f"size must be a non-negative integer of bytes, got {self.size!r}.", field="size")

    @classmethod
    def from_dict(cls, data: Any) -> FileRecord:
        """Parse ``{"sha256": ..., "size": ...}`` as ``config.json`` and manifests record a file;
        the error's field is the key at fault."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected {{'sha256': ..., 'size': ...}}, got {data!r}.")
        for key in ("sha256", "size"):
            if key not in data:
                raise ConfigError(f"no {key!r} recorded.", field=key)
        return cls(data["sha256"], data["size"])

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


def arch_kwargs_problem(arch_kwargs: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first key of ``arch_kwargs`` (``timm.create_model`` overrides of a ViT trunk) that
    cannot be given, and why, as ``(key, reason)``; ``None`` when every key can. A key is refused
    when timm's ``VisionTransformer`` takes no such keyword, or when the model sets it itself
    (:data:`SET_BY_MODEL`). Checked before the trunk is built, which would otherwise fail with
    timm's ``TypeError: ... got an unexpected keyword argument``."""
    taken = [name for name in inspect.signature(VisionTransformer.__init__).parameters if name != "self"]
    for key in arch_kwargs:
        if key in SET_BY_MODEL:
            return key, f"{key!r} is set by the model itself ({SET_BY_MODEL[key]}); remove it"
        if key not in taken:
            settable = [name for name in taken if name not in SET_BY_MODEL]
            close = difflib.get_close_matches(key, settable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return key, f"{key!r} is not a setting of timm's VisionTransformer{hint}; it takes {settable}"
    return None


def parse_file_records(files: dict[str, Any], where: str, error: type[XStarsError] = ConfigError) -> dict[str, FileRecord]:
    """The ``files`` object of ``config.json`` or of a manifest entry (file name -> ``{"sha256":
    ..., "size": bytes}``) as records. An invalid record raises ``error`` naming ``where`` and the
    file, with the field ``files.NAME.KEY``."""
    records: dict[str, FileRecord] = {}
    for name, record in files.items():
        try:
            records[name] = FileRecord.from_dict(record)
        except ConfigError as err:
            raise error(f"{where}: file {name!r}: {err}", field=".".join(filter(None, ["files", name, err.field]))) from None
    return records


@dataclass
class XStarsConfig:
    """What ``config.json`` holds.

    Attributes:
        arch: timm model name of the trunk.
        arch_kwargs: keyword overrides for ``timm.create_model``.
        sensors: stem per sensor name; the first is the primary sensor (the trunk's own stem).
        files: sha256 and size of each weight file, by file name.
        lineage: for adapted models, ``base_model`` and ``base_revision``.
        training: free-form summary of how the weights were made (data, steps, time).
        metrics: evaluation results, by name.
        whitening: what the model's global-embedding whitening (``whitening.safetensors``) was fit
            on and its settings (see :class:`~.whitening.GlobalWhitening`); empty when it has none.
    """

    arch: str
    arch_kwargs: dict[str, Any]
    sensors: dict[str, StemConfig]
    files: dict[str, FileRecord] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    whitening: dict[str, Any] = field(default_factory=dict)

    @property
    def primary_sensor(self) -> str:
        return next(iter(self.sensors))

    @property
    def weight_files(self) -> list[str]:
        """Weight files the model is made of: the trunk, one stem file per extra sensor, and the
        global-embedding whitening when the model has one."""
        stems = [stem_file_name(s) for s in list(self.sensors)[1:]]
        return [WEIGHTS_NAME, *stems] + ([WHITENING_NAME] if self.whitening else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library_name": "xstars-models",
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "primary_sensor": self.primary_sensor,
            "sensors": {
                name: {"patch_size": stem.patch_size, "spec": stem.spec.to_dict()}
                for name, stem in self.sensors.items()
            },
            "files": {name: record.to_dict() for name, record in self.files.items()},
            "lineage": self.lineage,
            "training": self.training,
            "metrics": self.metrics,
            "whitening": self.whitening,
            **self.timm_keys(),
        }

    def timm_keys(self) -> dict[str, Any]:
        """The keys ``timm.create_model("hf-hub:org/name" or "local-dir:folder", pretrained=True)``
        reads: the trunk without classifier, built for the primary sensor's bands, and its input
        statistics (mean/std of ``value * scale + offset``). They are derived from the fields
        above on every save and ignored when reading.

        timm 1.0 builds a ``PretrainedCfg`` dataclass from ``pretrained_cfg`` and refuses keys it
        does not define, so the sensor's facts (bands, GSD in metres, dtype, value scale) travel in
        its free-text fields ``description`` and ``notes`` (``key=value`` strings). ``input_size`` is
        the pretraining size: timm's ``create_transform`` resizes every image to it (``crop_pct``
        1.0 only stops the crop), so a chip of another size needs ``input_size`` in the data config.
        """
        primary = self.sensors[self.primary_sensor]
        spec = primary.spec
        height, width = self.pretraining_size()
        return {
            "architecture": self.arch,
            "num_classes": 0,
            "model_args": {**self.arch_kwargs, "in_chans": spec.num_bands, "dynamic_img_size": True},
            "pretrained_cfg": {
                "input_size": [spec.num_bands, height, width],
                "fixed_input_size": False,
                "interpolation": "bicubic",
                "crop_pct": 1.0,
                "crop_mode": "center",
                "mean": list(spec.mean),
                "std": list(spec.std),
                "num_classes": 0,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
                "custom_load": False,
                "paper_ids": ["arXiv:2405.09922", "doi:10.1109/JSTARS.2025.3566457"],
                "description": (
                    f"X-STARS trunk (no classifier) for the sensor {spec.name!r}: {spec.description} "
                    f"Input: (dn * {spec.scale} + {spec.offset} - mean) / std, H and W any multiple of "
                    f"{primary.patch_size} px. {self._timm_transform_fit(spec)}"
                ),
                "notes": self._timm_notes(),
            },
        }

    def pretraining_size(self) -> tuple[int, int]:
        """Height and width in pixels of the image the trunk was built for (its position-embedding
        grid times the primary sensor's patch size)."""
        size = self.arch_kwargs.get("img_size")
        if size is None:
            default = timm.models.get_pretrained_cfg(self.arch)
            size = tuple(default.input_size[1:]) if default is not None else 224
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height, width

    def stem_image_size(self, sensor: str) -> tuple[int, int]:
        """Pixels of ``sensor`` covering the trunk's token grid: the ``img_size`` for which a timm
        ViT with that sensor's patch size has the trunk's position embeddings unresampled."""
        height, width = self.pretraining_size()
        trunk_patch = self.sensors[self.primary_sensor].patch_size
        patch = self.sensors[sensor].patch_size
        return height // trunk_patch * patch, width // trunk_patch * patch

    @staticmethod
    def _timm_transform_fit(spec: SensorSpec) -> str:
        # timm's eval transform is PIL -> ToTensor (dn / 255) -> Normalize(mean, std).
        if spec.dtype == "uint8" and abs(spec.scale * 255.0 - 1.0) < 1e-12 and spec.offset == 0.0:
            return "timm.data.create_transform computes exactly this from 8-bit images of input_size."
        return f"timm.data.create_transform does not: it divides by 255; scale the {spec.dtype} numbers yourself."

    def _timm_notes(self) -> list[str]:
        """The primary sensor's facts as ``key=value`` strings, then one line per other sensor
        naming its stem file and the timm arguments that build a trunk for it (README, "timm")."""
        name, primary = next(iter(self.sensors.items()))
        spec = primary.spec
        notes = [
            f"sensor={name}",
            f"bands={','.join(spec.band_names)}",
            f"band_aliases={','.join(band.alias or band.name for band in spec.bands)}",
            f"gsd_m={spec.gsd_m}",
            f"dtype={spec.dtype}",
            f"value_scale={spec.scale}",
            f"value_offset={spec.offset}",
            f"units={spec.units or 'unspecified'}",
            f"patch_size={primary.patch_size}",
        ]
        for other, stem in list(self.sensors.items())[1:]:
            height, width = self.stem_image_size(other)
            size = height if height == width else (height, width)
            notes.append(
                f"stem_{other}={stem_file_name(other)} patch_size={stem.patch_size} img_size={size} "
                f"in_chans={stem.spec.num_bands} gsd_m={stem.spec.gsd_m} (its bands, mean and std: 'sensors' in config.json)"
            )
        return notes

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> XStarsConfig:
        """Parse and validate; errors (:class:`~.errors.ConfigError`) name ``source`` and carry
        the dotted key at fault (``"sensors.aerial.patch_size"``)."""

        def fail(message: str, field: str | None) -> ConfigError:
            return ConfigError(f"{source}: {message}", field=field)

        if not isinstance(data, dict):
            raise fail(f"expected a JSON object, got {type(data).__name__}.", None)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise fail(
                f"format_version {version!r} is not supported (this xstars-models reads "
                f"{FORMAT_VERSION}); upgrade the package or re-save the model.",
                "format_version",
            )
        for key, kind in (("arch", str), ("arch_kwargs", dict), ("sensors", dict), ("files", dict)):
            if not isinstance(data.get(key), kind):
                raise fail(f"field {key!r} must be a {kind.__name__}, got {data.get(key)!r}.", key)
        problem = arch_kwargs_problem(data["arch_kwargs"])
        if problem is not None:
            raise fail(f"field 'arch_kwargs.{problem[0]}': {problem[1]}.", f"arch_kwargs.{problem[0]}")
        if not data["sensors"]:
            raise fail("'sensors' is empty.", "sensors")
        sensors: dict[str, StemConfig] = {}
        for name, entry in data["sensors"].items():
            if not isinstance(entry, dict) or not {"spec", "patch_size"} <= set(entry):
                raise fail(f"sensor {name!r}: expected {{'spec': ..., 'patch_size': ...}}, got {entry!r}.", f"sensors.{name}")
            try:
                spec = SensorSpec.from_dict(entry["spec"])
            except (KeyError, TypeError, ValueError) as err:
                inner = getattr(err, "field", None)  # a typed error of the spec names its own key
                raise fail(f"sensor {name!r}: {err}", f"sensors.{name}.spec" + (f".{inner}" if inner else "")) from None
            patch = entry["patch_size"]
            if not isinstance(patch, int) or patch < 1:
                raise fail(
                    f"sensor {name!r}: patch_size must be a positive integer, got {patch!r}.", f"sensors.{name}.patch_size"
                )
            sensors[name] = StemConfig(spec, patch)
        if data.get("primary_sensor", next(iter(sensors))) != next(iter(sensors)):
            raise fail(
                f"primary_sensor {data.get('primary_sensor')!r} must be the first of 'sensors' {list(sensors)}.",
                "primary_sensor",
            )
        if not isinstance(data.get("whitening", {}), dict):
            raise fail(f"field 'whitening' must be a dict, got {data['whitening']!r}.", "whitening")
        files = parse_file_records(data["files"], source)
        config = cls(
            arch=data["arch"],
            arch_kwargs=data["arch_kwargs"],
            sensors=sensors,
            files=files,
            lineage=dict(data.get("lineage") or {}),
            training=dict(data.get("training") or {}),
            metrics=dict(data.get("metrics") or {}),
            whitening=dict(data.get("whitening") or {}),
        )
        missing = [f for f in config.weight_files if f not in files]
        if missing:
            raise fail(f"no sha256 recorded for weight files {missing}.", "files")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> XStarsConfig:
        """Read and validate a ``config.json``; errors name the file."""
        return cls.from_dict(read_json(path), source=str(path))
