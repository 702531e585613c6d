"""Opening and reading rasters: the rasterio import (the ``geo`` extra), the GDAL settings, pixel
sizes in metres and the check against a sensor's GSD, the resampling rule, and whole-file reads."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import InvalidInputError, MissingExtraError, user_stacklevel

__all__ = [
    "GDAL_CACHE_BYTES", "GSD_SAME", "GSD_WARN", "REMOTE_GDAL_OPTIONS", "available_memory", "check_fits_in_memory",
    "gsd_mismatch", "gsd_scale", "import_rasterio", "pixel_size_m", "quiet_georef", "read_raster", "read_window",
    "resampling_for",
]

GSD_SAME = 0.01  # relative difference between pixel size and GSD used without comment
GSD_WARN = 0.10  # ... used with a warning when not resampling; beyond it, an error

# GDAL caches every block it reads or writes up to this size; its default (5 % of RAM) would let
# the cache grow with the scene.
GDAL_CACHE_BYTES = 64 * 2**20

# Remote reads: no directory listing on open (one request fewer, and none for sidecar files), and
# neighbouring byte ranges fetched in one request.
REMOTE_GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES"}


def import_rasterio(purpose: str = "Reading rasters") -> Any:
    """The ``rasterio`` module, or :class:`MissingExtraError` saying ``purpose`` needs it."""
    try:
        import rasterio
    except ImportError:
        raise MissingExtraError(f"{purpose} needs rasterio, which is not installed: pip install 'xstars-models[geo]'.") from None
    return rasterio


@contextlib.contextmanager
def quiet_georef() -> Iterator[None]:
    """Rasters without georeferencing are allowed where this is used; rasterio's warning about
    them is noise there."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def pixel_size_m(transform: Any, crs: Any) -> tuple[float, float]:
    """(x, y) pixel size in metres of a raster with affine ``transform`` in a projected ``crs``
    (or none: its units are then taken as metres). Rotated transforms are measured along the
    pixel's sides."""
    to_metres = 1.0
    if crs is not None:
        with contextlib.suppress(Exception):  # CRSs without a linear unit: assume metres
            to_metres = float(crs.linear_units_factor[1])
    return math.hypot(transform.a, transform.d) * to_metres, math.hypot(transform.b, transform.e) * to_metres


def gsd_mismatch(pixel_m: tuple[float, float], gsd_m: float) -> float:
    """The larger relative difference (0 = equal) between the (x, y) pixel size and ``gsd_m``,
    both in metres: what :data:`GSD_SAME` and :data:`GSD_WARN` are compared with."""
    return max(abs(size / gsd_m - 1.0) for size in pixel_m)


def gsd_scale(
    pixel_m: tuple[float, float], gsd_m: float, sensor: str, what: str, resample: bool
) -> tuple[float, float] | None:
    """How imagery of ``pixel_m`` (x, y metres) is read for a sensor of ``gsd_m`` metres.

    Returns ``None`` when it is used as is (within :data:`GSD_SAME`, or within :data:`GSD_WARN`
    with a warning), else, with ``resample``, the (x, y) read scale in input pixels per sensor
    pixel.

    Raises:
        InvalidInputError: more than :data:`GSD_WARN` apart without ``resample``, naming both
            sizes and the two ways out (``field="source"``: the imagery).
    """
    worst = gsd_mismatch(pixel_m, gsd_m)
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
    raise InvalidInputError(
        f"{what}: pixel size {shown} but sensor {sensor!r} has a GSD of {gsd_m:g} m "
        f"({worst:.0%} apart). Pass {{resample}} to read windows resampled to {gsd_m:g} m, "
        f"or use a sensor at the imagery's GSD (spec.with_gsd({pixel_m[0]:g})).",
        field="source",
        settings={"resample": True},
    )


