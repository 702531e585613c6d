"""Reading a scene: windows of digital numbers at the sensor's GSD, the GSD check, and which
pixels are missing."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..sensors import SensorSpec

if TYPE_CHECKING:
    from affine import Affine




GSD_SAME = 0.01  # relative GSD difference used without comment
GSD_WARN = 0.10  # ... used with a warning when resample=False; beyond it, an error

# GDAL caches every block it reads or writes up to this size; its default (5 % of RAM) would let
# the cache grow with the scene.
GDAL_CACHE_BYTES = 64 * 2**20



def import_rasterio() -> Any:
    try:
        import rasterio
    except ImportError:
        raise ImportError(
            "Embedding scenes reads and writes GeoTIFFs with rasterio, which is not installed: "
            "pip install 'xstars-models[geo]'."
        ) from None
    return rasterio


# --------------------------------------------------------------------------------------------
# The scene: windows of digital numbers at the sensor's GSD.


def _check_gsd(
    pixel_m: tuple[float, float], gsd_m: float, sensor: str, what: str, resample: bool
) -> tuple[float, float] | None:
    """The (x, y) read scale (input pixels per sensor pixel) when windows must be resampled,
    ``None`` when the input is used as is; warns or raises as the module documentation says."""
    worst = max(abs(size / gsd_m - 1.0) for size in pixel_m)
    if worst <= GSD_SAME:
        return None
    if resample:
        return (gsd_m / pixel_m[0], gsd_m / pixel_m[1])
    shown = f"{pixel_m[0]:g} m" if math.isclose(*pixel_m, rel_tol=1e-9) else f"{pixel_m[0]:g} x {pixel_m[1]:g} m"
    if worst <= GSD_WARN:
        warnings.warn(
            f"{what}: pixel size {shown} differs from sensor {sensor!r}'s {gsd_m:g} m GSD by "
            f"{worst:.1%}; embedding it as is (pass resample=True to resample to {gsd_m:g} m).",
            UserWarning,
            stacklevel=6,
        )
        return None
    raise ValueError(
        f"{what}: pixel size {shown} but sensor {sensor!r} has a GSD of {gsd_m:g} m "
        f"({worst:.0%} apart). Pass resample=True to read windows resampled to {gsd_m:g} m, "
        "or embed with a sensor at the imagery's GSD."
    )


class Scene:
    """Metadata of the scene at the sensor's GSD and a reader of its strips."""

    def __init__(
        self,
        what: str,
        dataset: Any,
        array: np.ndarray | None,
        transform: Affine,
        crs: Any,
        nodata: float | None,
        spec: SensorSpec,
        sensor: str,
        resample: bool,
        fingerprint: dict[str, Any],
    ) -> None:
        from affine import Affine

        self.what = what
        self.fingerprint = fingerprint
        self.crs = crs
        self.nodata = nodata
        self._dataset = dataset
        self._array = array
        count, height, width = array.shape if array is not None else (dataset.count, dataset.height, dataset.width)
        dtype = np.dtype(array.dtype if array is not None else dataset.dtypes[0])
        if count != spec.num_bands:
            raise ValueError(
                f"{what}: {count} bands, but sensor {sensor!r} has {spec.num_bands} bands "
                f"{list(spec.band_names)} (in that order)."
            )
        if dtype.kind != "f" and dtype.name != spec.dtype:
            raise ValueError(
                f"{what}: {dtype.name} pixels, but sensor {sensor!r} expects {spec.dtype} digital "
                "numbers (or floats in the same units)."
            )
        self.dtype = dtype
        self.scale = self._gsd_scale(transform, crs, spec, sensor, resample)
        if self.scale is None:
            self.height, self.width = height, width
            self.transform = transform
        else:
            # Whole sensor pixels that lie inside the input.
            self.height = int(math.floor(height / self.scale[1] + 1e-9))
            self.width = int(math.floor(width / self.scale[0] + 1e-9))
            self.transform = transform @ Affine.scale(*self.scale)

    def _gsd_scale(
        self, transform: Affine, crs: Any, spec: SensorSpec, sensor: str, resample: bool
    ) -> tuple[float, float] | None:
        if crs is None and transform.is_identity:
            if self._array is None:  # a file; arrays without a transform are expected
                warnings.warn(
                    f"{self.what} has no georeferencing; taking its pixels to be at sensor {sensor!r}'s "
                    f"{spec.gsd_m:g} m GSD. The output is in the input's pixel coordinates.",
                    UserWarning,
                    stacklevel=5,
                )
            return None
        if crs is not None and crs.is_geographic:
            raise ValueError(
                f"{self.what} is in a geographic CRS ({crs.to_string()}, degrees), so its GSD in metres "
                f"is unknown; reproject it to a projected CRS (e.g. UTM) at sensor {sensor!r}'s "
                f"{spec.gsd_m:g} m GSD."
            )
        to_metres = 1.0
        if crs is not None:
            with contextlib.suppress(Exception):  # CRSs without a linear unit: assume metres
                to_metres = float(crs.linear_units_factor[1])
        pixel_m = (math.hypot(transform.a, transform.d) * to_metres, math.hypot(transform.b, transform.e) * to_metres)
        return _check_gsd(pixel_m, spec.gsd_m, sensor, self.what, resample)

    def read(self, row: int, height: int, width: int) -> np.ndarray:
        """Pixels [row, row + height) x [0, width) at the sensor's GSD, C x height x width, in the
        input's data type (a fresh array)."""
        if self._array is not None:
            return np.array(self._array[:, row : row + height, :width])
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        if self.scale is None:
            return self._dataset.read(window=Window(0, row, width, height))
        sx, sy = self.scale
        return self._dataset.read(
            window=Window(0, row * sy, width * sx, height * sy),
            out_shape=(self._dataset.count, height, width),
            # Averaging when shrinking keeps every input pixel's contribution; bilinear when enlarging.
            resampling=Resampling.average if min(sx, sy) > 1 else Resampling.bilinear,
        )


