"""Co-registered multi-sensor tiles cut from georeferenced rasters, for MSAD pairs.

Windows are laid in *ground* coordinates, so the tiles of one item cover exactly the same
footprint whatever each sensor's ground sampling distance: 640 m is 64 px of Sentinel-2 (10 m),
128 px of a 5 m aerial survey and about 21 px of Landsat (30 m). Items hold raw digital numbers
(float32, C x H x W); normalisation is left to the model's sensor stems. Where the windows lie is
planned by :func:`~.pair_plan.plan_pairs`; the data set only reads them. Needs rasterio (the
``geo`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io.mosaic import Bounds
from .pair_plan import PairPlan, plan_pairs
from .raster_source import PathLike, RasterSource, SensorRead

__all__ = ["GeoPairDataset", "PairPlan", "RasterSource", "SensorRead", "plan_pairs"]


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

    The windows come from :func:`~.pair_plan.plan_pairs` (given the same arguments), kept in
    :attr:`plan`; :meth:`from_plan` builds a data set that reads a plan made beforehand.

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
        transform: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        **plan_options: Any,
    ) -> None:
        # The planning keywords (footprint_px ... split_blocks) are plan_pairs' own, documented above.
        self._read_from(plan_pairs(sources, footprint_m, **plan_options), transform)

    @classmethod
    def from_plan(cls, plan: PairPlan, transform: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> GeoPairDataset:
        """A data set of ``plan``'s windows, in its order (no file is read until an item is)."""
        dataset = cls.__new__(cls)
        dataset._read_from(plan, transform)
        return dataset

    def _read_from(self, plan: PairPlan, transform: Callable[[dict[str, torch.Tensor]], Any] | None) -> None:
        self.plan = plan
        self.transform = transform
        self._mosaics = {name: sensor.mosaic() for name, sensor in plan.sensors.items()}

    # ---- the plan, by name ------------------------------------------------------------------

    @property
    def sources(self) -> dict[str, RasterSource]:
        """Sensor name -> the options its rasters are read with."""
        return {name: sensor.source for name, sensor in self.plan.sensors.items()}

    @property
    def crs(self) -> str:
        """The rasters' one CRS; bounds are in it (metres)."""
        return self.plan.crs

    @property
    def footprint_m(self) -> float:
        """Side of every footprint in metres."""
        return self.plan.footprint_m

    @property
    def stride_m(self) -> float:
        """Distance between neighbouring windows in metres."""
        return self.plan.stride_m

    @property
    def split(self) -> str:
        """``"all"``, ``"train"`` or ``"val"``."""
        return self.plan.split

    @property
    def extent(self) -> Bounds:
        """``(left, bottom, right, top)`` of the sensors' common ground in metres."""
        return self.plan.extent

    @property
    def regions(self) -> list[Bounds]:
        """The part(s) of :attr:`extent` that belong to :attr:`split`, in metres."""
        return self.plan.regions

    @property
    def windows(self) -> list[Bounds]:
        """The footprints, ``(left, bottom, right, top)`` in metres, in item order."""
        return self.plan.windows

    @property
    def nodata_fractions(self) -> list[dict[str, float]]:
        """For each footprint, the fraction (0-1) of missing native pixels by sensor."""
        return self.plan.nodata_fractions

    @property
    def reads(self) -> dict[str, SensorRead]:
        """How each sensor's tiles are read, by sensor name."""
        return self.plan.reads

    # ---- reading ------------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's raster handles (they reopen on the next read)."""
        for mosaic in self._mosaics.values():
            mosaic.close()

    def _read(self, name: str, window: Bounds) -> tuple[np.ndarray, np.ndarray]:
        """One sensor's tile: float32 DNs ``(C, H, W)`` (missing pixels 0) and its ``(H, W)``
        validity mask."""
        sensor = self.plan.sensors[name]
        return self._mosaics[name].read(window, sensor.out_shape, sensor.resampling)

    # ---- Dataset ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            # The sequence protocol: iteration and DataLoader samplers stop on IndexError.
            raise IndexError(f"Index {index} is out of range for {len(self)} footprints.")
        index %= len(self)
        window = self.windows[index]
        images = {name: torch.from_numpy(self._read(name, window)[0]) for name in self.plan.sensors}
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
                "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
                "properties": {"index": i, "split": self.split, "nodata_fraction": fractions},
            }
            for i, ((w, s, e, n), fractions) in enumerate(zip(self.windows, self.nodata_fractions))
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
