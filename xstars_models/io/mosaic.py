"""One sensor's imagery as a mosaic of north-up files in one CRS: windows read in ground
coordinates at any output size, and an index of how many valid pixels lie in each cell of a grid,
built by one read of each file, from which the missing fraction of any window made of whole cells
is a sum (no read of the window)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from .missing import fill_missing, missing_mask
from .rasters import import_rasterio

__all__ = ["Bounds", "CellGrid", "Mosaic", "RasterFile", "common_crs", "inspect_file"]

Bounds = tuple[float, float, float, float]  # left, bottom, right, top, in the CRS's units (metres)

# Tolerance in pixels for deciding that a window edge falls on a pixel edge (round-off only).
EPS_PX = 1e-6
# Rows of a file read at once while indexing it: bounds the memory of a pass over a big file.
INDEX_STRIP_ROWS = 512


@dataclass(frozen=True)
class RasterFile:
    """What a reader needs to know of one file without keeping it open."""

    path: str
    crs: Any  # rasterio.crs.CRS or None
    bounds: Bounds
    res: tuple[float, float]  # (x, y) pixel size, positive, in CRS units
    count: int
    nodata: float | None

    def is_pixel_copy(self, window: Bounds, shape: tuple[int, int]) -> bool:
        """Whether reading ``window`` at ``shape`` (height, width) copies whole pixels of this
        file: its edges fall on pixel edges and its size is the file's pixel size."""
        col = (window[0] - self.bounds[0]) / self.res[0]
        row = (self.bounds[3] - window[3]) / self.res[1]
        cols = (window[2] - window[0]) / self.res[0]
        rows = (window[3] - window[1]) / self.res[1]
        return (
            abs(col - round(col)) < EPS_PX and abs(row - round(row)) < EPS_PX
            and abs(cols - shape[1]) < EPS_PX and abs(rows - shape[0]) < EPS_PX
        )


def inspect_file(path: str, sensor: str) -> RasterFile:
    """Read ``path``'s header; refuse a missing file or a rotated or flipped geotransform (an
    :class:`InvalidInputError` whose ``field`` is ``"sources"``, the data sets' argument that
    carries the rasters)."""
    rasterio = import_rasterio()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Sensor {sensor!r}: raster {path} does not exist.")
    with rasterio.open(path) as ds:
        a, b, _, d, e, _ = tuple(ds.transform)[:6]
        if b != 0 or d != 0 or a <= 0 or e >= 0:
            raise InvalidInputError(
                f"Sensor {sensor!r}: {path} has a rotated or flipped geotransform {tuple(ds.transform)[:6]}; "
                "expected north-up pixels (warp it first, e.g. with gdalwarp).",
                field="sources",
            )
        return RasterFile(path, ds.crs, tuple(ds.bounds), (a, -e), ds.count, ds.nodata)


def common_crs(files: Mapping[str, Sequence[RasterFile]]) -> str:
    """The one projected, metre-based CRS of every file (sensor name -> its files), as a string;
    else an :class:`InvalidInputError` whose ``field`` is ``"sources"``."""
    first_name, first_files = next(iter(files.items()))
    first_path, crs = first_files[0].path, first_files[0].crs
    if crs is None:
        raise InvalidInputError(
            f"Sensor {first_name!r}: {first_path} has no CRS, so it cannot be placed on the ground.", field="sources"
        )
    if not crs.is_projected or crs.linear_units_factor[1] != 1.0:
        raise InvalidInputError(
            f"Sensor {first_name!r}: {first_path} is in {crs.to_string()!r}, whose units are not metres; "
            "footprints are in metres, so reproject to a projected CRS (e.g. UTM) first.",
            field="sources",
        )
    for name, sensor_files in files.items():
        for f in sensor_files:
            if f.crs != crs:
                raise InvalidInputError(
                    f"Rasters must share one CRS: {f.path} (sensor {name!r}) is in "
                    f"{f.crs.to_string() if f.crs else None!r} but {first_path} (sensor {first_name!r}) is in "
                    f"{crs.to_string()!r}; reproject one of them first (e.g. gdalwarp -t_srs).",
                    field="sources",
                )
    return crs.to_string()


@dataclass(frozen=True)
class CellGrid:
    """A grid of square cells of ``cell_m`` metres whose top-left corner is ``origin`` (x, y),
    ``shape`` (rows, cols) cells; row 0 is the northernmost."""

    origin: tuple[float, float]
    cell_m: float
    shape: tuple[int, int]

    def cells_of(self, window: Bounds) -> tuple[slice, slice]:
        """The (rows, cols) slices of the cells that make up ``window``, whose edges must fall on
        cell edges."""
        left, bottom, right, top = window
        ox, oy = self.origin
        c0, c1 = round((left - ox) / self.cell_m), round((right - ox) / self.cell_m)
        r0, r1 = round((oy - top) / self.cell_m), round((oy - bottom) / self.cell_m)
        return slice(r0, r1), slice(c0, c1)


