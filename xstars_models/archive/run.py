"""The driver of a collection run: expand the sources into scenes, plan each scene's blocks of
tile strips, run the blocks as tasks (in this process, or on a Dask cluster: a local one it starts
or any existing scheduler), merge each scene's map once its blocks are done (``maps=True``), and
keep the dataset's manifest as parts and maps finish."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import CONFIG_NAME, WEIGHTS_NAME, stem_file_name
from ..errors import MissingExtraError
from ..io import read_json
from ..io.lock import output_lock
from ..model import XStarsBase
from ..scenes.embed import output_tags
from ..scenes.tiles import SceneGrid
from ..scenes.tiling import default_tile
from .manifest import MANIFEST, Manifest, MapRecord, PartRecord
from .maps import RUN_TAG, MapTask, map_path, merge_map, piece_path
from .options import ArchiveOptions
from .parts import part_path
from .sources import SceneRef, StacSearch, expand_sources
from .tasks import BlockTask, ModelRef, embed_block, plan_scene, weights_sha256

__all__ = ["CollectionResult", "embed_collection"]

MODEL_FOLDER = "_model"


@dataclass(frozen=True)
class CollectionResult:
    """What a collection run did.

    Attributes:
        dataset: the dataset folder.
        written: parts this run wrote.
        reused: parts an earlier run had finished (skipped).
        rows: tile rows of the run's sensor in the dataset now.
        failures: the tasks that failed after their retries (key, scene_id, source, error), also in
            ``_failures.json``.
        seconds: wall-clock time of the run.
        maps: scene maps this run merged (``maps=True``).
    """

    dataset: Path
    written: int
    reused: int
    rows: int
    failures: list[dict[str, Any]]
    seconds: float
    maps: int = 0


def embed_collection(
    model: XStarsBase,
    sources: Iterable[str | os.PathLike[str] | StacSearch],
    sensor: str,
    out: str | os.PathLike[str],
    options: ArchiveOptions | None = None,
    *,
    client: Any = None,
    **kwargs: Any,
) -> CollectionResult:
    """Embed every scene ``sources`` name (files, URLs, STAC Items, ItemCollections, Catalogs,
    :class:`~xstars_models.archive.StacSearch` API searches)
    into the GeoParquet dataset folder ``out``: one row per embedded tile, parts under
    ``sensor-<sensor>/``, a ``_manifest.json``, and with ``maps=True`` each scene's feature-map COG
    under ``_maps/sensor-<sensor>/``; see :mod:`xstars_models.archive`.

    Args:
        options: an :class:`ArchiveOptions`; keywords (its fields, or scene options such as
            ``tile`` and ``overlap``) replace its values.
        client: a ``dask.distributed.Client`` to run on (default: ``options.scheduler``, a local
            cluster of ``options.workers``, or this process when that is 1).

    Raises:
        InvalidOptionError: a bad option; settings that differ from the dataset's without
            ``restart`` (``field="restart"``).
        OutputLockedError: another run is writing the dataset.
        InvalidInputError: sources naming no scene, or two scenes with one id.
    """
    started = time.perf_counter()
    options = ArchiveOptions.from_call(options, kwargs)
    model.check_sensor(sensor)
    scenes = expand_sources(sources)
    dataset = Path(out)
    with output_lock(dataset / MANIFEST, field="out"):
        manifest = Manifest(dataset)
        ref, model_info = _model_copy(model, dataset)
        scene_options = options.scene
        settings = {
            **scene_options.settings(),
            "tile_px": scene_options.tile or default_tile(model, sensor),
            "bounds": list(scene_options.bounds) if scene_options.bounds else None,
            "bounds_crs": scene_options.bounds_crs,
            "resample": scene_options.resample,
            "strips_per_task": options.strips_per_task,
        }
        if options.maps:  # absent without maps: datasets written before maps existed keep their settings
            settings["maps"] = {"overviews": scene_options.overviews}
        manifest.check(sensor, model_info, settings, options.restart)
        manifest.save()
        run = _Run(manifest, dataset, ref, sensor, options, settings, model_info, model.check_sensor(sensor).patch_size)
        with _executor(model, ref, options, client) as submit:
            run.drive(scenes, submit)
        manifest.write_failures(run.failures)
        manifest.save()
    rows = sum(p["rows"] for k, p in manifest.data["parts"].items() if k.startswith(f"{sensor}/"))
    return CollectionResult(dataset, run.written, run.reused, rows, run.failures, time.perf_counter() - started,
                            run.maps)


def _model_copy(model: XStarsBase, dataset: Path) -> tuple[ModelRef, dict[str, Any]]:
    """The dataset's copy of ``model`` for workers to load (saved at each run: the same weights
    give the same bytes, so an unchanged model rewrites identical files), and what identifies the
    model in the manifest: the sha256 of every weight file (trunk and stems)."""
    folder = dataset / MODEL_FOLDER
    model.save_pretrained(folder)
    files = read_json(folder / CONFIG_NAME, field="model")["files"]
    ref = ModelRef(str(folder), weights_sha256(folder), model.name_or_path or str(folder), model.revision)
    info = {"id": ref.name, "revision": ref.revision, "sha256": ref.sha256,
            "files": {name: record["sha256"] for name, record in sorted(files.items())}}
    return ref, info


# Seconds between two saves of the manifest while parts finish: rewriting it after every part would
# cost quadratic bytes in the number of parts, and a part the manifest does not list yet is adopted
# by a rerun from its own footer, so a save lost with the driver loses nothing.
SAVE_EVERY_S = 5.0


@dataclass
class _Scene:
    """Where one scene of the run stands: its grid, its blocks not done yet, whether one failed,
    whether its map is done or its merge submitted (``map_done``: nothing more to start for it)."""

    ref: SceneRef
    grid: SceneGrid
    blocks: int
    left: int = 0
    failed: bool = False
    map_done: bool = False


class _Run:
    """The bookkeeping of one run: which tasks are done, failed or pending."""

    def __init__(self, manifest: Manifest, dataset: Path, ref: ModelRef, sensor: str, options: ArchiveOptions,
                 settings: dict[str, Any], model_info: dict[str, Any], patch_px: int) -> None:
        self.manifest, self.dataset, self.ref, self.sensor = manifest, dataset, ref, sensor
        self.options, self.settings, self.model_info, self.patch_px = options, settings, model_info, patch_px
        self.written = self.reused = self.maps = 0
        self.failures: list[dict[str, Any]] = []
        self.scenes: dict[str, _Scene] = {}

    def drive(self, scenes: list[SceneRef], submit: Any) -> None:
        """Plan every scene, run the blocks not done yet and the merges of maps not done yet,
        record each as it ends."""
        bar = tqdm(total=len(scenes), desc=f"embed {self.sensor}", unit="task", disable=not self.options.progress)
        saved = time.monotonic()
        pending: dict[Any, tuple[str, Any]] = {}

        def start(fn: Callable[..., Any], task: Any, kind: str) -> None:
            pending[submit(fn, (task,))] = (kind, task)
            bar.total += 1
            bar.refresh()

        for scene in scenes:
            pending[submit(plan_scene, (self.ref, scene, self.sensor, self.options.scene))] = ("plan", scene)
        while pending:
            finished = submit.wait(list(pending))
            for future in finished:
                kind, what = pending.pop(future)
                bar.update(1)
                error = submit.error(future)
                if error is not None:
                    self._fail(kind, what, error)
                    continue
                if kind == "map":
                    self.manifest.add_map(MapRecord(**future.result()))
                    self.maps += 1
                else:
                    if kind == "plan":
                        for task in self._blocks(what, future.result()):
                            start(embed_block, task, "block")
                        state = self.scenes[what.scene_id]
                    else:
                        self.manifest.add(PartRecord(**future.result()))
                        self.written += 1
                        state = self.scenes[what.scene.scene_id]
                        state.left -= 1
                    merge = self._merge(state)
                    if merge is not None:
                        start(merge_map, merge, "map")
                if time.monotonic() - saved > SAVE_EVERY_S:
                    self.manifest.save()
                    saved = time.monotonic()
        bar.close()

    def _blocks(self, scene: SceneRef, grid: SceneGrid) -> Iterator[BlockTask]:
        """The block tasks of ``scene`` not done yet (a block with maps is done when its part is
        and its map piece is, or the whole map)."""
        per = self.options.strips_per_task
        state = self.scenes[scene.scene_id] = _Scene(scene, grid, math.ceil(grid.strips / per))
        if self.options.maps:
            key = f"{self.sensor}/{scene.scene_id}"
            state.map_done = self.manifest.map_done(key, map_path(self.dataset, self.sensor, scene.scene_id),
                                                    self._run_tag(key)) is not None
            if state.map_done:  # pieces left by a merge that stopped after its rename
                shutil.rmtree(piece_path(self.dataset, self.sensor, scene.scene_id, 0).parent, ignore_errors=True)
        for block, start in enumerate(range(0, grid.strips, per)):
            key = f"{self.sensor}/{scene.scene_id}/{block}"
            # What makes a part this task's: its key, the settings and the weights (a part written by
            # a driver that died before recording it is adopted on these).
            metadata = {"task": key, "settings": self.settings, "model_files": self.model_info["files"]}
            path = part_path(self.dataset, self.sensor, scene.scene_id, block)
            piece = None
            if self.options.maps and not state.map_done:
                piece = piece_path(self.dataset, self.sensor, scene.scene_id, block)
            if self.manifest.done(key, path, metadata) is not None and (piece is None or piece.exists()):
                self.reused += 1
                continue
            state.left += 1
            yield BlockTask(key, scene, self.sensor, block, start, min(start + per, grid.strips), str(self.dataset),
                            self.ref, self.options.scene, {
                                **metadata, "model": self.model_info, "scene_id": scene.scene_id, "sensor": self.sensor,
                                "block": block,
                                "strips": [start, min(start + per, grid.strips)], "source": scene.origin,
                                "datetime": scene.datetime, "package_version": _version(),
                            }, None if piece is None else str(piece))

    def _merge(self, scene: _Scene) -> MapTask | None:
        """The merge of ``scene``'s map, once all its blocks are done (once: it is then marked
        done); ``None`` before, without maps, or when a block failed."""
        if not self.options.maps or scene.map_done or scene.failed or scene.left:
            return None
        scene.map_done = True
        scene_id = scene.ref.scene_id
        key = f"{self.sensor}/{scene_id}"
        parts = self.manifest.data["parts"]
        precisions = {parts[f"{key}/{block}"].get("precision", "") for block in range(scene.blocks)}
        files = self.model_info["files"]
        weights = {"xstars_model_sha256": files[WEIGHTS_NAME]}
        if stem_file_name(self.sensor) in files:
            weights["xstars_stem_sha256"] = files[stem_file_name(self.sensor)]
        tags = output_tags(
            sensor=self.sensor, model=self.ref.name, revision=self.ref.revision, weights=weights,
            patch_px=self.patch_px, tile_px=self.settings["tile_px"], overlap_px=self.options.scene.overlap,
            precision=",".join(sorted(precisions - {""})),  # what ran; several if workers differed
            resample_scale=scene.grid.resample_scale,
        )
        tags.update({"xstars_scene_id": scene_id, RUN_TAG: json.dumps(self._run_tag(key), sort_keys=True)})
        return MapTask(key, str(self.dataset), self.sensor, scene_id, scene.blocks,
                       bool(self.options.scene.overviews), tags)

    def _run_tag(self, key: str) -> Any:
        """What names the run a map belongs to (its :data:`~.maps.RUN_TAG`), as JSON reads it back."""
        return json.loads(json.dumps({"task": key, "settings": self.settings, "model_files": self.model_info["files"]}))

    def _fail(self, kind: str, what: Any, error: BaseException) -> None:
        """Record the failure of a task of ``kind`` ("plan": ``what`` is its scene; "block", "map":
        its task); a scene with a failed block gets no map."""
        if kind == "plan":
            key, scene = f"{self.sensor}/{what.scene_id}", what
        elif kind == "block":
            key, scene = what.key, what.scene
            self.scenes[scene.scene_id].failed = True
        else:
            key, scene = f"{what.key}/map", self.scenes[what.scene_id].ref
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self.failures.append({"key": key, "scene_id": scene.scene_id, "source": scene.origin,
                              "error": f"{type(error).__name__}: {first_line}"})


class _InProcess:
    """Runs each submitted task at once in this process, retrying it up to ``retries`` times;
    what the driver needs of a Dask client (submit, wait, the error of a finished task)."""

    def __init__(self, retries: int) -> None:
        self.retries = retries

    def __call__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        from concurrent.futures import Future

        future: Future = Future()
        for attempt in range(self.retries + 1):
            try:
                future.set_result(fn(*args))
                break
            except Exception as err:  # a task's failure is recorded, the run goes on
                if attempt == self.retries:
                    future.set_exception(err)
        return future

    def wait(self, futures: list[Any]) -> list[Any]:
        return futures

    def error(self, future: Any) -> BaseException | None:
        return future.exception()


class _OnDask:
    """Submits tasks to a Dask client with the run's retries (a task on a worker that dies is
    rescheduled by the scheduler itself)."""

    def __init__(self, client: Any, retries: int) -> None:
        self.client, self.retries = client, retries

    def __call__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.client.submit(fn, *args, retries=self.retries, pure=False)

    def wait(self, futures: list[Any]) -> list[Any]:
        from distributed import wait

        return list(wait(futures, return_when="FIRST_COMPLETED").done)

    def error(self, future: Any) -> BaseException | None:
        return future.exception() if future.status == "error" else None


@contextlib.contextmanager
def _executor(model: XStarsBase, ref: ModelRef, options: ArchiveOptions, client: Any) -> Iterator[Any]:
    if client is None and options.scheduler is None and options.workers == 1:
        from .tasks import _MODELS

        # This process is the worker, and it has the model already.
        _MODELS[(ref.folder, ref.sha256)] = model
        try:
            yield _InProcess(options.retries)
        finally:
            _MODELS.pop((ref.folder, ref.sha256), None)
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise MissingExtraError(
            "Running on several workers needs Dask: pip install 'xstars-models[archive]' (or workers=1)."
        ) from None
    with contextlib.ExitStack() as stack:
        if client is None:
            if options.scheduler is not None:
                client = stack.enter_context(Client(options.scheduler))
            else:
                cluster = stack.enter_context(LocalCluster(
                    n_workers=options.workers, threads_per_worker=options.threads_per_worker, processes=True,
                    dashboard_address=None,
                ))
                client = stack.enter_context(Client(cluster))
        yield _OnDask(client, options.retries)


def _version() -> str:
    from .. import __version__

    return __version__