def open_scene(
    source: str | os.PathLike | np.ndarray,
    spec: SensorSpec,
    sensor: str,
    resample: bool,
    transform: Affine | None,
    crs: Any,
    stack: contextlib.ExitStack,
) -> Scene:
    rasterio = import_rasterio()
    from affine import Affine

    if isinstance(source, np.ndarray):
        if source.ndim != 3:
            raise ValueError(
                f"Scene arrays must be C x H x W; got shape {source.shape} for sensor {sensor!r}."
            )
        crs = rasterio.crs.CRS.from_user_input(crs) if crs is not None else None
        transform = transform if transform is not None else Affine.identity()
        data = np.ascontiguousarray(source)
        fingerprint = {
            "array_sha256": hashlib.sha256(memoryview(data).cast("B")).hexdigest(),
            "shape": list(data.shape),
            "dtype": data.dtype.name,
        }
        what = f"array {tuple(data.shape)}"
        nodata = spec.nodata
        scene = Scene(what, None, data, transform, crs, nodata, spec, sensor, resample, fingerprint)
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
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a GeoTIFF path or a C x H x W numpy array, got {type(source).__name__}."
        )
    if transform is not None or crs is not None:
        raise ValueError(f"{source}: transform= and crs= are for array sources; a file has its own.")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Scene {path} does not exist.")
    dataset = stack.enter_context(rasterio.open(path))
    stat = path.stat()
    fingerprint = {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    nodata = dataset.nodata if dataset.nodata is not None else spec.nodata
    return Scene(str(path), dataset, None, dataset.transform, dataset.crs, nodata, spec, sensor, resample, fingerprint)




@contextlib.contextmanager
def quiet_georef() -> Iterator[None]:
    """Scenes without georeferencing are allowed; rasterio's warning about them is noise here."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield




def pixel_missing(strip: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """H x W mask of missing pixels (all bands == nodata, or any band not finite), or ``None``
    when nothing can be missing. Non-finite values are set to 0 in place so that they do not
    spread to the whole tile through attention."""
    missing = None
    if strip.dtype.kind == "f":
        bad = ~np.isfinite(strip)
        if bad.any():
            strip[bad] = 0
            missing = bad.any(axis=0)
    if nodata is not None and not math.isnan(nodata):
        value = np.asarray(nodata).astype(strip.dtype)
        if value == nodata:  # else not representable in the data type: no pixel can equal it
            equal = (strip == value).all(axis=0)
            missing = equal if missing is None else missing | equal
    return missing
