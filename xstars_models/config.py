"""``config.json``: everything needed to rebuild a model from its weight files, and the sha256 of
each of those files so that a folder (local or from the Hub) verifies itself."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm

from .sensors import SensorSpec

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FileRecord", "StemConfig", "XStarsConfig", "stem_file_name"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WHITENING_NAME = "whitening.safetensors"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
            raise ValueError(f"sha256 must be 64 lowercase hex characters, got {self.sha256!r}.")
        if not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"size must be a non-negative integer of bytes, got {self.size!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


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
        above on every save and ignored when reading."""
        spec = self.sensors[self.primary_sensor].spec
        size = self.arch_kwargs.get("img_size")
        if size is None:
            default = timm.models.get_pretrained_cfg(self.arch)
            size = tuple(default.input_size[1:]) if default is not None else 224
        height, width = (size, size) if isinstance(size, int) else tuple(size)
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
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> XStarsConfig:
        """Parse and validate; errors name ``source`` and the field at fault."""

        def fail(message: str) -> ValueError:
            return ValueError(f"{source}: {message}")

        if not isinstance(data, dict):
            raise fail(f"expected a JSON object, got {type(data).__name__}.")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise fail(
                f"format_version {version!r} is not supported (this xstars-models reads "
                f"{FORMAT_VERSION}); upgrade the package or re-save the model."
            )
        for key, kind in (("arch", str), ("arch_kwargs", dict), ("sensors", dict), ("files", dict)):
            if not isinstance(data.get(key), kind):
                raise fail(f"field {key!r} must be a {kind.__name__}, got {data.get(key)!r}.")
        if not data["sensors"]:
            raise fail("'sensors' is empty.")
        sensors: dict[str, StemConfig] = {}
        for name, entry in data["sensors"].items():
            try:
                spec = SensorSpec.from_dict(entry["spec"])
                patch = entry["patch_size"]
            except (KeyError, TypeError, ValueError) as err:
                raise fail(f"sensor {name!r}: {err}") from None
            if not isinstance(patch, int) or patch < 1:
                raise fail(f"sensor {name!r}: patch_size must be a positive integer, got {patch!r}.")
            sensors[name] = StemConfig(spec, patch)
        if data.get("primary_sensor", next(iter(sensors))) != next(iter(sensors)):
            raise fail(
                f"primary_sensor {data.get('primary_sensor')!r} must be the first of 'sensors' "
                f"{list(sensors)}."
            )
        if not isinstance(data.get("whitening", {}), dict):
            raise fail(f"field 'whitening' must be a dict, got {data['whitening']!r}.")
        files: dict[str, FileRecord] = {}
        for name, record in data["files"].items():
            try:
                files[name] = FileRecord(record["sha256"], record["size"])
            except (KeyError, TypeError, ValueError) as err:
                raise fail(f"files[{name!r}]: {err}") from None
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
            raise fail(f"no sha256 recorded for weight files {missing}.")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> XStarsConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from None
        return cls.from_dict(data, source=str(path))