class Mosaic:
    """One sensor's files (same CRS and band layout), read as one image: the first file with a
    valid pixel supplies it. A pixel is missing as :func:`.missing.missing_mask` says, with the
    ``nodata`` override or else each file's own nodata value; missing pixels read as 0 DN.

    File handles open on first read in each process (GDAL handles must not cross a fork), so a
    mosaic pickles to DataLoader workers."""

    def __init__(
        self, files: Sequence[RasterFile], bands: Sequence[int], nodata: float | None = None, zero_nodata: bool = False
    ) -> None:
        self.files, self.bands = tuple(files), tuple(bands)
        self.nodata, self.zero_nodata = nodata, zero_nodata
        self._handles: list[Any] | None = None
        self._pid = os.getpid()

    def _open(self) -> list[Any]:
        if self._handles is None or self._pid != os.getpid():
            rasterio = import_rasterio()
            self._handles = [rasterio.open(f.path) for f in self.files]
            self._pid = os.getpid()
        return self._handles

    def close(self) -> None:
        """Close this process's handles (they reopen on the next read)."""
        if self._handles is not None and self._pid == os.getpid():
            for handle in self._handles:
                handle.close()
        self._handles = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": None}

    def _missing(self, info: RasterFile, block: np.ndarray) -> np.ndarray:
        return missing_mask(block, self.nodata if self.nodata is not None else info.nodata, self.zero_nodata)

    def read(self, window: Bounds, shape: tuple[int, int], resampling: str) -> tuple[np.ndarray, np.ndarray]:
        """The ``window``'s pixels at ``shape`` (height, width): float32 DNs ``(C, H, W)`` and
        the ``(H, W)`` validity mask. ``resampling`` (a rasterio name) is used where the window
        is not a whole-pixel copy."""
        from rasterio.enums import Resampling
        from rasterio.windows import from_bounds

        height, width = shape
        left, bottom, right, top = window
        dx, dy = (right - left) / width, (top - bottom) / height
        data = np.zeros((len(self.bands), height, width), dtype=np.float32)
        valid = np.zeros((height, width), dtype=bool)
        for info, handle in zip(self.files, self._open()):
            # Only the output pixels lying wholly inside this file are read from it: the read
            # window never leaves the file (a boundless read resamples through a VRT in the
            # file's dtype, rounding averages) and half-covered edge pixels stay missing.
            fl, fb, fr, ft = info.bounds
            c0 = max(0, math.ceil((fl - left) / dx - EPS_PX))
            c1 = min(width, math.floor((fr - left) / dx + EPS_PX))
            r0 = max(0, math.ceil((top - ft) / dy - EPS_PX))
            r1 = min(height, math.floor((top - fb) / dy + EPS_PX))
            if c1 <= c0 or r1 <= r0:
                continue
            part = (left + c0 * dx, top - r1 * dy, left + c1 * dx, top - r0 * dy)
            block = handle.read(
                self.bands,
                window=_inside(from_bounds(*part, transform=handle.transform), handle),
                out_shape=(len(self.bands), r1 - r0, c1 - c0),
                resampling=Resampling[resampling],
                out_dtype="float32",
            )
            done = valid[r0:r1, c0:c1]
            take = ~self._missing(info, block) & ~done
            data[:, r0:r1, c0:c1][:, take] = block[:, take]
            done |= take
        return fill_missing(data, ~valid), valid

    def valid_counts(self, grid: CellGrid) -> np.ndarray:
        """``grid.shape`` array of the number of valid native pixels whose centre lies in each
        cell, from one read of each file in strips of :data:`INDEX_STRIP_ROWS` rows (at the
        files' own resolution: nothing is resampled). Where files overlap, a cell counts at most
        the pixels it holds at the first file's resolution."""
        from rasterio.windows import Window

        rows, cols = grid.shape
        counts = np.zeros(rows * cols, dtype=np.int32)
        ox, oy = grid.origin
        for info, handle in zip(self.files, self._open()):
            fl, _, _, ft = info.bounds
            xs = np.floor((fl + (np.arange(handle.width) + 0.5) * info.res[0] - ox) / grid.cell_m).astype(np.int64)
            x_in = (xs >= 0) & (xs < cols)
            for start in range(0, handle.height, INDEX_STRIP_ROWS):
                height = min(INDEX_STRIP_ROWS, handle.height - start)
                ys = np.floor((oy - (ft - (start + np.arange(height) + 0.5) * info.res[1])) / grid.cell_m).astype(np.int64)
                y_in = (ys >= 0) & (ys < rows)
                if not y_in.any() or not x_in.any():
                    continue
                block = handle.read(self.bands, window=Window(0, start, handle.width, height))
                keep = ~self._missing(info, block) & y_in[:, None] & x_in[None, :]
                cell = ys[:, None] * cols + xs[None, :]
                counts += np.bincount(cell[keep], minlength=rows * cols).astype(np.int32)
        # A half-open cell side of L metres holds at most ceil(L / r) pixel centres spaced r apart.
        res_x, res_y = self.files[0].res
        capacity = math.ceil(grid.cell_m / res_x - EPS_PX) * math.ceil(grid.cell_m / res_y - EPS_PX)
        return np.minimum(counts, capacity).reshape(rows, cols)


def _inside(window: Any, handle: Any) -> Any:
    """``window`` trimmed of the round-off that could put it a hair outside the file."""
    from rasterio.windows import Window

    col = min(max(float(window.col_off), 0.0), handle.width)
    row = min(max(float(window.row_off), 0.0), handle.height)
    return Window(col, row, min(float(window.width), handle.width - col), min(float(window.height), handle.height - row))
