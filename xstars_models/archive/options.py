"""The options of one collection run (:func:`~xstars_models.archive.embed_collection`): the scene
options every task embeds with (one :class:`~xstars_models.scenes.SceneOptions`, the same object
``embed_scene`` takes), whether feature maps are written too, and how the run is spread and kept:
workers, scheduler, retries, task size, restart. Built and checked once by the driver; the tasks
receive the scene options as they are (frozen and picklable)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidOptionError, InvalidTypeError, UnknownOptionError
from ..scenes import SceneOptions

__all__ = ["ArchiveOptions"]

# Where a Dask scheduler can be reached: tcp://, tls://, ucx://, ws(s)://, inproc:// addresses.
_SCHEDULER = re.compile(r"^(tcp|tls|ucx|ws|wss|inproc)://\S+$")
# Scene options a collection run sets itself: every task writes CLS vectors into its part, runs
# whole (a part is written at once, so there is no partial file to resume) and shows no bar.
_FIXED: dict[str, Any] = {"output": "cls", "resume": False, "progress": False, "overwrite": False}


@dataclass(frozen=True)
class ArchiveOptions:
    """How a collection is embedded.

    Attributes:
        scene: the options each scene is embedded with (tile, overlap, batch size, device,
            precision, max_nodata, resample, whiten, bounds with ``bounds_crs``...; see
            :class:`~xstars_models.scenes.SceneOptions`). ``output``, ``resume``, ``progress`` and
            ``overwrite`` are the run's own (CLS rows into parts) and may not be set.
        maps: also write each scene's feature map, the COG ``embed_scene(output="map")`` writes
            with these options (``overviews`` included), into ``DATASET/_maps/sensor-<sensor>/``
            (:mod:`xstars_models.archive.maps`). Not with ``scene.whiten`` (a map is not whitened).
        workers: Dask worker processes of the local cluster the run starts; 1 runs every task in
            this process, with no cluster. Ignored with ``scheduler`` (the cluster is already
            there).
        threads_per_worker: tasks each local worker runs at once.
        scheduler: address of an existing Dask scheduler (``tcp://host:8786``) to run on instead.
        retries: further attempts of a failed task (a failed read, a worker that died) before the
            task's scene is recorded as failed in ``_failures.json``.
        strips_per_task: rows of tiles per task: a large scene becomes several tasks, so it does
            not hold one worker for hours.
        restart: discard what an earlier run with other settings wrote for this sensor and start
            over; without it such a run is refused, naming the differences.
        progress: show a progress bar over the tasks.
    """

    scene: SceneOptions = field(default_factory=lambda: SceneOptions(**_FIXED))
    maps: bool = False
    workers: int = 1
    threads_per_worker: int = 1
    scheduler: str | None = None
    retries: int = 2
    strips_per_task: int = 32
    restart: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.scene, SceneOptions):
            raise InvalidTypeError(f"scene must be a SceneOptions, got {type(self.scene).__name__}.", field="scene")
        fixed = {k: getattr(self.scene, k) for k in _FIXED if getattr(self.scene, k) != _FIXED[k]}
        if fixed:
            name = sorted(fixed)[0]
            raise InvalidOptionError(
                f"{name}={fixed[name]!r}: a collection run sets {name} itself ({name}={_FIXED[name]!r}: CLS rows "
                "into parts written whole).",
                field=name,
            )
        for name in ("maps", "restart", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidTypeError(f"{name} must be True or False, got {getattr(self, name)!r}.", field=name)
        if self.maps and self.scene.whiten:
            raise InvalidOptionError(
                "{maps} with {whiten}: whiten applies to the CLS rows, and embed_scene writes no whitened map. Run "
                "without maps, or without whiten.",
                field="maps",
                settings={"maps": True, "whiten": True},
            )
        for name, least in (("workers", 1), ("threads_per_worker", 1), ("retries", 0), ("strips_per_task", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InvalidOptionError(
                    f"{{{name}}} must be a whole number >= {least}.", field=name, settings={name: value}
                )
        if self.scheduler is not None and not _SCHEDULER.match(str(self.scheduler)):
            raise InvalidOptionError(
                "{scheduler}: not a Dask scheduler address; expected e.g. tcp://host:8786.",
                field="scheduler",
                settings={"scheduler": self.scheduler},
            )

    @classmethod
    def from_call(cls, options: ArchiveOptions | None, keywords: Mapping[str, Any] | None = None) -> ArchiveOptions:
        """The options of an ``embed_collection`` call: ``options`` (default: all defaults) with
        the keywords replacing its values; keywords that are scene options (``tile``,
        ``overlap``...) replace those of ``options.scene``.

        Raises:
            UnknownOptionError: a keyword that is neither (``field``: that keyword).
            InvalidOptionError: a value (``field``: its name).
        """
        keywords = dict(keywords or {})
        if options is not None and not isinstance(options, cls):
            raise InvalidTypeError(f"options must be an ArchiveOptions, got {type(options).__name__}.", field="options")
        options = options or cls()
        own = {f.name for f in dataclasses.fields(cls)} - {"scene"}
        scene_names = {f.name for f in dataclasses.fields(SceneOptions)}
        unknown = sorted(keywords.keys() - own - scene_names)
        if unknown:
            raise UnknownOptionError(
                f"embed_collection() got an unexpected keyword argument {unknown[0]!r}; its options are "
                f"{', '.join(sorted(own))} and the scene options ({', '.join(sorted(scene_names - set(_FIXED)))}).",
                field=unknown[0],
            )
        scene = {k: v for k, v in keywords.items() if k in scene_names}
        mine = {k: v for k, v in keywords.items() if k in own}
        if scene:
            mine["scene"] = dataclasses.replace(options.scene, **scene)
        return dataclasses.replace(options, **mine) if mine else options