def resampling_for(out_res_m: tuple[float, float], native_res_m: tuple[float, float]) -> str:
    """The rasterio resampling name for reading pixels of ``native_res_m`` at ``out_res_m``
    (x, y metres): ``average`` when the output is coarser along either axis, so that every
    input pixel counts and nothing aliases; ``bilinear`` for a sub-pixel shift or up-sampling."""
    return "average" if any(out > native * (1 + 1e-6) for out, native in zip(out_res_m, native_res_m)) else "bilinear"


def read_window(
    dataset: Any, window: tuple[float, float, float, float], out_shape: tuple[int, int] | None = None,
    resampling: str = "nearest",
) -> np.ndarray:
    """Pixels of an open rasterio ``dataset`` in ``window`` (column offset, row offset, width,
    height; input pixels, fractions allowed), every band, resampled to ``out_shape`` (height,
    width) with the rasterio ``resampling`` method when given: C x H x W in the file's dtype."""
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    if out_shape is None:
        return dataset.read(window=Window(*window))
    return dataset.read(window=Window(*window), out_shape=(dataset.count, *out_shape), resampling=Resampling[resampling])


def available_memory() -> int | None:
    """Bytes of memory this process could still allocate without swapping: psutil's estimate
    where it is installed, else Linux's ``MemAvailable``, else the machine's physical memory (an
    upper bound); ``None`` where none of them can be read."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def check_fits_in_memory(
    shape: tuple[int, ...], dtype: Any, what: str, extra_bytes_per_value: int = 0, hint: str = "", field: str | None = None,
) -> None:
    """Refuse, before anything is read, an array of ``shape`` and ``dtype`` that would not fit in
    the memory available now (:func:`available_memory`), counting ``extra_bytes_per_value`` more
    per value for the copies the caller will make (4 for a float32 copy). Nothing is refused where
    the available memory cannot be read.

    Raises:
        InvalidInputError: naming ``what``, its shape, the bytes needed and available, and ``hint``
            (what to do instead); ``field=field``.
    """
    values = math.prod(shape)
    itemsize = np.dtype(dtype).itemsize
    needed = values * (itemsize + extra_bytes_per_value)
    available = available_memory()
    if available is None or needed <= available:
        return
    shown = " x ".join(map(str, shape))
    used = f" and {_gib(needed)} with the copies made to use them" if extra_bytes_per_value else ""
    raise InvalidInputError(
        f"{what}: {shown} values of {np.dtype(dtype).name} take {_gib(values * itemsize)} once read{used}, more "
        f"than the {_gib(available)} of memory available now; refused before reading it." + (f" {hint}" if hint else ""),
        field=field,
    )


def read_raster(
    path: str | os.PathLike[str], purpose: str = "Reading GeoTIFF/JP2 files", *, extra_bytes_per_value: int = 0,
    too_large: str = "", field: str | None = None,
) -> np.ndarray:
    """Every band of the raster at ``path``, C x H x W in its own dtype.

    Args:
        extra_bytes_per_value: bytes the caller will add per value (4 for a float32 copy), counted
            when checking that the raster fits in memory (:func:`check_fits_in_memory`).
        too_large: what to do instead when it does not fit, said in the error.
        field: the argument that gave ``path``, carried by the errors about its contents.

    Raises:
        FileNotFoundError: no such file.
        OSError: a truncated or damaged file, named (GDAL's own message names none).
        InvalidInputError: a raster whose declared size would not fit in the memory available,
            refused before any pixel is read.
    """
    rasterio = import_rasterio(purpose)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        with quiet_georef(), rasterio.open(path) as src:
            widest = max(src.dtypes, key=lambda name: np.dtype(name).itemsize)
            check_fits_in_memory((src.count, src.height, src.width), widest, str(path), extra_bytes_per_value, too_large, field)
            return src.read()
    except (OSError, rasterio.errors.RasterioError) as err:
        raise OSError(f"{path}: cannot read it ({type(err).__name__}: {err}); is the file truncated or damaged?") from err
