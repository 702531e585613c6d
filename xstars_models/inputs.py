"""Turn whatever imagery a user has (NumPy, PIL, torch; HWC or CHW; one image or a batch) into a
float32 B x C x H x W tensor of the sensor's digital numbers, checked against its :class:`SensorSpec`.

Normalisation is *not* done here: the model's per-sensor input stem does it, once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import InvalidInputError, InvalidOptionError, InvalidTypeError, user_stacklevel
from .sensors import SensorSpec
from .units import check_value_range

__all__ = ["ImageInput", "band_order", "check_token_count", "dn_tensor", "to_batch", "trim_to_patches"]

ImageInput = Any  # np.ndarray | torch.Tensor | PIL.Image.Image | a sequence of those

_FLOAT_DTYPES = {np.dtype("float16"), np.dtype("float32"), np.dtype("float64")}
_NUMPY_DTYPE_NAMES = {
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.uint16: "uint16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.bfloat16: "float32",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bool: "bool",
}


def _as_array(image: Any, sensor: str) -> tuple[np.ndarray | torch.Tensor, str]:
    """The image as an array-like plus the library it came from (decides HWC vs CHW ties)."""
    if isinstance(image, torch.Tensor):
        return image.detach(), "torch"
    if isinstance(image, np.ndarray):
        return image, "numpy"
    from PIL import Image  # a hard dependency, imported only when an image is not an array

    if isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        return array, "numpy"
    raise InvalidTypeError(
        f"Sensor {sensor!r}: images must be numpy arrays, torch tensors or PIL images "
        f"(or a list of them), got {type(image).__name__}.",
        field="images",
    )


def _dtype_name(array: np.ndarray | torch.Tensor) -> str:
    if isinstance(array, torch.Tensor):
        return _NUMPY_DTYPE_NAMES.get(array.dtype, str(array.dtype))
    return array.dtype.name


def _check_dtype(dtype: str, spec: SensorSpec) -> None:
    if np.dtype(dtype) in _FLOAT_DTYPES:
        return
    if spec.dtype == "float32":
        raise InvalidInputError(
            f"Sensor {spec.name!r} expects floating-point values in physical units, got {dtype}.", field="images"
        )
    if dtype != spec.dtype:
        raise InvalidInputError(
            f"Sensor {spec.name!r} expects {spec.dtype} digital numbers (values scaled by "
            f"{spec.scale:g} to the statistics' scale), got {dtype}. Convert the imagery to "
            f"{spec.dtype}, pass float values in the same units, or use a sensor spec whose "
            "dtype and scale match your data.",
            field="images",
        )


def _to_chw(
    array: np.ndarray | torch.Tensor, origin: str, spec: SensorSpec, layout: str | None
) -> np.ndarray | torch.Tensor:
    """Put channels first for a 3-D image (H, W, C) or (C, H, W)."""
    n = spec.num_bands
    if layout is None:
        first, last = array.shape[0] == n, array.shape[-1] == n
        if first and last:
            # A 3 x W x 3 image is ambiguous; follow each library's own convention.
            layout = "CHW" if origin == "torch" else "HWC"
        elif first:
            layout = "CHW"
        elif last:
            layout = "HWC"
        else:
            raise InvalidInputError(
                f"Sensor {spec.name!r} has {n} bands {list(spec.band_names)}, but neither the "
                f"first nor the last axis of an image of shape {tuple(array.shape)} has size {n}. "
                "Pass images as H x W x C or C x H x W with one channel per band.",
                field="images",
            )
    if layout not in ("CHW", "HWC"):
        raise InvalidOptionError(f"layout must be 'CHW', 'HWC' or None (guess), got {layout!r}.", field="layout")
    if layout == "HWC":
        array = array.permute(2, 0, 1) if isinstance(array, torch.Tensor) else array.transpose(2, 0, 1)
    if array.shape[0] != n:
        raise InvalidInputError(
            f"Sensor {spec.name!r} expects {n} bands {list(spec.band_names)}; an image given as "
            f"{layout} has shape {tuple(array.shape)} ({array.shape[0]} channels).",
            field="images",
        )
    return array


def band_order(spec: SensorSpec, bands: Sequence[str] | None, *, field: str = "bands") -> list[int] | None:
    """Indexes that reorder channels given in the order ``bands`` (names or aliases) into the
    sensor's order; ``None`` for ``bands=None`` (already in order).

    Args:
        field: the caller's name for ``bands``, which its errors carry.

    Raises:
        InvalidOptionError: an unknown name, a band named twice, or one of the sensor's bands missing.
    """
    if bands is None:
        return None
    positions = [spec.band_index(b, field=field) for b in bands]
    if len(set(positions)) != len(positions):
        raise InvalidOptionError(f"Sensor {spec.name!r}: band names {list(bands)} name a band twice.", field=field)
    missing = [spec.band_names[i] for i in range(spec.num_bands) if i not in positions]
    if missing:
        raise InvalidOptionError(
            f"Sensor {spec.name!r} needs bands {list(spec.band_names)}; {missing} missing from "
            f"the given band names {list(bands)}.",
            field=field,
        )
    # channel k of the input is band positions[k]; we want channel j = band j.
    return [positions.index(j) for j in range(spec.num_bands)]


def _check_values(batch: torch.Tensor, spec: SensorSpec) -> None:
    finite = torch.isfinite(batch)
    if not bool(finite.all()):
        bad = (~finite).flatten(2).any(-1)  # B x C
        image, band = (int(v) for v in bad.nonzero()[0])
        raise InvalidInputError(
            f"Sensor {spec.name!r}: image {image}, band {spec.band_names[band]!r} contains NaN "
            "or infinite values. Replace missing pixels with the sensor's nodata value "
            f"({spec.nodata}) or crop them out.",
            field="images",
        )


def to_batch(
    images: ImageInput,
    spec: SensorSpec,
    patch_size: int,
    bands: Sequence[str] | None = None,
    layout: str | None = None,
) -> torch.Tensor:
    """Validate ``images`` against ``spec`` and stack them into a float32 B x C x H x W tensor.

    Args:
        images: one image (2-D only for single-band sensors, 3-D) or a batch (4-D array/tensor,
            or a list of equally sized images). Values are the sensor's digital numbers in
            ``spec.dtype`` (or floats in the same units).
        spec: the sensor the imagery comes from.
        patch_size: the model's patch size in pixels for this sensor; smaller images are rejected.
        bands: the band names (or aliases) of the input channels, in order, when they are not
            the spec's order; channels are reordered to the spec's order.
        layout: ``"CHW"`` or ``"HWC"`` to override the guess from the band count.

    Raises:
        InvalidInputError: wrong band count, wrong dtype or units, NaN/inf, an image smaller than
            one patch, or images of different sizes in one list (``field="images"``).
        InvalidOptionError: an unknown or missing band name (``"bands"``), a bad ``layout``.
        InvalidTypeError: an image that is not an array, tensor or PIL image.
    """
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        array, _ = _as_array(images, spec.name)
        items = list(array) if array.ndim == 4 else [images]
    if not items:
        raise InvalidInputError(f"Sensor {spec.name!r}: got an empty batch of images.", field="images")
    chw = [_single_chw(image, spec, layout, i) for i, image in enumerate(items)]
    sizes = {tuple(item.shape[1:]) for item in chw}
    if len(sizes) > 1:
        raise InvalidInputError(
            f"Sensor {spec.name!r}: images in one batch must share a size, got sizes (H, W) "
            f"{sorted(sizes)}. Embed them in separate calls.",
            field="images",
        )
    batch = torch.stack(chw)
    order = band_order(spec, bands)
    if order is not None:
        batch = batch[:, order]
    _check_values(batch, spec)
    height, width = batch.shape[-2:]
    if height < patch_size or width < patch_size:
        raise InvalidInputError(
            f"Sensor {spec.name!r}: images of {height} x {width} px are smaller than one patch "
            f"({patch_size} x {patch_size} px = {patch_size * spec.gsd_m:g} m at {spec.gsd_m:g} m GSD).",
            field="images",
        )
    return batch


def _single_chw(image: Any, spec: SensorSpec, layout: str | None, index: int) -> torch.Tensor:
    array, origin = _as_array(image, spec.name)
    _check_dtype(_dtype_name(array), spec)
    check_value_range(array, spec, f"image {index}", field="images")
    if array.ndim == 2:
        if spec.num_bands != 1:
            raise InvalidInputError(
                f"Sensor {spec.name!r} expects {spec.num_bands} bands; image {index} is 2-D "
                f"{tuple(array.shape)} (a single band).",
                field="images",
            )
        array = array[None]
    elif array.ndim != 3:
        raise InvalidInputError(
            f"Sensor {spec.name!r}: image {index} has shape {tuple(array.shape)}; expected "
            "H x W x C or C x H x W (or a 4-D batch).",
            field="images",
        )
    return _to_tensor(_to_chw(array, origin, spec, layout))


def _to_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(torch.float32)
    return dn_tensor(np.ascontiguousarray(array)).to(torch.float32)


def dn_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` for digital numbers of any storage type, sharing memory where it can:
    uint16, which torch supports only in part, is widened to int32 (exact)."""
    if array.dtype == np.uint16:
        array = array.astype(np.int32)
    return torch.from_numpy(array)


