"""Opening a scene: a C x H x W array, a local raster file, an ``http(s)://`` URL of a
cloud-optimised GeoTIFF (read by GDAL with HTTP range requests, never downloaded whole), or a STAC
Item (a ``pystac.Item``, or the path or URL of its JSON); then its area of interest. Before that,
:func:`scene_inputs` says which files and URLs a run on a source will read."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInputError, InvalidOptionError, InvalidTypeError
from ..io import REMOTE_GDAL_OPTIONS, import_rasterio
from ..io.network import gdal_http_options, network_limits
from ..sensors import SensorSpec
from .options import SceneOptions
from .reading import PixelWindow, Scene
from .stac import item_inputs, load_item, local_path, open_stac_item

if TYPE_CHECKING:
    from affine import Affine

_URL = re.compile(r"^https?://", re.IGNORECASE)


def is_remote(source: Any) -> bool:
    """Whether ``source`` is read over the network (a URL or a STAC Item): outputs then need an
    explicit ``out=``."""
    return (isinstance(source, str) and bool(_URL.match(source))) or type(source).__module__.startswith("pystac")


def _is_stac(source: Any) -> bool:
    if type(source).__module__.startswith("pystac"):
        return True
    if isinstance(source, (str, os.PathLike)):
        path = str(source).split("?", 1)[0].split("#", 1)[0]
        return path.lower().endswith(".json")
    return False


@dataclass(frozen=True)
class SceneInputs:
    """What a run on a source reads, known before it starts.

    Attributes:
        source: what to open: the source itself, or for a STAC Item given by the path or URL of
            its JSON the loaded ``pystac.Item`` (so that the JSON is read once).
        files: the local files read (for a STAC Item: its JSON and the files of the assets picked
            for the sensor).
        urls: the ``http(s)://`` URLs read (a COG; a STAC Item's JSON and picked assets).
    """

    source: Any
    files: tuple[Path, ...] = ()
    urls: tuple[str, ...] = ()


def scene_inputs(source: str | os.PathLike | np.ndarray | Any, spec: SensorSpec) -> SceneInputs:
    """The files and URLs a run on ``source`` for the sensor ``spec`` reads (nothing for an array).
    A STAC Item is loaded and its assets picked here (:func:`~.stac.item_inputs`).

    Raises:
        InvalidInputError, FileNotFoundError, NetworkTimeoutError: a STAC Item that cannot be read,
            or has no assets for the sensor's bands.
    """
    if isinstance(source, np.ndarray):
        return SceneInputs(source)
    if _is_stac(source):
        item = load_item(source)
        files, urls = item_inputs(item, spec, source)
        return SceneInputs(item, tuple(files), tuple(urls))
    if is_remote(source):
        return SceneInputs(source, urls=(str(source),))
    if isinstance(source, (str, os.PathLike)):
        path = local_path(source)
        return SceneInputs(source, files=(path,) if path is not None else ())
    return SceneInputs(source)  # not a source at all: open_scene says so


def resolve_aoi(
    bounds: tuple[float, float, float, float] | None,
    window: tuple[int, int, int, int] | None,
    transform: Affine,
    height: int,
    width: int,
    what: str,
    crs: Any = None,
    bounds_crs: str | None = None,
) -> PixelWindow | None:
    """The area of interest as a whole-pixel window (row, col, height, width) of the input.

    ``bounds`` (left, bottom, right, top in ``bounds_crs``, default the scene's ``crs``; checked
    by :class:`SceneOptions`) become every pixel they touch; in another CRS, of their envelope in
    the scene's CRS (:func:`bounds_in_crs`). ``window`` (row, col, height, width in input pixels)
    must lie inside the input's ``height`` x ``width`` pixels.

    Raises:
        InvalidOptionError: a window outside the scene (``field="window"``); bounds that do not
            overlap it, naming its bounds (``field="bounds"``); a ``bounds_crs`` for a scene
            without a CRS (``field="bounds_crs"``).
    """
    if window is not None:
        row, col, h, w = window
        if row < 0 or col < 0 or h < 1 or w < 1 or row + h > height or col + w > width:
            raise InvalidOptionError(
                f"{what}: window (row {row}, col {col}, height {h}, width {w}) is not inside the scene's "
                f"{height} x {width} pixels.",
                field="window",
            )
        return row, col, h, w
    if bounds is None:
        return None
    from rasterio.transform import array_bounds
    from rasterio.windows import from_bounds

    native = bounds if bounds_crs is None else bounds_in_crs(bounds, bounds_crs, crs, what)
    area = from_bounds(*native, transform=transform)
    row0 = max(0, math.floor(area.row_off + 1e-9))
    col0 = max(0, math.floor(area.col_off + 1e-9))
    row1 = min(height, math.ceil(area.row_off + area.height - 1e-9))
    col1 = min(width, math.ceil(area.col_off + area.width - 1e-9))
    if row1 <= row0 or col1 <= col0:
        west, south, east, north = array_bounds(height, width, transform)
        given = "" if bounds_crs is None else f" in {bounds_crs} ({_box(native)} in the scene's CRS)"
        raise InvalidOptionError(
            f"{what}: bounds {_box(bounds)}{given} do not overlap the scene, which spans "
            f"{_box((west, south, east, north))} (left, bottom, right, top) in its CRS.",
            field="bounds",
        )
    return row0, col0, row1 - row0, col1 - col0


def bounds_in_crs(
    bounds: tuple[float, float, float, float], bounds_crs: str, crs: Any, what: str
) -> tuple[float, float, float, float]:
    """``bounds`` (left, bottom, right, top in ``bounds_crs``) as the envelope of that box in the
    scene's ``crs``. The box's edges are densified (100 points each) before transforming, so the
    envelope covers the whole box, whose edges are curves in the scene's CRS.

    Raises:
        InvalidOptionError: a scene without a CRS (``field="bounds_crs"``); bounds that cannot
            be transformed to the scene's CRS (``field="bounds"``).
    """
    rasterio = import_rasterio()
    from rasterio.warp import transform_bounds

    if crs is None:
        raise InvalidOptionError(
            f"{what} has no CRS, so bounds in {{bounds_crs}} cannot be placed on it; give bounds in its own "
            "coordinates without a bounds CRS.",
            field="bounds_crs",
            settings={"bounds_crs": bounds_crs},
        )
    source = rasterio.crs.CRS.from_user_input(bounds_crs)
    if source == crs:
        return bounds
    try:
        left, bottom, right, top = transform_bounds(source, crs, *bounds, densify_pts=100)
    except rasterio.errors.RasterioError as err:
        left = bottom = right = top = math.nan
        cause = f" ({err})"
    else:
        cause = ""
    if not all(math.isfinite(v) for v in (left, bottom, right, top)) or not (left < right and bottom < top):
        raise InvalidOptionError(
            f"{what}: bounds {_box(bounds)} in {bounds_crs} cannot be transformed to the scene's CRS "
            f"({crs.to_string()}){cause}.",
            field="bounds",
        )
    return left, bottom, right, top


def _box(values: Any) -> str:
    """Coordinates as written in messages: all their digits up to 12 (not ``:g``'s 6, which
    shows 4176460 m as 4.17646e+06)."""
    return "(" + ", ".join(f"{float(v):.12g}" for v in values) + ")"


def open_scene(
    source: str | os.PathLike | np.ndarray | Any,
    spec: SensorSpec,
    sensor: str,
    options: SceneOptions,
    stack: contextlib.ExitStack,
) -> Scene:
    """A :class:`Scene` reading ``source`` with ``options``' ``resample``, ``transform``, ``crs``,
    ``bounds`` and ``window``; datasets it opens are closed with ``stack``."""
    rasterio = import_rasterio()
    from affine import Affine

    if isinstance(source, np.ndarray):
        if source.ndim != 3:
            raise InvalidInputError(
                f"Scene arrays must be C x H x W; got shape {source.shape} for sensor {sensor!r}.", field="source"
            )
        crs = rasterio.crs.CRS.from_user_input(options.crs) if options.crs is not None else None
        transform = options.transform if options.transform is not None else Affine.identity()
        data = np.ascontiguousarray(source)
        what = f"array {tuple(data.shape)}"
        aoi = resolve_aoi(options.bounds, options.window, transform, data.shape[1], data.shape[2], what, crs,
                          options.bounds_crs)
        fingerprint = {
            "array_sha256": hashlib.sha256(data.data.cast("B")).hexdigest(),
            "shape": list(data.shape),
            "dtype": data.dtype.name,
            "aoi": aoi,
        }
        scene = Scene(what, None, data, transform, crs, spec.nodata, spec, sensor, options.resample, fingerprint, aoi)
        if scene.scale is not None:
            # Resampled reads go through GDAL, so the array becomes an in-memory dataset.
            memfile = stack.enter_context(rasterio.io.MemoryFile())
            dataset = stack.enter_context(
                memfile.open(
                    driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                    dtype=data.dtype.name, transform=transform, crs=crs,
                )
            )
            dataset.write(data)
            scene._dataset, scene._array = dataset, None
        return scene
    if not isinstance(source, (str, os.PathLike)) and not _is_stac(source):
        raise InvalidTypeError(
            "source must be a C x H x W numpy array, a raster file, an http(s):// URL of a GeoTIFF, "
            f"or a STAC Item (pystac.Item, or the path or URL of its JSON); got {type(source).__name__}.",
            field="source",
        )
    if options.transform is not None or options.crs is not None:
        raise InvalidOptionError(
            f"{source}: transform= and crs= are for array sources; a file has its own.",
            field="transform" if options.transform is not None else "crs",
        )
    if _is_stac(source):
        dataset, what, fingerprint = open_stac_item(source, spec, sensor, stack)
    elif is_remote(source):
        dataset = _open_url(rasterio, str(source), stack)
        what = str(source)
        fingerprint = {"url": what}
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Scene {path} does not exist.")
        dataset = stack.enter_context(rasterio.open(path))
        stat = path.stat()
        what = str(path)
        fingerprint = {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    # What the scene is, as far as a resumed run can tell without reading it all.
    fingerprint.update(
        shape=[dataset.count, dataset.height, dataset.width], dtype=dataset.dtypes[0],
        transform=list(dataset.transform)[:6],
    )
    aoi = resolve_aoi(options.bounds, options.window, dataset.transform, dataset.height, dataset.width, what,
                      dataset.crs, options.bounds_crs)
    fingerprint["aoi"] = aoi
    nodata = dataset.nodata if dataset.nodata is not None else spec.nodata
    return Scene(what, dataset, None, dataset.transform, dataset.crs, nodata, spec, sensor, options.resample, fingerprint, aoi)


def _open_url(rasterio: Any, url: str, stack: contextlib.ExitStack) -> Any:
    # The options stay set (with the stack) for the reads, not only for opening.
    limits = network_limits()
    stack.enter_context(rasterio.Env(**REMOTE_GDAL_OPTIONS, **gdal_http_options(limits)))
    try:
        return stack.enter_context(rasterio.open(url))
    except rasterio.errors.RasterioIOError as err:
        raise FileNotFoundError(
            f"Cannot open {url} as a raster over HTTP ({err}). Check the URL; GDAL reads it with "
            f"range requests, so the server must answer HEAD and Range requests (network limits: {limits.describe()})."
        ) from None
