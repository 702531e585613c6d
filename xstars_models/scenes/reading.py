"""Reading a scene: windows of digital numbers of its area of interest at the sensor's GSD, with
the GSD and unit checks applied and missing pixels marked, by the rules of :mod:`xstars_models.io`.
Opening one is :mod:`.sources`' job."""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInputError, XStarsError, user_stacklevel
from ..io import fill_missing, gsd_scale, missing_mask, pixel_size_m, read_window, resampling_for
from ..io.network import network_limits
from ..sensors import SensorSpec
from ..units import check_value_range, expected_input
from .failures import io_errors, read_error

if TYPE_CHECKING:
    from affine import Affine

# A window of input pixels: row offset, column offset, height, width.
PixelWindow = tuple[int, int, int, int]
# An input read over the network (a COG URL, a STAC asset's href).
_REMOTE = re.compile(r"https?://", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# The scene: windows of digital numbers at the sensor's GSD.


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
            raise InvalidInputError(
                f"{what}: {count} bands, but sensor {sensor!r} has {spec.num_bands} bands "
                f"{list(spec.band_names)} (in that order).",
                field="source",
            )
        if dtype.kind != "f" and dtype.name != spec.dtype:
            raise InvalidInputError(
                f"{what}: {dtype.name} pixels, but sensor {sensor!r} expects {expected_input(spec)} "
                "(or floats in the same units).",
                field="source",
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
            raise InvalidInputError(
                f"{self.what} is in a geographic CRS ({crs.to_string()}, degrees), so its GSD in metres "
                f"is unknown; reproject it to a projected CRS (e.g. UTM) at sensor {sensor!r}'s "
                f"{spec.gsd_m:g} m GSD.",
                field="source",
            )
        pixel_m = pixel_size_m(transform, crs)
        return gsd_scale(pixel_m, spec.gsd_m, sensor, self.what, resample)

    def read(self, row: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels [row, row + height) x [0, width) of the area of interest at the sensor's GSD:
        C x height x width in the input's data type (a fresh array), with its missing pixels
        (:func:`xstars_models.io.missing_mask`) set to 0 DN so that they do not spread to a whole
        tile through attention, and the height x width mask of those missing pixels.

        Raises:
            ValueError: float values that cannot be the sensor's digital numbers (see
                :func:`xstars_models.units.check_value_range`), nodata pixels aside.
            InputReadError: the reader failed (a truncated file or HTTP body): names the input's
                rows and the reader's own message, which GDAL's ("Read failed. See previous
                exception") leaves in the exceptions chained below it.
        """
        try:
            strip = self._read(row, height, width)
        except XStarsError:
            raise
        except io_errors() as err:
            raise read_error(err, self.what, self._input_rows(row, height), self._read_hint()) from err
        missing = missing_mask(strip, self.nodata)
        if strip.dtype.kind == "f":
            check_value_range(strip, self.spec, f"{self.what}, rows {row}-{row + height} at the sensor's GSD", ~missing)
        return fill_missing(strip, missing), missing

    def _input_rows(self, row: int, height: int) -> tuple[int, int]:
        """The input's rows (first, last) that sensor-GSD rows [row, row + height) come from."""
        sy = self.scale[1] if self.scale is not None else 1.0
        return self._row0 + math.floor(row * sy), self._row0 + math.ceil((row + height) * sy) - 1

    def _read_hint(self) -> str:
        """What to check after a failed read: the network limits for an input read over HTTP."""
        read = [self.what, str(self.fingerprint.get("url", "")), *map(str, self.fingerprint.get("hrefs", []))]
        if any(_REMOTE.match(name) for name in read):
            return f"; did the server close the connection early? (network limits: {network_limits().describe()})."
        return "; is the file truncated or damaged?"

    def _read(self, row: int, height: int, width: int) -> np.ndarray:
        r0, c0 = self._row0, self._col0
        if self._array is not None:
            return np.array(self._array[:, r0 + row : r0 + row + height, c0 : c0 + width])
        if self.scale is None:
            return read_window(self._dataset, (c0, r0 + row, width, height))
        sx, sy = self.scale
        method = resampling_for(self.scale, (1.0, 1.0))  # the scale is sensor pixels / input pixels
        return read_window(self._dataset, (c0, r0 + row * sy, width * sx, height * sy), (height, width), method)