def check_token_count(batch: torch.Tensor, patch_size: int, sensor: str, max_tokens: int | None) -> None:
    """Refuse images of more than ``max_tokens`` patches of ``patch_size`` px, pointing at ``embed_scene``.

    Raises:
        InvalidInputError: ``field="images"``; its ``settings`` hold ``max_tokens``.
    """
    rows, cols = (side // patch_size for side in batch.shape[-2:])
    if max_tokens is not None and rows * cols > max_tokens:
        height, width = batch.shape[-2:]
        raise InvalidInputError(
            f"Sensor {sensor!r}: an image of {height} x {width} px is {rows} x {cols} = {rows * cols} tokens, more "
            "than {max_tokens}; one pass over it needs memory and time that grow with the square of "
            f"the token count. Embed a whole scene tile by tile with bounded memory: "
            f"model.embed_scene(image_or_geotiff, {sensor!r}, out=...) or `xstars embed-scene`; or pass "
            "max_tokens=None to embed it in one pass anyway.",
            field="images",
            settings={"max_tokens": max_tokens},
        )


def trim_to_patches(batch: torch.Tensor, patch_size: int, sensor: str) -> torch.Tensor:
    """``batch`` cut to whole patches of ``patch_size`` px (bottom rows and right columns dropped, with a warning)."""
    p = patch_size
    height, width = batch.shape[-2:]
    keep_h, keep_w = height - height % p, width - width % p
    if (keep_h, keep_w) != (height, width):
        warnings.warn(
            f"Sensor {sensor!r}: {height} x {width} px is not a multiple of the {p} px patch; "
            f"the last {height - keep_h} rows and {width - keep_w} columns are not embedded.",
            stacklevel=user_stacklevel(),
        )
    return batch[..., :keep_h, :keep_w]
