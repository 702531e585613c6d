"""Reading a scene: windows of digital numbers of its area of interest at the sensor's GSD, the
GSD and unit checks, and which pixels are missing. Opening one is :mod:`.sources`' job."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import MissingExtraError, user_stacklevel
from ..sensors import SensorSpec
from ..units import check_value_range, expected_input

if TYPE_CHECKING:
    from affine import Affine

GSD_SAME = 0.01  # relative GSD difference used without comment
GSD_WARN = 0.10  # ... used with a warning when resample=False; beyond it, an error

# GDAL caches every block it reads or writes up to this size; its default (5 % of RAM) would let
# the cache grow with the scene.
GDAL_CACHE_BYTES = 64 * 2**20

# Remote reads: no directory listing on open (one request fewer, and none for sidecar files), and
# neighbouring byte ranges fetched in one request.
REMOTE_GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES"}

# A window of input pixels: row offset, column offset, height, width.
PixelWindow = tuple[int, int, int, int]


def import_rasterio() -> Any:
    try:
        import rasterio
    except ImportError:
        raise MissingExtraError(
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
            stacklevel=user_stacklevel(),
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
        aoi: PixelWindow | None = None,
    ) -> None:
        from affine import Affine

        self.what = what
        self.fingerprint = fingerprint
        self.crs = crs
        self.nodata = nodata
        self.spec = spec
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
                f"{what}: {dtype.name} pixels, but sensor {sensor!r} expects {expected_input(spec)} "
                "(or floats in the same units)."
            )
        self.dtype = dtype
        self.scale = self._gsd_scale(transform, crs, spec, sensor, resample)
        # The area of interest, in input pixels; reads are offset by its corner.
        self._row0, self._col0 = (aoi[0], aoi[1]) if aoi is not None else (0, 0)
        if aoi is not None:
            height, width = aoi[2], aoi[3]
            transform = transform @ Affine.translation(self._col0, self._row0)
        if self.scale is None:
            self.height, self.width = height, width
            self.transform = transform
        else:
            # Whole sensor pixels that lie inside the input.
            self.height = int(math.floor(height / self.scale[1] + 1e-9))
            self.width = int(math.floor(width / self.scale[0] + 1e-9))
            self.transform = transform @ Affine.scale(*self.scale)

    @property
    def origin(self) -> tuple[int, int]:
        """(row, col) of the area of interest's corner in the input's pixels."""
        return self._row0, self._col0

    def _gsd_scale(
        self, transform: Affine, crs: Any, spec: SensorSpec, sensor: str, resample: bool
    ) -> tuple[float, float] | None:
        if crs is None and transform.is_identity:
            if self._array is None:  # a file; arrays without a transform are expected
                warnings.warn(
                    f"{self.what} has no georeferencing; taking its pixels to be at sensor {sensor!r}'s "
                    f"{spec.gsd_m:g} m GSD. The output is in the input's pixel coordinates.",
                    UserWarning,
                    stacklevel=user_stacklevel(),
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
        """Pixels [row, row + height) x [0, width) of the area of interest at the sensor's GSD,
        C x height x width, in the input's data type (a fresh array).

        Raises:
            ValueError: float values that cannot be the sensor's digital numbers (see
                :func:`xstars_models.units.check_value_range`), nodata pixels aside.
        """
        try:
            strip = self._read(row, height, width)
        except OSError as err:  # GDAL's message ("Read failed. See previous exception") names no file
            raise OSError(f"{self.what}: reading rows {row}-{row + height} failed ({err}); is the file "
                          "truncated or damaged?") from err
        if strip.dtype.kind == "f":
            valid = None
            if self.nodata is not None and not math.isnan(self.nodata):
                valid = ~(strip == self.nodata).all(axis=0)
            check_value_range(strip, self.spec, f"{self.what}, rows {row}-{row + height} at the sensor's GSD", valid)
        return strip

    def _read(self, row: int, height: int, width: int) -> np.ndarray:
        r0, c0 = self._row0, self._col0
        if self._array is not None:
            return np.array(self._array[:, r0 + row : r0 + row + height, c0 : c0 + width])
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        if self.scale is None:
            return self._dataset.read(window=Window(c0, r0 + row, width, height))
        sx, sy = self.scale
        return self._dataset.read(
            window=Window(c0, r0 + row * sy, width * sx, height * sy),
            out_shape=(self._dataset.count, height, width),
            # Averaging when shrinking keeps every input pixel's contribution; bilinear when enlarging.
            resampling=Resampling.average if min(sx, sy) > 1 else Resampling.bilinear,
        )


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
