"""Co-registered multi-sensor tiles cut from georeferenced rasters, for MSAD pairs.

Windows are laid in *ground* coordinates, so the tiles of one item cover exactly the same
footprint whatever each sensor's ground sampling distance: 640 m is 64 px of Sentinel-2 (10 m),
128 px of a 5 m aerial survey and about 21 px of Landsat (30 m). Items hold raw digital numbers
(float32, C x H x W); normalisation is left to the model's sensor stems. Needs rasterio (the
``geo`` extra).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import import_rasterio, resampling_for
from ..io.mosaic import EPS_PX, Bounds, CellGrid, Mosaic, RasterFile, common_crs, inspect_file
from .grid import grid_windows, intersect_bounds, split_regions

# Fails at import, with the fix, without the ``geo`` extra.
Resampling = import_rasterio("xstars_models.data.geo_pairs").enums.Resampling

__all__ = ["GeoPairDataset", "RasterSource", "SensorRead"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class RasterSource:
    """One sensor's imagery and how to read it.

    Attributes:
        paths: one raster, or several rasters of the same sensor (e.g. the sheets of an aerial
            survey), mosaicked in this order: the first file with a valid pixel supplies it.
        bands: 1-based band indexes to read (rasterio convention); ``None`` reads every band.
        size_px: output tile size in pixels, ``int`` (square) or ``(height, width)``; ``None``
            gives the footprint divided by the first file's pixel size, rounded.
        nodata: digital number marking missing pixels, overriding the files' metadata; ``None``
            uses each file's own nodata value (GDAL's resampling only knows the files' own).
        zero_nodata: also count pixels that are 0 in every band as missing.
        resampling: a :class:`rasterio.enums.Resampling` name; ``None`` picks ``average`` when
            the tile's pixels are coarser than the file's and ``bilinear`` otherwise.
    """

    paths: PathLike | Sequence[PathLike]
    bands: Sequence[int] | None = None
    size_px: int | tuple[int, int] | None = None
    nodata: float | None = None
    zero_nodata: bool = False
    resampling: str | None = None

    def __post_init__(self) -> None:
        paths = [self.paths] if isinstance(self.paths, (str, os.PathLike)) else list(self.paths)
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
        if self.resampling is not None and self.resampling not in Resampling.__members__:
            raise ValueError(
                f"Unknown resampling {self.resampling!r} for {list(self.paths)}; "
                f"expected one of {sorted(Resampling.__members__)}."
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


class GeoPairDataset(Dataset):
    """Tiles of the same ground footprint from co-registered rasters of several sensors.

    A regular grid of square ``footprint_m``-metre windows is laid over the intersection of the
    sensors' extents, snapped to the pixel grid of the ``reference`` sensor (read without
    resampling when the footprint is a whole number of its pixels). Each sensor's window is read
    with :func:`rasterio.windows.from_bounds` at its own output size; the resampling used is
    recorded in :attr:`reads`. Windows where any sensor misses more than ``max_nodata`` of its
    native pixels are dropped. A pixel is missing when it lies outside all of the sensor's files
    or as :func:`xstars_models.io.missing_mask` says (a non-finite band, every band equal to the
    nodata value, or with ``zero_nodata`` every band 0); missing pixels are 0 DN in the tiles.
    Construction reads each file once, at its own resolution, to count its valid pixels per
    cell of a grid that tiles every window (no window is read until it is asked for). The grid
    is deterministic.

    Items: ``{"images": {sensor: float32 C x H x W DNs}, "bounds": (left, bottom, right, top)
    in metres, "crs": str, "index": i}``.

    Args:
        sources: sensor name (as the model names it) -> :class:`RasterSource`, or a path or a
            list of paths as shorthand for one with default options.
        footprint_m: side of each square footprint in metres.
        footprint_px: alternatively, the side in pixels of the ``reference`` sensor.
        reference: the sensor whose pixel grid anchors the windows (default: the first).
        stride_m: distance in metres between neighbouring windows (default ``footprint_m``: no
            overlap; ``footprint_m / 2`` gives 50 % overlap).
        max_nodata: largest fraction (0-1) of missing pixels allowed in any sensor's tile.
        split: ``"all"``, ``"train"`` or ``"val"``: a spatial split by area (see
            :func:`xstars_models.data.grid.split_regions`: validation is the high-coordinate
            ``val_fraction`` of the extent along ``split_axis``). Windows are laid separately in
            each region, so none crosses a region's edge.
        val_fraction: fraction of the common extent's area given to validation.
        split_axis: ``"x"`` (validation to the east) or ``"y"`` (validation to the north).
        gap_m: buffer in metres between training and validation ground (default: one footprint,
            so that neighbouring train and val tiles are not near-duplicates).
        split_blocks: number of blocks the axis is cut into, each ending with a validation strip.
        transform: called on each item's ``images`` dict; its result replaces it.
    """

    def __init__(
        self,
        sources: Mapping[str, RasterSource | PathLike | Sequence[PathLike]],
        footprint_m: float | None = None,
        *,
        footprint_px: int | None = None,
        reference: str | None = None,
        stride_m: float | None = None,
        max_nodata: float = 0.05,
        split: str = "all",
        val_fraction: float = 0.2,
        split_axis: str = "y",
        gap_m: float | None = None,
        split_blocks: int = 1,
        transform: Callable[[dict[str, torch.Tensor]], Any] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("GeoPairDataset needs at least one sensor's rasters.")
        if not 0.0 <= max_nodata <= 1.0:
            raise ValueError(f"max_nodata is a fraction of pixels in [0, 1], got {max_nodata}.")
        self.sources = {n: s if isinstance(s, RasterSource) else RasterSource(s) for n, s in sources.items()}
        if any(not source.paths for source in self.sources.values()):
            raise ValueError(f"Sensor {next(n for n, s in self.sources.items() if not s.paths)!r}: no raster paths given.")
        self._files = {name: [inspect_file(path, name) for path in source.paths] for name, source in self.sources.items()}
        self.crs = common_crs(self._files)
        reference = reference or next(iter(self.sources))
        if reference not in self.sources:
            raise ValueError(f"reference sensor {reference!r} is not one of the sources {sorted(self.sources)}.")
        ref_file = self._files[reference][0]
        self.footprint_m = _footprint(footprint_m, footprint_px, reference, ref_file)
        self.stride_m = float(stride_m) if stride_m is not None else self.footprint_m
        self.split = split
        self.transform = transform

        extents = {name: _union([f.bounds for f in files]) for name, files in self._files.items()}
        self.extent = intersect_bounds(extents.values())
        if self.extent is None:
            listing = "; ".join(f"{name}: {_fmt(b)}" for name, b in extents.items())
            raise ValueError(f"The sensors' rasters do not overlap on the ground ({listing}).")
        gap = self.footprint_m if gap_m is None else float(gap_m)
        self.regions = split_regions(self.extent, split, val_fraction, split_axis, gap, split_blocks)
        self._plans = {name: self._plan(name) for name in self.sources}
        self._mosaics = {
            name: Mosaic(self._files[name], self._plans[name]["bands"], source.nodata, source.zero_nodata)
            for name, source in self.sources.items()
        }

        origin = (ref_file.bounds[0], ref_file.bounds[3])
        candidates = [
            window for region in self.regions
            for window in grid_windows(region, self.footprint_m, self.stride_m, origin, ref_file.res)
        ]
        if not candidates:
            raise ValueError(
                f"No {self.footprint_m:g} m footprint fits in the {split!r} region(s) "
                f"{[_fmt(r) for r in self.regions]} of the sensors' common extent {_fmt(self.extent)}; "
                "use a smaller footprint_m."
            )
        fractions = self._missing_fractions(candidates, origin, ref_file.res[0])
        self.windows: list[Bounds] = []
        self.nodata_fractions: list[dict[str, float]] = []
        for window, missing in zip(candidates, fractions):
            if max(missing.values()) <= max_nodata:
                self.windows.append(window)
                self.nodata_fractions.append(missing)
        if not self.windows:
            least = {name: round(min(f[name] for f in fractions), 3) for name in self.sources}
            raise ValueError(
                f"All {len(candidates)} footprints of {self.footprint_m:g} m miss more than "
                f"max_nodata={max_nodata} of their pixels in some sensor (least missing per sensor: "
                f"{least}); raise max_nodata, check the nodata values, or use a smaller footprint."
            )
        self.reads = {name: self._record(name) for name in self.sources}

    # ---- set-up -------------------------------------------------------------------------

    def _plan(self, name: str) -> dict[str, Any]:
        source, files = self.sources[name], self._files[name]
        first = files[0]
        bands = source.bands
        if bands is None:
            counts = sorted({f.count for f in files})
            if len(counts) > 1:
                raise ValueError(f"Sensor {name!r}: its files have different band counts {counts}; give bands.")
            bands = tuple(range(1, first.count + 1))
        if not bands:
            raise ValueError(f"Sensor {name!r}: bands is empty; give 1-based band indexes.")
        for f in files:
            bad = [b for b in bands if not 1 <= b <= f.count]
            if bad:
                raise ValueError(
                    f"Sensor {name!r}: {f.path} has {f.count} bands; cannot read bands {bad} "
                    f"(indexes are 1-based, rasterio convention: 1..{f.count})."
                )
        size = source.size_px
        if size is None:
            shape = (max(1, round(self.footprint_m / first.res[1])), max(1, round(self.footprint_m / first.res[0])))
        elif isinstance(size, int):
            shape = (size, size)
        else:
            shape = tuple(int(s) for s in size)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(
                f"Sensor {name!r}: size_px must be a positive int or (height, width) in pixels, got {size!r}."
            )
        out_res = (self.footprint_m / shape[1], self.footprint_m / shape[0])
        method = source.resampling or resampling_for(out_res, first.res)
        return {"bands": tuple(bands), "shape": shape, "out_res": out_res, "method": method}

    def _record(self, name: str) -> SensorRead:
        plan, files, source = self._plans[name], self._files[name], self.sources[name]
        aligned = all(
            f.is_pixel_copy(window, plan["shape"])
            for window in self.windows for f in files if _overlaps(f.bounds, window)
        )
        return SensorRead(
            name=name,
            paths=source.paths,
            bands=plan["bands"],
            out_shape=plan["shape"],
            native_res_m=files[0].res,
            out_res_m=plan["out_res"],
            resampling=plan["method"],
            pixel_aligned=aligned,
            nodata=source.nodata if source.nodata is not None else "file",
            zero_nodata=source.zero_nodata,
        )

    # ---- reading ------------------------------------------------------------------------

    def _missing_fractions(self, windows: list[Bounds], origin: tuple[float, float], ref_px: float) -> list[dict[str, float]]:
        """Each window's fraction (0-1) of missing native pixels per sensor, from one indexing
        read of each file (:meth:`Mosaic.valid_counts`) rather than a read of every window: the
        windows are cut into the largest cells that tile all of them, and a window's count is
        the sum of its cells'."""
        unit = _common_cell_px([v for w in windows for v in (w[0] - origin[0], origin[1] - w[3], w[2] - w[0])], ref_px)
        cell_m = unit * ref_px
        left, top = min(w[0] for w in windows), max(w[3] for w in windows)
        right, bottom = max(w[2] for w in windows), min(w[1] for w in windows)
        grid = CellGrid(
            (left, top), cell_m, (max(1, round((top - bottom) / cell_m)), max(1, round((right - left) / cell_m)))
        )
        fractions: list[dict[str, float]] = [{} for _ in windows]
        for name, mosaic in self._mosaics.items():
            counts = mosaic.valid_counts(grid)
            mosaic.close()
            first = self._files[name][0]
            for window, missing in zip(windows, fractions):
                rows, cols = grid.cells_of(window)
                expected = _centres(window[0], window[2], first.bounds[0], first.res[0]) * _centres(
                    -window[3], -window[1], -first.bounds[3], first.res[1]
                )
                missing[name] = float(min(1.0, max(0.0, 1.0 - counts[rows, cols].sum() / max(expected, 1))))
        return fractions

    def close(self) -> None:
        """Close this process's raster handles (they reopen on the next read)."""
        for mosaic in self._mosaics.values():
            mosaic.close()

    def _read(self, name: str, window: Bounds) -> tuple[np.ndarray, np.ndarray]:
        """One sensor's tile: float32 DNs ``(C, H, W)`` (missing pixels 0) and its ``(H, W)``
        validity mask."""
        plan = self._plans[name]
        return self._mosaics[name].read(window, plan["shape"], plan["method"])

    # ---- Dataset ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Index {index} is out of range for {len(self)} footprints.")
        index %= len(self)
        window = self.windows[index]
        images = {name: torch.from_numpy(self._read(name, window)[0]) for name in self.sources}
        return {
            "images": self.transform(images) if self.transform is not None else images,
            "bounds": window,
            "crs": self.crs,
            "index": index,
        }

    # ---- inspection ---------------------------------------------------------------------

    def to_geojson(self, path: PathLike | None = None) -> dict[str, Any]:
        """The footprints as a GeoJSON FeatureCollection of polygons in the rasters' CRS (metres,
        not WGS 84; the CRS is named in the legacy ``crs`` member), each with its index, split
        and missing-pixel fraction per sensor. Also written to ``path`` when given."""
        features = [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[l, b], [r, b], [r, t], [l, t], [l, b]]]},
                "properties": {"index": i, "split": self.split, "nodata_fraction": fractions},
            }
            for i, ((l, b, r, t), fractions) in enumerate(zip(self.windows, self.nodata_fractions))
        ]
        collection = {
            "type": "FeatureCollection",
            "crs": {"type": "name", "properties": {"name": self.crs}},
            "features": features,
        }
        if path is not None:
            Path(path).write_text(json.dumps(collection))
        return collection

    def __repr__(self) -> str:
        reads = "; ".join(
            f"{r.name}: {r.out_shape[1]}x{r.out_shape[0]} px of {r.out_res_m[0]:g} m "
            f"({'pixel copy' if r.pixel_aligned else r.resampling + ' from ' + format(r.native_res_m[0], 'g') + ' m'})"
            for r in self.reads.values()
        )
        return f"GeoPairDataset({len(self)} footprints of {self.footprint_m:g} m, split={self.split!r}; {reads})"


