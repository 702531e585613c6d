"""Where the footprints of a pair data set lie, decided before any footprint is read: the sampler
half of TorchGeo's split between samplers and data sets. :func:`plan_pairs` reads the rasters'
headers, lays a grid of square windows in ground coordinates over the sensors' common extent (in
the regions of the chosen spatial split), and drops the windows where a sensor misses too many
pixels; :class:`~.geo_pairs.GeoPairDataset` then only reads the windows it is given. Needs
rasterio (the ``geo`` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidInputError, InvalidOptionError
from ..io.mosaic import Bounds, RasterFile, common_crs, inspect_file
from .coverage import missing_fractions
from .grid import grid_windows, intersect_bounds, split_regions
from .raster_source import PathLike, RasterSource, SensorPlan, SensorRead, plan_sensor

__all__ = ["PairPlan", "plan_pairs"]


@dataclass(frozen=True)
class PairPlan:
    """The footprints of a pair data set and how each sensor is read.

    Attributes:
        crs: the one CRS of every raster, as a string; all bounds are in it (metres).
        footprint_m: side of every square footprint in metres.
        stride_m: distance in metres between neighbouring windows.
        split: ``"all"``, ``"train"`` or ``"val"``.
        extent: ``(left, bottom, right, top)`` of the sensors' common ground.
        regions: the part(s) of ``extent`` that belong to ``split``; no window crosses an edge.
        windows: the footprints kept, ``(left, bottom, right, top)``, in item order (left to
            right, then top to bottom, region by region).
        nodata_fractions: for each window, the fraction (0-1) of missing native pixels by sensor.
        sensors: how each sensor is read, by name, in the order of the sources.
        reads: the record of each sensor's reads (:class:`~.raster_source.SensorRead`), by name.
    """

    crs: str
    footprint_m: float
    stride_m: float
    split: str
    extent: Bounds
    regions: list[Bounds]
    windows: list[Bounds]
    nodata_fractions: list[dict[str, float]]
    sensors: dict[str, SensorPlan]
    reads: dict[str, SensorRead]


def plan_pairs(
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
) -> PairPlan:
    """The footprints of :class:`~.geo_pairs.GeoPairDataset` for the same arguments (see it for
    each), from the rasters' headers and one indexing read of each file; no footprint is read.

    Raises:
        InvalidOptionError: an option out of range, or one the rasters cannot meet (no footprint
            of that size fits); ``field`` names it.
        InvalidInputError: rasters that cannot be paired (no common ground, different CRSs,
            rotated pixels) or too few valid pixels in every footprint (``field="sources"``).
        FileNotFoundError: a raster that does not exist.
    """
    if not sources:
        raise InvalidInputError("GeoPairDataset needs at least one sensor's rasters.", field="sources")
    if not 0.0 <= max_nodata <= 1.0:
        raise InvalidOptionError(f"max_nodata is a fraction of pixels in [0, 1], got {max_nodata}.", field="max_nodata")
    given = {n: s if isinstance(s, RasterSource) else RasterSource(s) for n, s in sources.items()}
    empty = [name for name, source in given.items() if not source.paths]
    if empty:
        raise InvalidInputError(f"Sensor {empty[0]!r}: no raster paths given.", field="sources")
    files = {name: [inspect_file(path, name) for path in source.paths] for name, source in given.items()}
    crs = common_crs(files)
    reference = reference or next(iter(given))
    if reference not in given:
        raise InvalidOptionError(
            f"reference sensor {reference!r} is not one of the sources {sorted(given)}.", field="reference"
        )
    ref_file = files[reference][0]
    footprint = _footprint(footprint_m, footprint_px, reference, ref_file)
    stride = float(stride_m) if stride_m is not None else footprint

    extents = {name: _union([f.bounds for f in sensor_files]) for name, sensor_files in files.items()}
    extent = intersect_bounds(extents.values())
    if extent is None:
        listing = "; ".join(f"{name}: {_fmt(b)}" for name, b in extents.items())
        raise InvalidInputError(f"The sensors' rasters do not overlap on the ground ({listing}).", field="sources")
    gap = footprint if gap_m is None else float(gap_m)
    regions = split_regions(extent, split, val_fraction, split_axis, gap, split_blocks)
    sensors = {name: plan_sensor(name, source, files[name], footprint) for name, source in given.items()}

    origin = (ref_file.bounds[0], ref_file.bounds[3])
    candidates = [window for region in regions for window in grid_windows(region, footprint, stride, origin, ref_file.res)]
    if not candidates:
        size = "footprint_m" if footprint_px is None else "footprint_px"
        raise InvalidOptionError(
            f"No {footprint:g} m footprint fits in the {split!r} region(s) "
            f"{[_fmt(r) for r in regions]} of the sensors' common extent {_fmt(extent)}; "
            f"use a smaller footprint than {{{size}}}.",
            field=size,
            settings={size: footprint_m if footprint_px is None else footprint_px},
        )
    fractions = missing_fractions(candidates, origin, ref_file.res[0], sensors)
    kept = [(window, missing) for window, missing in zip(candidates, fractions) if max(missing.values()) <= max_nodata]
    if not kept:
        least = {name: round(min(f[name] for f in fractions), 3) for name in sensors}
        raise InvalidInputError(
            f"All {len(candidates)} footprints of {footprint:g} m miss more than "
            f"{{max_nodata}} of their pixels in some sensor (least missing per sensor: "
            f"{least}); raise max_nodata, check the nodata values, or use a smaller footprint.",
            field="sources",
            settings={"max_nodata": max_nodata},
        )
    windows = [window for window, _ in kept]
    return PairPlan(
        crs=crs,
        footprint_m=footprint,
        stride_m=stride,
        split=split,
        extent=extent,
        regions=regions,
        windows=windows,
        nodata_fractions=[missing for _, missing in kept],
        sensors=sensors,
        reads={name: sensor.record(windows) for name, sensor in sensors.items()},
    )


def _footprint(footprint_m: float | None, footprint_px: int | None, reference: str, ref: RasterFile) -> float:
    """The footprint's side in metres, from metres or from pixels of the reference sensor."""
    either = "Give the footprint either in metres (footprint_m) or in reference pixels (footprint_px)."
    if footprint_px is None:
        if footprint_m is None:
            raise InvalidOptionError(either, field="footprint_m")
        if not footprint_m > 0:
            raise InvalidOptionError(f"footprint_m must be > 0 metres, got {footprint_m}.", field="footprint_m")
        return float(footprint_m)
    if footprint_m is not None:
        raise InvalidOptionError(either, field="footprint_m")
    if ref.res[0] != ref.res[1]:
        raise InvalidOptionError(
            f"footprint_px needs square pixels, but the reference sensor {reference!r} ({ref.path}) has "
            f"{ref.res[0]} x {ref.res[1]} m pixels; give footprint_m instead.",
            field="footprint_px",
        )
    if int(footprint_px) != footprint_px or footprint_px < 1:
        raise InvalidOptionError(
            f"footprint_px must be a positive whole number of pixels, got {footprint_px}.", field="footprint_px"
        )
    return footprint_px * ref.res[0]


def _union(boxes: list[Bounds]) -> Bounds:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _fmt(bounds: Bounds) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in bounds) + ")"
