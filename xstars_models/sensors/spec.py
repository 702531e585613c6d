"""The description of a sensor: its bands (names, wavelengths, normalisation statistics), ground
sampling distance and digital-number units, as :class:`SensorSpec` (what a model stores in its
``config.json`` for each of its sensors). The built-in sensors and the registry by name are in
:mod:`xstars_models.sensors`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, InvalidOptionError
from ..io.jsonfile import read_json
from ..units import check_units_token

__all__ = ["Band", "SensorSpec"]

# Integer storage types a sensor's digital numbers may come in, and their value ranges.
_INTEGER_DTYPES = {"uint8": (0, 255), "uint16": (0, 65535), "int16": (-32768, 32767)}


@dataclass(frozen=True)
class Band:
    """One spectral band. A bad value raises :class:`~.errors.ConfigError` naming its field.

    Attributes:
        name: STAC EO common name (``red``, ``nir08``, ``swir16``...), unique within a sensor.
        center_um: centre wavelength in micrometres.
        width_um: full width at half maximum in micrometres.
        mean: mean of the band *after* the sensor's value scaling (see :class:`SensorSpec`).
        std: standard deviation of the band after scaling.
        alias: the sensor's own band identifier (``B04``, ``SR_B4``), accepted wherever a band
            name is.
    """

    name: str
    center_um: float
    width_um: float
    mean: float
    std: float
    alias: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("Band name must be a non-empty STAC EO common name such as 'red'.", field="name")
        if not 0.2 < self.center_um < 20.0:
            raise ConfigError(
                f"Band {self.name!r}: centre wavelength {self.center_um} is not in micrometres "
                "(expected 0.2-20 um; 665 nm is 0.665).",
                field="center_um",
            )
        if self.width_um <= 0:
            raise ConfigError(f"Band {self.name!r}: bandwidth {self.width_um} um must be > 0.", field="width_um")
        if not self.std > 0:
            raise ConfigError(f"Band {self.name!r}: std {self.std} must be > 0.", field="std")


@dataclass(frozen=True)
class SensorSpec:
    """What a sensor delivers and how to normalise it. A bad value raises
    :class:`~.errors.ConfigError` naming its field (``"gsd_m"``, ``"bands.2.std"``).

    A raw value ``v`` of band ``k`` becomes ``((v * scale + offset) - bands[k].mean) / bands[k].std``.

    Attributes:
        name: identifier used by models and the command line (``sentinel2_rgb``).
        bands: the bands in the order the encoder expects them.
        gsd_m: ground sampling distance in metres.
        dtype: storage type of the digital numbers (``uint8``, ``uint16``, ``int16``, or
            ``float32`` for data already in physical units). Integer inputs of another type are
            rejected; float inputs are taken to be in the same units as this type.
        scale: multiplier from digital numbers to the scale the statistics are given in
            (``1/255`` for 8-bit imagery, ``1e-4`` for Sentinel-2 L1C reflectance).
        offset: added after ``scale`` (Landsat Collection-2 surface reflectance uses -0.2).
        nodata: digital number marking missing pixels, or ``None``.
        units: what ``value * scale + offset`` measures, one of :data:`xstars_models.units.UNITS`
            (``display``, ``toa_reflectance``, ``surface_reflectance``, ``radiance``,
            ``unspecified``). Left empty: ``display`` for ``uint8``, else ``unspecified``.
        description: free text shown by ``xstars info`` and in model cards.
        normalisation_source: where the mean/std come from.
    """

    name: str
    bands: tuple[Band, ...]
    gsd_m: float
    dtype: str = "uint8"
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    nodata: float | None = None
    description: str = ""
    normalisation_source: str = ""
    units: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(
                f"Sensor name {self.name!r} must be non-empty and use letters, digits, '_' or '-'.", field="name"
            )
        object.__setattr__(self, "bands", tuple(self.bands))
        if not self.bands:
            raise ConfigError(f"Sensor {self.name!r} has no bands.", field="bands")
        names = [b.name for b in self.bands]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(f"Sensor {self.name!r}: band names repeated: {duplicated}.", field="bands")
        if not self.gsd_m > 0:
            raise ConfigError(f"Sensor {self.name!r}: GSD {self.gsd_m} m must be > 0.", field="gsd_m")
        if self.dtype not in _INTEGER_DTYPES and self.dtype != "float32":
            raise ConfigError(
                f"Sensor {self.name!r}: dtype {self.dtype!r} is not one of "
                f"{sorted(_INTEGER_DTYPES) + ['float32']}.",
                field="dtype",
            )
        if self.scale == 0:
            raise ConfigError(f"Sensor {self.name!r}: scale must be non-zero.", field="scale")
        if not self.units:
            # Specs saved before units were recorded: 8-bit imagery is display brightness.
            object.__setattr__(self, "units", "display" if self.dtype == "uint8" else "unspecified")
        check_units_token(self.units, self.name)

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(b.mean for b in self.bands)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(b.std for b in self.bands)

    @property
    def value_range(self) -> tuple[float, float] | None:
        """Range of valid digital numbers for integer sensors, ``None`` for float sensors."""
        return _INTEGER_DTYPES.get(self.dtype)

    def band_index(self, name: str, *, field: str = "bands") -> int:
        """Position of a band given by common name or sensor alias (case-insensitive).

        Raises:
            InvalidOptionError: no such band; ``field`` is the caller's argument that named it.
        """
        key = name.lower()
        for i, band in enumerate(self.bands):
            if band.name.lower() == key or (band.alias is not None and band.alias.lower() == key):
                return i
        known = [b.name if b.alias is None else f"{b.name} ({b.alias})" for b in self.bands]
        raise InvalidOptionError(f"Sensor {self.name!r} has no band {name!r}; its bands are {known}.", field=field)

    def select(self, bands: list[str] | tuple[str, ...], name: str | None = None) -> SensorSpec:
        """A view of this sensor with only ``bands`` (by name or alias), in that order."""
        picked = tuple(self.bands[self.band_index(b)] for b in bands)
        return dataclasses.replace(self, name=name or f"{self.name}_{'_'.join(bands)}", bands=picked)

    def with_gsd(self, gsd_m: float, name: str | None = None) -> SensorSpec:
        """The same sensor at another ground sampling distance (e.g. aerial at 0.2 m)."""
        return dataclasses.replace(self, gsd_m=float(gsd_m), name=name or self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensorSpec:
        """Build a spec from :meth:`to_dict` output.

        Raises:
            ConfigError: with ``field`` the key at fault (``"gsd_m"``, ``"bands.2.std"``).
            TypeError: a value of the wrong type that the fields' own checks do not catch.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Sensor spec has unknown fields {unknown}; expected {sorted(known)}.", field=unknown[0])
        missing = sorted({"name", "bands", "gsd_m"} - set(data))
        if missing:
            raise ConfigError(f"Sensor spec is missing fields {missing}.", field=missing[0])
        band_fields = {f.name for f in dataclasses.fields(Band)}
        bands = []
        for i, band in enumerate(data["bands"]):
            extra = sorted(set(band) - band_fields)
            if extra:
                raise ConfigError(
                    f"Sensor {data['name']!r} band {i}: unknown fields {extra}; "
                    f"expected {sorted(band_fields)}.",
                    field=f"bands.{i}.{extra[0]}",
                )
            try:
                bands.append(Band(**band))
            except ConfigError as err:
                raise ConfigError(*err.args, field=f"bands.{i}.{err.field}", settings=err.settings) from None
        return cls(**{**data, "bands": tuple(bands)})

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> SensorSpec:
        """Read a spec from a JSON file of :meth:`to_dict`'s fields (``json.dumps(spec.to_dict())``);
        every error names the file.

        Raises:
            ConfigError: not JSON (``field`` ``None``), or a bad spec (``field`` the key at fault).
            OSError: the file cannot be read.
        """
        data = read_json(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of sensor spec fields, got {type(data).__name__}.")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err.args[0]}", field=err.field, settings=err.settings) from None
        except (ValueError, TypeError) as err:
            # A value of the wrong type (a string where a number belongs) fails inside the
            # dataclass checks with a builtin error; it still says which file.
            raise ConfigError(f"{path}: {err}") from None
