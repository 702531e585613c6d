"""The dataset's own record of itself: ``_manifest.json`` (the model, the settings each sensor was
embedded with and the precisions that ran for it, every finished part with its sha256, row count
and precision, and every finished map, :mod:`.maps`) and ``_failures.json`` (the tasks that
failed after their retries, with their errors).

Only the driver writes them, atomically, after each finished task, under the dataset's lock
(:func:`xstars_models.io.lock.output_lock` on the manifest). A part is done when the manifest
lists it and the file's sha256 still matches, or (the driver died between a worker's rename and
the manifest's update) when the part's own footer names this task and these settings: a rerun
adopts it. So a rerun redoes only what is missing, and a task that ran twice wrote the same
bytes under the same name: no row is lost or written twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, InvalidOptionError
from ..io import read_json
from ..serialization import atomic_write_bytes, file_record
from .maps import map_record, maps_folder, read_run_tag
from .parts import read_part_metadata, sensor_folder

__all__ = ["FAILURES", "MANIFEST", "Manifest", "MapRecord", "PartRecord"]

MANIFEST = "_manifest.json"
FAILURES = "_failures.json"
FORMAT = "xstars-collection"
VERSION = 1


@dataclass(frozen=True)
class PartRecord:
    """One finished part (a block of one scene's tile rows).

    Attributes:
        key: the task's key, ``sensor/scene_id/block``.
        path: the part file, relative to the dataset folder.
        sha256: of the part's bytes.
        size: bytes.
        rows: tiles written (embedded tiles; tiles skipped for nodata are not rows).
        skipped: tiles of the block left out for nodata.
        precision: what ran (``"fp32"``, ``"bf16"``, ``"int8"``): the requested precision
            (``settings["precision"]``, ``"auto"`` included) as the worker resolved it; empty in
            records written before it was recorded.
    """

    key: str
    path: str
    sha256: str
    size: int
    rows: int
    skipped: int
    precision: str = ""


@dataclass(frozen=True)
class MapRecord:
    """One finished map (:mod:`.maps`).

    Attributes:
        key: ``sensor/scene_id``.
        path: the map file, relative to the dataset folder.
        sha256: of the map's bytes, for checking it (a rerun compares the size only).
        size: bytes.
    """

    key: str
    path: str
    sha256: str
    size: int


class Manifest:
    """``_manifest.json`` of the dataset folder ``dataset`` (empty when there is none yet)."""

    def __init__(self, dataset: Path) -> None:
        self.dataset = dataset
        self.path = dataset / MANIFEST
        self.data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": None, "sensors": {}, "parts": {},
                                     "maps": {}}
        if self.path.exists():
            data = read_json(self.path, error=InvalidInputError, field="out")
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
                raise InvalidInputError(
                    f"{self.path} is not a manifest of this package's collection datasets (format {FORMAT!r}, version "
                    f"{VERSION}); choose another output folder.",
                    field="out",
                )
            self.data = data
            data.setdefault("maps", {})  # manifests written before maps were recorded

    def check(self, sensor: str, model: dict[str, Any], settings: dict[str, Any], restart: bool) -> None:
        """Refuse a run whose model (``model["files"]``: the sha256 of each weight file) or (for
        ``sensor``) settings differ from those the dataset was made with, naming each difference;
        with ``restart``, discard ``sensor``'s parts (another model: the whole dataset's) and
        record the new ones.

        Raises:
            InvalidOptionError: (``field="restart"``) a difference, without ``restart``.
        """
        recorded_model = self.data["model"]
        # The weights identify the model (its id and revision only describe it).
        if recorded_model is not None and recorded_model.get("files") != model.get("files"):
            if not restart:
                raise InvalidOptionError(
                    f"{self.dataset} holds embeddings of model {_describe(recorded_model)}, not {_describe(model)}: one "
                    "dataset holds one model's embeddings (sensors are compared in its space). Choose another output "
                    "folder, or pass {restart} to discard it all.",
                    field="restart",
                    settings={"restart": True},
                )
            for other in list(self.data["sensors"]):
                self._discard(other)
        self.data["model"] = model
        recorded = self.data["sensors"].get(sensor, {}).get("settings")
        if recorded is not None and recorded != settings:
            if not restart:
                diff = "; ".join(
                    f"{k}: {recorded.get(k)!r} then, {settings.get(k)!r} now"
                    for k in sorted(recorded.keys() | settings.keys())
                    if recorded.get(k) != settings.get(k)
                )
                raise InvalidOptionError(
                    f"{self.dataset}: sensor {sensor!r} was embedded with other settings ({diff}). Rerun with the same "
                    "settings to resume, or pass {restart} to discard this sensor's rows and start over.",
                    field="restart",
                    settings={"restart": True},
                )
            self._discard(sensor)
        self.data["sensors"].setdefault(sensor, {})["settings"] = settings

    def _discard(self, sensor: str) -> None:
        shutil.rmtree(sensor_folder(self.dataset, sensor), ignore_errors=True)
        shutil.rmtree(maps_folder(self.dataset, sensor), ignore_errors=True)
        self.data["sensors"].pop(sensor, None)
        for kind in ("parts", "maps"):
            self.data[kind] = {k: v for k, v in self.data[kind].items() if not k.startswith(f"{sensor}/")}

    def done(self, key: str, path: Path, expected_metadata: dict[str, Any]) -> PartRecord | None:
        """The record of task ``key`` when its part at ``path`` is finished (listed with a
        matching sha256, or named by its own footer with these settings: then adopted), else
        ``None``."""
        listed = self.data["parts"].get(key)
        if not path.exists():
            return None
        record = file_record(path)
        if listed is not None and listed["sha256"] == record.sha256:
            return PartRecord(**listed)
        try:
            metadata = read_part_metadata(path)
        except InvalidInputError:
            return None
        if any(metadata.get(k) != v for k, v in expected_metadata.items()):
            return None
        adopted = PartRecord(key, str(path.relative_to(self.dataset)), record.sha256, record.size,
                             int(metadata.get("rows", 0)), int(metadata.get("skipped", 0)),
                             str(metadata.get("precision", "")))
        self.add(adopted)
        return adopted

    def add(self, record: PartRecord) -> None:
        self.data["parts"][record.key] = asdict(record)

    def map_done(self, key: str, path: Path, run_tag: Any) -> MapRecord | None:
        """The record of map ``key`` when its file at ``path`` is finished (listed with the same
        size, or tagged with ``run_tag``: then adopted), else ``None``."""
        if not path.exists():
            return None
        listed = self.data["maps"].get(key)
        if listed is not None and listed["size"] == path.stat().st_size:
            return MapRecord(**listed)
        if read_run_tag(path) != run_tag:
            return None
        adopted = MapRecord(**map_record(key, path, self.dataset))
        self.add_map(adopted)
        return adopted

    def add_map(self, record: MapRecord) -> None:
        self.data["maps"][record.key] = asdict(record)

    def save(self) -> None:
        """Write the manifest, each sensor's ``precision`` (the precisions its parts ran with,
        sorted) brought up to date first."""
        ran: dict[str, set[str]] = {}
        for key, part in self.data["parts"].items():
            if part.get("precision"):
                ran.setdefault(key.split("/", 1)[0], set()).add(part["precision"])
        for sensor, record in self.data["sensors"].items():
            record["precision"] = sorted(ran.get(sensor, ()))
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=1, sort_keys=True) + "\n").encode())

    def write_failures(self, failures: list[dict[str, Any]]) -> None:
        """``_failures.json`` with ``failures`` (each: key, scene_id, source, error), or none."""
        path = self.dataset / FAILURES
        if failures:
            atomic_write_bytes(path, (json.dumps({"failures": failures}, indent=1) + "\n").encode())
        else:
            path.unlink(missing_ok=True)


def _describe(model: dict[str, Any]) -> str:
    return f"{model.get('id')!r} (weights sha256 {str(model.get('sha256'))[:12]}...)"
