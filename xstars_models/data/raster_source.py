"""One sensor's rasters in a pair data set: the options a user gives (:class:`RasterSource`), how
the planner decides to read them from those options and the files' headers (:class:`SensorPlan`),
and the record of that decision a data set shows (:class:`SensorRead`). Needs rasterio (the
``geo`` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from ..errors import InvalidInputError, InvalidOptionError
from ..io import import_rasterio, resampling_for
from ..io.mosaic import Bounds, Mosaic, RasterFile

# Fails at import, with the fix, without the ``geo`` extra.
Resampling = import_rasterio("xstars_models.data.geo_pairs").enums.Resampling

__all__ = ["PathLike", "RasterSource", "SensorPlan", "SensorRead", "plan_sensor"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True, init=False)
class RasterSource:
    """One sensor's imagery and how to read it.

    Attributes:
        paths: one raster, or several rasters of the same sensor (e.g. the sheets of an aerial
            survey), mosaicked in this order: the first file with a valid pixel supplies it.
            Given as a path or a sequence of paths; kept as a tuple of strings.
        bands: 1-based band indexes to read (rasterio convention); ``None`` reads every band.
        size_px: output tile size in pixels, ``int`` (square) or ``(height, width)``; ``None``
            gives the footprint divided by the first file's pixel size, rounded.
        nodata: digital number marking missing pixels, overriding the files' metadata; ``None``
            uses each file's own nodata value (GDAL's resampling only knows the files' own).
        zero_nodata: also count pixels that are 0 in every band as missing.
        resampling: a :class:`rasterio.enums.Resampling` name; ``None`` picks ``average`` when
            the tile's pixels are coarser than the file's and ``bilinear`` otherwise.
    """

    paths: tuple[str, ...]
    bands: tuple[int, ...] | None
    size_px: int | tuple[int, int] | None
    nodata: float | None
    zero_nodata: bool
    resampling: str | None

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        bands: Sequence[int] | None = None,
        size_px: int | tuple[int, int] | None = None,
        nodata: float | None = None,
        zero_nodata: bool = False,
        resampling: str | None = None,
    ) -> None:
        listed = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        # Frozen: the fields are set once, here, in their normalised form.
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in listed))
        object.__setattr__(self, "bands", tuple(int(b) for b in bands) if bands is not None else None)
        object.__setattr__(self, "size_px", size_px)
        object.__setattr__(self, "nodata", nodata)
        object.__setattr__(self, "zero_nodata", zero_nodata)
        object.__setattr__(self, "resampling", resampling)
        if resampling is not None and resampling not in Resampling.__members__:
            raise InvalidOptionError(
                f"Unknown resampling {resampling!r} for {list(self.paths)}; "
                f"expected one of {sorted(Resampling.__members__)}.",
                field="resampling",
            )


@dataclass(frozen=True)
class SensorRead:
    """How one sensor's tiles are read, recorded so that no resampling is silent.

    Attributes:
        name: key of this sensor in the items' ``images``.
        paths: its rasters, in mosaic order.
        bands: 1-based band indexes read from every file.
        out_shape: ``(height, width)`` of every tile in pixels.
        native_res_m: ``(x, y)`` pixel size of the first file, in metres.
        out_res_m: ``(x, y)`` pixel size of the tiles, in metres (footprint / ``out_shape``).
        resampling: the rasterio method used where a window is not a whole-pixel copy.
        pixel_aligned: ``True`` when every window falls on this sensor's pixel edges at its
            native size: tiles are exact copies and ``resampling`` is never used.
        nodata: the override value, or ``"file"`` when each file's metadata value is used.
        zero_nodata: whether pixels that are 0 in every band count as missing.
    """

    name: str
    paths: tuple[str, ...]
    bands: tuple[int, ...]
    out_shape: tuple[int, int]
    native_res_m: tuple[float, float]
    out_res_m: tuple[float, float]
    resampling: str
    pixel_aligned: bool
    nodata: float | str
    zero_nodata: bool


@dataclass(frozen=True)
class SensorPlan:
    """How one sensor is read: its files' headers, the bands, the tile shape and the resampling.

    Attributes:
        name: key of this sensor in the items' ``images``.
        source: the options it was planned from.
        files: the headers of ``source.paths``, in mosaic order.
        bands: 1-based band indexes read from every file.
        out_shape: ``(height, width)`` of every tile in pixels.
        out_res_m: ``(x, y)`` pixel size of the tiles in metres.
        resampling: the rasterio method used where a window is not a whole-pixel copy.
    """

    name: str
    source: RasterSource
    files: tuple[RasterFile, ...]
    bands: tuple[int, ...]
    out_shape: tuple[int, int]
    out_res_m: tuple[float, float]
    resampling: str

    def mosaic(self) -> Mosaic:
        """A reader of this sensor's files as one image, with its nodata rules."""
        return Mosaic(self.files, self.bands, self.source.nodata, self.source.zero_nodata)

    def record(self, windows: Sequence[Bounds]) -> SensorRead:
        """The record of how ``windows`` (ground bounds in metres) are read from this sensor."""
        aligned = all(
            f.is_pixel_copy(window, self.out_shape) for window in windows for f in self.files if overlaps(f.bounds, window)
        )
        return SensorRead(
            name=self.name,
            paths=self.source.paths,
            bands=self.bands,
            out_shape=self.out_shape,
            native_res_m=self.files[0].res,
            out_res_m=self.out_res_m,
            resampling=self.resampling,
            pixel_aligned=aligned,
            nodata=self.source.nodata if self.source.nodata is not None else "file",
            zero_nodata=self.source.zero_nodata,
        )


def plan_sensor(name: str, source: RasterSource, files: Sequence[RasterFile], footprint_m: float) -> SensorPlan:
    """How sensor ``name`` is read for footprints of ``footprint_m`` metres: the bands (checked
    against every file), the tile shape in pixels and the resampling method."""
    first = files[0]
    bands = source.bands
    if bands is None:
        counts = sorted({f.count for f in files})
        if len(counts) > 1:
            raise InvalidInputError(
                f"Sensor {name!r}: its files have different band counts {counts}; give bands.", field="sources"
            )
        bands = tuple(range(1, first.count + 1))
    if not bands:
        raise InvalidOptionError(f"Sensor {name!r}: bands is empty; give 1-based band indexes.", field="sources")
    for f in files:
        bad = [b for b in bands if not 1 <= b <= f.count]
        if bad:
            raise InvalidOptionError(
                f"Sensor {name!r}: {f.path} has {f.count} bands; cannot read bands {bad} "
                f"(indexes are 1-based, rasterio convention: 1..{f.count}).",
                field="sources",
            )
    size = source.size_px
    dims: tuple[int, ...]
    if size is None:
        dims = (max(1, round(footprint_m / first.res[1])), max(1, round(footprint_m / first.res[0])))
    elif isinstance(size, int):
        dims = (size, size)
    else:
        dims = tuple(int(s) for s in size)
    if len(dims) != 2 or min(dims) < 1:
        raise InvalidOptionError(
            f"Sensor {name!r}: size_px must be a positive int or (height, width) in pixels, got {size!r}.",
            field="sources",
        )
    shape = (dims[0], dims[1])
    out_res = (footprint_m / shape[1], footprint_m / shape[0])
    method = source.resampling or resampling_for(out_res, first.res)
    return SensorPlan(name, source, tuple(files), tuple(bands), shape, out_res, method)


def overlaps(a: Bounds, b: Bounds) -> bool:
    """Whether two (left, bottom, right, top) boxes share a positive area."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