def _footprint(footprint_m: float | None, footprint_px: int | None, reference: str, ref: RasterFile) -> float:
    if (footprint_m is None) == (footprint_px is None):
        raise ValueError("Give the footprint either in metres (footprint_m) or in reference pixels (footprint_px).")
    if footprint_m is not None:
        if not footprint_m > 0:
            raise ValueError(f"footprint_m must be > 0 metres, got {footprint_m}.")
        return float(footprint_m)
    if ref.res[0] != ref.res[1]:
        raise ValueError(
            f"footprint_px needs square pixels, but the reference sensor {reference!r} ({ref.path}) has "
            f"{ref.res[0]} x {ref.res[1]} m pixels; give footprint_m instead."
        )
    if int(footprint_px) != footprint_px or footprint_px < 1:
        raise ValueError(f"footprint_px must be a positive whole number of pixels, got {footprint_px}.")
    return footprint_px * ref.res[0]


def _union(boxes: list[Bounds]) -> Bounds:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _overlaps(a: Bounds, b: Bounds) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _fmt(bounds: Bounds) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in bounds) + ")"


def _centres(low: float, high: float, origin: float, res: float) -> int:
    """How many centres of pixels ``res`` wide whose edges start at ``origin`` lie in [low, high)
    (the file's pixel lattice, continued beyond the file: pixels outside it count as missing)."""
    return math.ceil((high - origin) / res - 0.5 - EPS_PX) - math.ceil((low - origin) / res - 0.5 - EPS_PX)


def _common_cell_px(offsets_m: list[float], px: float) -> int:
    """The largest whole number of ``px``-metre pixels dividing every offset (metres), or 1 when
    some offset is not a whole number of pixels."""
    whole = []
    for offset in offsets_m:
        n = round(offset / px)
        if abs(offset / px - n) > EPS_PX * max(1, abs(n)):
            return 1
        whole.append(abs(n))
    return max(1, math.gcd(*whole))
