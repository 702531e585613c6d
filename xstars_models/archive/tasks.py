"""What runs on a worker: planning a scene (its grid of tile strips) and embedding one block of
strips into one part. Each worker process loads the model once, from the dataset's own copy
(``<dataset>/_model``), and checks its weights' sha256 against the one the driver recorded, so
every task of a run embeds with the same weights whatever machine it lands on.

Every task reads its scene afresh. GDAL keeps what it read of a URL for later opens in the same
process, a short or failed body included, so a task retried on the worker where it failed (Dask
often reschedules it there; the in-process runner always does) would read the same bad bytes
again. Under ``CPL_VSIL_CURL_NON_CACHED`` GDAL neither serves a ``/vsicurl/`` file from that
cache nor keeps it once the file is closed. The cost: a task re-reads the scene's header (a few
requests) rather than taking it from an earlier task's cache."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CONFIG_NAME, WEIGHTS_NAME
from ..errors import ChecksumError
from ..io import import_rasterio, read_json
from ..model import XStarsBase
from ..scenes import SceneOptions
from ..scenes.tiles import SceneGrid, embed_tiles, scene_grid
from .parts import part_path, write_part
from .sources import SceneRef

__all__ = ["BlockTask", "ModelRef", "embed_block", "plan_scene", "weights_sha256", "worker_model"]

# The models this process loaded, by (folder, weights sha256): one load per worker process.
_MODELS: dict[tuple[str, str], Any] = {}
_LOADING = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """The model of a run as workers find it.

    Attributes:
        folder: the dataset's copy of the model (``save_pretrained`` output), on storage every
            worker reads.
        sha256: the sha256 of its ``model.safetensors``, as the driver recorded it.
        name: the model's id, for the parts' metadata.
        revision: its revision, if any.
    """

    folder: str
    sha256: str
    name: str
    revision: str | None


@dataclass(frozen=True)
class BlockTask:
    """One task: strips ``[start, stop)`` of one scene into one part file, and its piece of the
    scene's map into ``map_piece`` when maps are written (and the map is not done yet)."""

    key: str
    scene: SceneRef
    sensor: str
    block: int
    start: int
    stop: int
    dataset: str
    model: ModelRef
    options: SceneOptions
    metadata: dict[str, Any]
    map_piece: str | None = None


def worker_model(ref: ModelRef) -> Any:
    """The run's model in this process, loaded and verified once (its files are checked against
    their recorded sha256 by ``from_pretrained``; the recorded weights against ``ref.sha256``).

    Raises:
        ChecksumError: the dataset's model copy is not the run's model.
    """
    key = (ref.folder, ref.sha256)
    with _LOADING:
        if key not in _MODELS:
            found = weights_sha256(Path(ref.folder))
            if found != ref.sha256:
                raise ChecksumError(
                    f"{ref.folder}: the model copy's weights have sha256 {found}, the run's model {ref.sha256}; "
                    "was the dataset's _model folder replaced during the run?"
                )
            _MODELS[key] = XStarsBase.from_pretrained(ref.folder, local_files_only=True).eval()
        return _MODELS[key]


def weights_sha256(folder: Path) -> str:
    """The sha256 a saved model's ``config.json`` records for its trunk weights
    (``from_pretrained`` checks the file against it)."""
    return str(read_json(folder / CONFIG_NAME, field="model")["files"][WEIGHTS_NAME]["sha256"])


def plan_scene(ref: ModelRef, scene: SceneRef, sensor: str, options: SceneOptions) -> SceneGrid:
    """The scene's grid of tile strips with these options (reads its header only)."""
    with _fresh_reads():
        return scene_grid(worker_model(ref), scene.source, sensor, options)


def embed_block(task: BlockTask) -> dict[str, Any]:
    """Embed ``task``'s strips and write its map piece, if any, then its part (each atomically: a
    task that runs twice writes the same bytes under the same names). Returns the part's record
    fields (see :class:`~.manifest.PartRecord`); the part's metadata also records them, with the
    precision that ran."""
    with _fresh_reads():
        table = embed_tiles(worker_model(task.model), task.scene.source, task.sensor, task.options,
                            strips=range(task.start, task.stop), map_piece=task.map_piece)
    path = part_path(Path(task.dataset), task.sensor, task.scene.scene_id, task.block)
    counts = {"rows": len(table.row), "skipped": int(table.skipped), "precision": table.precision}
    record = write_part(path, table, scene_id=task.scene.scene_id, sensor=task.sensor, datetime=task.scene.datetime,
                        metadata={**task.metadata, **counts})
    return {"key": task.key, "path": str(path.relative_to(task.dataset)), "sha256": record.sha256, "size": record.size,
            **counts}


@contextlib.contextmanager
def _fresh_reads() -> Iterator[None]:
    """GDAL's ``/vsicurl/`` reads in this block neither served from nor kept in its cache (see
    the module's notes); prefixes the user set in ``CPL_VSIL_CURL_NON_CACHED`` stay too."""
    rasterio = import_rasterio()
    own = os.environ.get("CPL_VSIL_CURL_NON_CACHED")
    # GDAL splits the option at ':', so a URL cannot be named; "/vsicurl/" covers them all.
    with rasterio.Env(CPL_VSIL_CURL_NON_CACHED="/vsicurl/" + (f":{own}" if own else "")):
        yield
