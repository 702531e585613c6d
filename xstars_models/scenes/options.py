"""The settings of one scene job: :class:`SceneOptions`, built and checked once, then passed as one
object through the API, the ``xstars embed-scene`` command and the strip runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..devices import check_device
from ..errors import InvalidOptionError, InvalidTypeError, UnknownOptionError
from ..precision import PRECISIONS

if TYPE_CHECKING:
    from affine import Affine

__all__ = ["LEGACY_POSITIONAL", "SCENE_OUTPUTS", "SceneOptions"]

SCENE_OUTPUTS = ("map", "cls")

# The options ``embed_scene`` took positionally after ``out`` before there was a SceneOptions, in
# that order: calls that still pass them so keep working.
LEGACY_POSITIONAL = ("tile", "overlap", "output", "batch_size", "device", "resample", "max_nodata", "progress", "resume")


@dataclass(frozen=True)
class SceneOptions:
    """How to embed a scene: everything :func:`~xstars_models.scenes.embed_scene` takes besides the
    model, the source, the sensor and the output path. Checked when built (``InvalidOptionError``
    naming the option in ``field``); checks that need the sensor (``tile`` and ``overlap`` whole
    numbers of its patch size) are made when the scene is tiled. Immutable and picklable, so one
    object can be sent to many workers.

    Attributes:
        tile: tile side in pixels at the sensor's GSD, a multiple of the sensor's patch size.
            ``None``: :func:`~xstars_models.scenes.default_tile` (the trunk's pretraining token grid).
        overlap: overlap between neighbouring tiles in pixels at the sensor's GSD, a multiple of
            the patch size, smaller than ``tile``. Tiles start every ``tile - overlap`` pixels;
            the last along each axis is shifted inward to end at the scene's edge, so it may
            overlap its neighbour by more than ``overlap`` (with ``overlap=0`` too).
        output: ``"map"``: a float32 Cloud-Optimised GeoTIFF (DEFLATE, 128 x 128 tiles, all
            features of a token together), one band per feature dimension (described
            ``emb_000``, ``emb_001``...) and one pixel per token (``patch_size`` sensor pixels),
            same CRS, transform = the scene's transform at the sensor's GSD scaled by the patch
            size, NaN as nodata; its tags record the model (id, revision, weights sha256), the
            sensor and the tiling (:mod:`xstars_models.scenes.writers`). ``"cls"``: GeoParquet,
            one row per tile: ``tile`` index, ``row``/``col`` in the tiling, ``valid``,
            ``nodata_fraction``, ``window`` (int32 row, col, height, width in input pixels),
            ``embedding`` (the CLS vector, a fixed-size list of float32), ``geometry`` (the
            footprint polygon in the scene's CRS) and ``bbox`` (its GeoParquet 1.1 covering); the
            file's ``xstars`` metadata records the same as the map's tags
            (:mod:`xstars_models.scenes.geoparquet`).
        batch_size: tiles per forward pass.
        device: where to compute (the model is moved there): ``"cpu"``, ``"cuda[:N]"``, ``"mps"``
            or ``"auto"`` (the GPU when the computing process has one: on a cluster, each
            worker's); ``None``: where the model is.
        resample: read windows resampled to the sensor's GSD when the scene's pixel size differs
            from it by more than 1 %.
        max_nodata: largest fraction (0-1) of missing pixels a tile may have and still be embedded.
        progress: show a tqdm progress bar counting tiles.
        resume: continue a partial run of the same settings into the output; ``False`` starts over.
        transform: for an array source, the affine transform of its pixels (CRS units).
        crs: for an array source, its CRS (anything ``rasterio.crs.CRS.from_user_input`` takes).
        bounds: embed only this area of interest, (left, bottom, right, top) in ``bounds_crs``
            units; every input pixel it touches is included.
        bounds_crs: the CRS of ``bounds`` (anything ``rasterio.crs.CRS.from_user_input`` takes,
            e.g. ``"EPSG:4326"``: longitude, latitude); ``None``: the scene's CRS. The bounds are
            then the envelope, in the scene's CRS, of the box with its edges densified (so the
            area covers the whole box); used only with ``bounds``.
        window: embed only this area of interest, in input pixels: a tuple **(row, col, height,
            width)** -- rows first, NumPy's order -- or a ``rasterio.windows.Window``, whose
            arguments run the other way, ``Window(col_off, row_off, width, height)``; the two
            are the same area when they name the same offsets and sizes (a Window is kept as the
            tuple). Outputs are georeferenced to the area, not the scene. At most one of
            ``bounds`` and ``window``.
        overviews: add average-resampled overviews to the ``map`` COG.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"int8"``; see
            :mod:`xstars_models.precision`. The map is float32 either way.
        compile: ``torch.compile`` the encoder first (pays off on long GPU runs).
        whiten: with ``output="cls"``, write the vectors whitened by the model's fitted whitening
            (``XStars.embed(..., whiten=True)``), to compare tiles across sensors.
        overwrite: replace an existing output file; without it an existing output is refused
            (rasterio's ``rio`` convention). The partial files of an interrupted run are not the
            output: they are resumed (``resume``) either way.
    """

    tile: int | None = None
    overlap: int = 0
    output: str = "map"
    batch_size: int = 16
    device: str | torch.device | None = None
    resample: bool = False
    max_nodata: float = 0.5
    progress: bool = True
    resume: bool = True
    transform: Affine | None = None
    crs: Any = None
    bounds: tuple[float, float, float, float] | None = None
    window: tuple[int, int, int, int] | None = None
    overviews: bool = False
    precision: str = "auto"
    compile: bool = False
    whiten: bool = False
    overwrite: bool = False
    # Last, so that options built positionally before it existed keep their meaning.
    bounds_crs: str | None = None

    def __post_init__(self) -> None:
        if self.output not in SCENE_OUTPUTS:
            raise InvalidOptionError(f"output must be one of {SCENE_OUTPUTS}, got {self.output!r}.", field="output")
        for name in ("tile", "overlap"):
            value = getattr(self, name)
            if not (_is_whole(value) or (name == "tile" and value is None)):
                raise InvalidOptionError(
                    f"{{{name}}} px: must be a whole number of pixels at the sensor's GSD (a multiple of its patch size).",
                    field=name,
                    settings={name: value},
                )
        if self.tile is not None:
            self._set("tile", int(self.tile))
        self._set("overlap", int(self.overlap))
        if not _is_whole(self.batch_size) or self.batch_size < 1:
            raise InvalidOptionError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}.", field="batch_size")
        self._set("batch_size", int(self.batch_size))
        if not _is_number(self.max_nodata) or not 0.0 <= self.max_nodata <= 1.0:
            raise InvalidOptionError(
                f"max_nodata is a fraction of a tile's pixels (0-1), got {self.max_nodata}.", field="max_nodata"
            )
        self._set("max_nodata", float(self.max_nodata))
        if self.precision not in PRECISIONS:
            raise InvalidOptionError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.", field="precision")
        if self.device is not None:
            check_device(self.device)  # a device this machine lacks is refused before any work
        if self.bounds is not None and self.window is not None:
            raise InvalidOptionError("pass bounds= or window=, not both.", field="window")
        if self.bounds is not None:
            self._set("bounds", _bounds(self.bounds))
        if self.window is not None:
            self._set("window", _window(self.window))
        if self.bounds_crs is not None:
            _check_crs(self.bounds_crs)

    def _set(self, name: str, value: Any) -> None:
        # The dataclass is frozen for its users; __post_init__ still stores normalised values
        # (plain ints and floats, tuples), which pickle and compare the same everywhere.
        object.__setattr__(self, name, value)

    @classmethod
    def from_call(
        cls, options: SceneOptions | None, positional: tuple[Any, ...] = (), keywords: Mapping[str, Any] | None = None
    ) -> SceneOptions:
        """The options of an ``embed_scene`` call: ``options`` (default: all defaults) with the
        options passed positionally (in the order of :data:`LEGACY_POSITIONAL`) and by keyword
        replacing its values.

        Raises:
            UnknownOptionError: a keyword that is not an option (``field``: that keyword).
            InvalidOptionError: an option's value (``field``: its name).
            InvalidTypeError: ``options`` that is not a ``SceneOptions``.
            TypeError: more positional options than there were, or an option given twice.
        """
        keywords = dict(keywords or {})
        if len(positional) > len(LEGACY_POSITIONAL):
            # What Python says of a call with too many positional arguments: the calling contract.
            raise TypeError(
                f"embed_scene() takes at most {len(LEGACY_POSITIONAL)} options positionally "
                f"({', '.join(LEGACY_POSITIONAL)}), got {len(positional)}; pass the others by keyword."
            )
        given = dict(zip(LEGACY_POSITIONAL, positional))
        twice = sorted(given.keys() & keywords.keys())
        if twice:
            raise TypeError(f"embed_scene() got multiple values for argument {twice[0]!r}")  # as Python says it
        given.update(keywords)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(given.keys() - set(names))
        if unknown:
            raise UnknownOptionError(
                f"embed_scene() got an unexpected keyword argument {unknown[0]!r}; the scene options are "
                f"{', '.join(names)} (see SceneOptions).",
                field=unknown[0],
            )
        if options is None:
            return cls(**given)
        if not isinstance(options, cls):
            raise InvalidTypeError(f"options must be a SceneOptions, got {type(options).__name__}.", field="options")
        return dataclasses.replace(options, **given) if given else options

    def settings(self) -> dict[str, Any]:
        """The options a partial run must share to be resumed, JSON-ready, under the keys of the
        partial run's record (``tile_px``, ``overlap_px``: pixels at the sensor's GSD). Taken from
        the options as they ran, with ``tile`` and ``precision`` resolved for the model.

        The others may change between runs (``batch_size``, ``device``, ``progress``, ``resume``,
        ``compile``, ``overviews``, ``overwrite``) or enter the record through the scene: ``resample`` as the
        resampling scale, ``bounds`` (with ``bounds_crs``) and ``window`` as the area of interest of the source's
        fingerprint. ``transform`` and ``crs`` of an array source are not recorded: change them
        only with ``resume=False``."""
        return {
            "output": self.output,
            "tile_px": self.tile,
            "overlap_px": self.overlap,
            "max_nodata": self.max_nodata,
            "precision": self.precision,
            "whiten": self.whiten,
        }


def _is_whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _bounds(bounds: Any) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in bounds)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not (values[0] < values[2] and values[1] < values[3]):
        shown = tuple(bounds) if isinstance(bounds, (list, tuple)) else bounds
        raise InvalidOptionError(
            "{bounds} must be (left, bottom, right, top) with left < right, bottom < top.",
            field="bounds",
            settings={"bounds": shown},
        )
    return values[0], values[1], values[2], values[3]


def _window(window: Any) -> tuple[int, int, int, int]:
    if hasattr(window, "col_off"):  # rasterio.windows.Window
        window = (window.row_off, window.col_off, window.height, window.width)
    try:
        values = tuple(float(v) for v in window)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(v.is_integer() for v in values):
        shown = tuple(window) if isinstance(window, (list, tuple)) else window
        raise InvalidOptionError(
            "{window} must be 4 whole numbers of pixels (row, col, height, width), or a "
            "rasterio.windows.Window(col_off, row_off, width, height).",
            field="window",
            settings={"window": shown},
        )
    row, col, height, width = (int(v) for v in values)
    return row, col, height, width


def _check_crs(crs: Any) -> None:
    """Refuse a ``bounds_crs`` that is not a CRS string rasterio reads."""
    from ..io import import_rasterio

    if isinstance(crs, str) and crs.strip():
        rasterio = import_rasterio("bounds_crs")
        try:
            rasterio.crs.CRS.from_user_input(crs)
            return
        except (rasterio.errors.CRSError, ValueError):  # "EPSG:abc" raises a bare ValueError
            pass
    raise InvalidOptionError(
        "{bounds_crs} is not a CRS; give one as a string rasterio reads, e.g. 'EPSG:4326' (longitude, latitude).",
        field="bounds_crs",
        settings={"bounds_crs": crs},
    )
