"""Co-registered pairs cut from georeferenced rasters of several sensors.

Windows are laid in ground coordinates, so the images of one item cover exactly the same
footprint whatever each sensor's GSD (640 m = 64 px of Sentinel-2 at 10 m = 128 px of 5 m
aerial). Requires rasterio (the ``geo`` extra).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["GeoPairDataset", "RasterSource"]


def _rasterio():
    try:
        import rasterio
    except ImportError:
        raise ImportError("GeoPairDataset needs rasterio: pip install 'xstars-models[geo]'.") from None
    return rasterio


@dataclass(frozen=True)
class RasterSource:
    """One sensor's imagery: one or more rasters (e.g. an aerial survey in several files), the
    1-based bands to read, the output size in pixels of one footprint, and the nodata value
    (default: the file's own; a pixel is nodata when all its bands equal it)."""

    paths: tuple[str, ...]
    bands: tuple[int, ...]
    size_px: int
    nodata: float | None = None


class GeoPairDataset(Dataset):
    """Items ``{"images": {sensor: float32 C x size x size digital numbers}, "bounds": (left,
    bottom, right, top), "crs": str, "index": i}`` of footprints seen by every sensor.

    Args:
        sources: ``RasterSource`` per sensor name (the names the model uses).
        footprint_m: side of each footprint in metres.
        stride_m: distance between footprints (default ``footprint_m``: no overlap).
        max_nodata: skip footprints where any sensor has a larger fraction of nodata pixels.
        split: ``"all"``, or ``"train"`` / ``"val"`` for a spatial split: the common extent is
            cut along ``split_axis`` (``"x"`` or ``"y"``) with the last ``val_fraction`` of it for
            validation and a ``gap_m`` strip (default one footprint) belonging to neither, so no
            training footprint touches a validation one.
    """

    def __init__(
        self,
        sources: dict[str, RasterSource],
        footprint_m: float,
        stride_m: float | None = None,
        max_nodata: float = 0.05,
        split: str = "all",
        val_fraction: float = 0.2,
        split_axis: str = "x",
        gap_m: float | None = None,
    ) -> None:
        if split not in ("all", "train", "val"):
            raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}.")
        if split_axis not in ("x", "y"):
            raise ValueError(f"split_axis must be 'x' or 'y', got {split_axis!r}.")
        if footprint_m <= 0 or (stride_m is not None and stride_m <= 0):
            raise ValueError(f"footprint_m ({footprint_m}) and stride_m ({stride_m}) must be > 0 metres.")
        self.sources, self.footprint_m = sources, float(footprint_m)
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        rio = _rasterio()
        extents, crs = {}, None
        self._rasters: dict[str, list[tuple[str, tuple[float, float, float, float], float | None]]] = {}
        for name, source in sources.items():
            self._rasters[name] = []
            for path in source.paths:
                with rio.open(path) as src:
                    if crs is None:
                        crs = src.crs
                    elif src.crs != crs:
                        raise ValueError(f"{path} ({name}) is in {src.crs}, other rasters in {crs}; reproject first.")
                    bad = [b for b in source.bands if not 1 <= b <= src.count]
                    if bad:
                        raise ValueError(f"{path} ({name}) has {src.count} bands; cannot read bands {bad} (1-based).")
                    nodata = source.nodata if source.nodata is not None else src.nodata
                    self._rasters[name].append((str(path), tuple(src.bounds), nodata))
            lefts, bottoms, rights, tops = zip(*(b for _, b, _ in self._rasters[name]))
            extents[name] = (min(lefts), min(bottoms), max(rights), max(tops))
        self.crs = str(crs)
        left = max(e[0] for e in extents.values())
        bottom = max(e[1] for e in extents.values())
        right = min(e[2] for e in extents.values())
        top = min(e[3] for e in extents.values())
        if right - left < footprint_m or top - bottom < footprint_m:
            raise ValueError(f"The rasters' common extent {(left, bottom, right, top)} is smaller than one {footprint_m} m footprint.")
        # Snap the grid to the first sensor's pixel grid so its windows are read without resampling.
        with rio.open(next(iter(sources.values())).paths[0]) as ref:
            res_x, res_y = ref.res
            left = ref.bounds.left + np.ceil((left - ref.bounds.left) / res_x - 1e-9) * res_x
            top = ref.bounds.top - np.ceil((ref.bounds.top - top) / res_y - 1e-9) * res_y
        self.extent = (float(left), bottom, right, float(top))
        stride = float(stride_m or footprint_m)
        gap = self.footprint_m if gap_m is None else float(gap_m)
        lo, hi = (left, right) if split_axis == "x" else (bottom, top)
        cut = hi - val_fraction * (hi - lo)
        candidates = []
        for y in np.arange(top, bottom + footprint_m - 1e-6, -stride):
            for x in np.arange(left, right - footprint_m + 1e-6, stride):
                bounds = (float(x), float(y - footprint_m), float(x + footprint_m), float(y))
                start, end = (bounds[0], bounds[2]) if split_axis == "x" else (bounds[1], bounds[3])
                if split == "train" and end > cut - gap:
                    continue
                if split == "val" and start < cut:
                    continue
                candidates.append(bounds)
        self.windows: list[tuple[tuple[float, float, float, float], dict[str, int]]] = []
        for bounds in candidates:
            chosen = {}
            for name, rasters in self._rasters.items():
                index = next((i for i, (_, b, _) in enumerate(rasters) if _contains(b, bounds)), None)
                if index is None:
                    break
                chosen[name] = index
            if len(chosen) == len(sources) and all(
                self._nodata_fraction(name, chosen[name], bounds) <= max_nodata for name in sources
            ):
                self.windows.append((bounds, chosen))
        self._close()

    def __len__(self) -> int:
        return len(self.windows)

    def _handle(self, path: str):
        # Handles are opened lazily and per process, so DataLoader workers each get their own.
        if os.getpid() != self._pid:
            self._handles, self._pid = {}, os.getpid()
        if path not in self._handles:
            self._handles[path] = _rasterio().open(path)
        return self._handles[path]

    def _close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def _read(self, name: str, raster: int, bounds: tuple[float, float, float, float]) -> np.ndarray:
        from rasterio.enums import Resampling
        from rasterio.windows import from_bounds

        source = self.sources[name]
        src = self._handle(self._rasters[name][raster][0])
        window = from_bounds(*bounds, transform=src.transform)
        return src.read(
            list(source.bands), window=window, out_shape=(len(source.bands), source.size_px, source.size_px),
            resampling=Resampling.bilinear,
        )

    def _nodata_fraction(self, name: str, raster: int, bounds) -> float:
        nodata = self._rasters[name][raster][2]
        if nodata is None:
            return 0.0
        image = self._read(name, raster, bounds)
        return float((image == nodata).all(axis=0).mean())

    def __getitem__(self, index: int) -> dict[str, Any]:
        bounds, chosen = self.windows[index]
        images = {name: torch.from_numpy(self._read(name, chosen[name], bounds).astype(np.float32)) for name in self.sources}
        return {"images": images, "bounds": bounds, "crs": self.crs, "index": index}

    def to_geojson(self) -> str:
        """The footprints as a GeoJSON FeatureCollection (coordinates in the rasters' CRS)."""
        features = [
            {
                "type": "Feature",
                "properties": {"index": i},
                "geometry": {"type": "Polygon", "coordinates": [[[l, b], [r, b], [r, t], [l, t], [l, b]]]},
            }
            for i, ((l, b, r, t), _) in enumerate(self.windows)
        ]
        return json.dumps({"type": "FeatureCollection", "crs_wkt": self.crs, "features": features})


def _contains(outer: Sequence[float], inner: Sequence[float]) -> bool:
    return outer[0] <= inner[0] + 1e-6 and outer[1] <= inner[1] + 1e-6 and outer[2] >= inner[2] - 1e-6 and outer[3] >= inner[3] - 1e-6
