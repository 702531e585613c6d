"""The unit contract between imagery and a sensor: what a sensor's values measure
(:attr:`SensorSpec.units <xstars_models.sensors.SensorSpec>`), and a check that catches imagery in
the wrong units before it is embedded.

The usual mistakes give values that cannot be the sensor's digital numbers (DN): 16-bit
reflectance (0-10000) fed to an 8-bit sensor (0-255), or values already divided by 255 or 1e4
(floats in 0-1) where digital numbers are expected. A model embeds such inputs without complaint
and returns meaningless features, so they are refused with an error naming the expected units.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .errors import ConfigError, InvalidInputError

__all__ = ["UNITS", "UnitsSpec", "check_units_token", "check_value_range", "expected_input"]


class UnitsSpec(Protocol):
    """What the unit contract reads of a :class:`~xstars_models.sensors.SensorSpec` (a protocol,
    so that this module, which ``sensors`` imports, needs nothing from it)."""

    @property
    def name(self) -> str: ...

    @property
    def units(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def scale(self) -> float: ...

    @property
    def offset(self) -> float: ...

    @property
    def value_range(self) -> tuple[float, float] | None: ...


# What ``value * scale + offset`` measures, by the token stored in SensorSpec.units.
UNITS = {
    "display": "8-bit display brightness (true-colour composite or photo), 0-1",
    "toa_reflectance": "top-of-atmosphere reflectance, 0-1",
    "surface_reflectance": "surface reflectance, 0-1",
    "radiance": "at-sensor radiance, W m-2 sr-1 um-1",
    "unspecified": "not stated",
}

# Float inputs may undershoot zero by this many DN (resampling of dark pixels) before they are
# taken to be in other units.
_NEGATIVE_SLACK_DN = 1.0


def expected_input(spec: UnitsSpec) -> str:
    """What ``spec`` expects, in words: ``uint8 digital numbers 0-255 (DN x 0.00392157 = 8-bit
    display brightness ..., 0-1)``."""
    meaning = UNITS.get(spec.units, spec.units)
    if spec.value_range is None:
        return f"float32 values in physical units ({meaning})"
    low, high = spec.value_range
    conversion = f"DN x {spec.scale:g}" + (f" {spec.offset:+g}" if spec.offset else "")
    return f"{spec.dtype} digital numbers {low}-{high} ({conversion} = {meaning})"


def check_value_range(
    values: np.ndarray | torch.Tensor,
    spec: UnitsSpec,
    what: str,
    valid: np.ndarray | None = None,
    *,
    field: str | None = None,
) -> None:
    """Refuse floating-point ``values`` that cannot be ``spec``'s digital numbers.

    Integer inputs are checked by their data type elsewhere; float inputs of a sensor with float32
    digital numbers have no known range and pass. ``valid`` (broadcastable to ``values``) marks the
    pixels to look at, e.g. all but nodata; NaN and infinite values are ignored here. ``field``
    is the caller's argument that carried ``values`` (``"images"``, ``"source"``), for the error.

    Raises:
        InvalidInputError: values above the data type's range, below zero by more than one DN for
            unsigned types, or all within [-1, 1] with fractions (already scaled or normalised),
            naming the expected units and the conversion.
    """
    if spec.value_range is None or not _is_float(values):
        return
    # bfloat16 has no NumPy type; float32 holds every value of the narrower float types exactly.
    array = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if valid is not None:
        array = array[np.broadcast_to(valid, array.shape)]
    array = array[np.isfinite(array)]
    if array.size == 0:
        return
    low, high = spec.value_range
    smallest, largest = float(array.min()), float(array.max())
    expected = f"Sensor {spec.name!r} expects {expected_input(spec)}"
    if largest > high:
        raise InvalidInputError(
            f"{what}: values up to {largest:g} exceed {high}. {expected}. Is this imagery of another "
            f"bit depth (e.g. 16-bit reflectance for an 8-bit sensor)? Use a sensor whose dtype and "
            "scale match it, or convert it to the sensor's digital numbers.",
            field=field,
        )
    if smallest < low - (_NEGATIVE_SLACK_DN if low == 0 else 0):
        raise InvalidInputError(
            f"{what}: values down to {smallest:g} are below {low}. {expected}; negative values suggest "
            "imagery that is already normalised (mean/std): pass the raw digital numbers, the model "
            "normalises them itself.",
            field=field,
        )
    if largest <= 1.0 and smallest >= -1.0 and high > 1 and bool((array != np.floor(array)).any()):
        raise InvalidInputError(
            f"{what}: float values within [{smallest:g}, {largest:g}] look already scaled or normalised. "
            f"{expected}: multiply scaled values by {1 / spec.scale:g}"
            + (f" after subtracting {spec.offset:g}" if spec.offset else "")
            + " to get digital numbers.",
            field=field,
        )


def _is_float(values: np.ndarray | torch.Tensor) -> bool:
    if isinstance(values, torch.Tensor):
        return values.is_floating_point()
    return np.asarray(values).dtype.kind == "f"


def check_units_token(units: str, sensor: str) -> None:
    """Refuse a ``units`` token outside :data:`UNITS` (:class:`~.errors.ConfigError`, ``field="units"``)."""
    if units not in UNITS:
        raise ConfigError(
            f"Sensor {sensor!r}: units {units!r} is not one of {sorted(UNITS)} (what value * scale + "
            "offset measures; 'unspecified' if unknown).",
            field="units",
        )
