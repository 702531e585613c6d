"""Sensor specifications: which bands a sensor has, at what ground sampling distance, and how its
raw values become the normalised numbers an encoder sees.

Every model stores the full :class:`SensorSpec` of each sensor it knows in its ``config.json``;
the built-ins here are a convenience for making new models and for naming sensors on the command
line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .units import check_units_token

__all__ = [
    "Band",
    "SensorSpec",
    "get_sensor",
    "list_sensors",
    "register_sensor",
]

# Integer storage types a sensor's digital numbers may come in, and their value ranges.
_INTEGER_DTYPES = {"uint8": (0, 255), "uint16": (0, 65535), "int16": (-32768, 32767)}


@dataclass(frozen=True)
class Band:
    """One spectral band.

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
            raise ValueError("Band name must be a non-empty STAC EO common name such as 'red'.")
        if not 0.2 < self.center_um < 20.0:
            raise ValueError(
                f"Band {self.name!r}: centre wavelength {self.center_um} is not in micrometres "
                "(expected 0.2-20 um; 665 nm is 0.665)."
            )
        if self.width_um <= 0:
            raise ValueError(f"Band {self.name!r}: bandwidth {self.width_um} um must be > 0.")
        if not self.std > 0:
            raise ValueError(f"Band {self.name!r}: std {self.std} must be > 0.")


@dataclass(frozen=True)
class SensorSpec:
    """What a sensor delivers and how to normalise it.

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
            raise ValueError(
                f"Sensor name {self.name!r} must be non-empty and use letters, digits, '_' or '-'."
            )
        object.__setattr__(self, "bands", tuple(self.bands))
        if not self.bands:
            raise ValueError(f"Sensor {self.name!r} has no bands.")
        names = [b.name for b in self.bands]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"Sensor {self.name!r}: band names repeated: {duplicated}.")
        if not self.gsd_m > 0:
            raise ValueError(f"Sensor {self.name!r}: GSD {self.gsd_m} m must be > 0.")
        if self.dtype not in _INTEGER_DTYPES and self.dtype != "float32":
            raise ValueError(
                f"Sensor {self.name!r}: dtype {self.dtype!r} is not one of "
                f"{sorted(_INTEGER_DTYPES) + ['float32']}."
            )
        if self.scale == 0:
            raise ValueError(f"Sensor {self.name!r}: scale must be non-zero.")
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

    def band_index(self, name: str) -> int:
        """Position of a band given by common name or sensor alias (case-insensitive)."""
        key = name.lower()
        for i, band in enumerate(self.bands):
            if band.name.lower() == key or (band.alias is not None and band.alias.lower() == key):
                return i
        known = [b.name if b.alias is None else f"{b.name} ({b.alias})" for b in self.bands]
        raise ValueError(f"Sensor {self.name!r} has no band {name!r}; its bands are {known}.")

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
        """Build a spec from :meth:`to_dict` output, with errors naming the bad field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Sensor spec has unknown fields {unknown}; expected {sorted(known)}.")
        missing = sorted({"name", "bands", "gsd_m"} - set(data))
        if missing:
            raise ValueError(f"Sensor spec is missing fields {missing}.")
        band_fields = {f.name for f in dataclasses.fields(Band)}
        bands = []
        for i, band in enumerate(data["bands"]):
            extra = sorted(set(band) - band_fields)
            if extra:
                raise ValueError(
                    f"Sensor {data['name']!r} band {i}: unknown fields {extra}; "
                    f"expected {sorted(band_fields)}."
                )
            bands.append(Band(**band))
        return cls(**{**data, "bands": tuple(bands)})

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> SensorSpec:
        """Read a spec from a JSON file of :meth:`to_dict`'s fields (``json.dumps(spec.to_dict())``);
        every error names the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of sensor spec fields, got {type(data).__name__}.")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None


# Official X-STARS RGB statistics (MSC-France PNGs, 0-1 scale after /255), in R, G, B order.
_XSTARS_STATS = {
    "sentinel": ((0.1432, 0.1452, 0.0923), (0.1324, 0.1033, 0.0817)),
    "landsat": ((0.2706, 0.2784, 0.1806), (0.1741, 0.1480, 0.1260)),
    "spot": ((0.3101, 0.3487, 0.2399), (0.1671, 0.1429, 0.1630)),
}
_XSTARS_SOURCE = "X-STARS official code (MSC-France 8-bit RGB, 0-1 scale)"
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _rgb(
    centres: tuple[float, float, float],
    widths: tuple[float, float, float],
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    aliases: tuple[str | None, str | None, str | None] = (None, None, None),
) -> tuple[Band, ...]:
    mean, std = stats
    return tuple(
        Band(name, c, w, m, s, a)
        for name, c, w, m, s, a in zip(("red", "green", "blue"), centres, widths, mean, std, aliases)
    )


# Sentinel-2 MSI (S2A) centre wavelengths and widths; mean/std of L1C top-of-atmosphere
# reflectance (DN * 1e-4) over global land, rounded (of the order published for SSL4EO-S12 L1C).
_S2_BANDS = (
    Band("coastal", 0.443, 0.021, 0.1613, 0.0791, "B01"),
    Band("blue", 0.490, 0.066, 0.1398, 0.0854, "B02"),
    Band("green", 0.560, 0.036, 0.1322, 0.0879, "B03"),
    Band("red", 0.665, 0.031, 0.1373, 0.1145, "B04"),
    Band("rededge071", 0.705, 0.015, 0.1561, 0.1128, "B05"),
    Band("rededge075", 0.740, 0.015, 0.2108, 0.1164, "B06"),
    Band("rededge078", 0.783, 0.020, 0.2391, 0.1276, "B07"),
    Band("nir", 0.842, 0.106, 0.2319, 0.1250, "B08"),
    Band("nir08", 0.865, 0.021, 0.2581, 0.1346, "B8A"),
    Band("nir09", 0.945, 0.020, 0.0838, 0.0578, "B09"),
    Band("cirrus", 1.375, 0.031, 0.0022, 0.0051, "B10"),
    Band("swir16", 1.610, 0.091, 0.2195, 0.1340, "B11"),
    Band("swir22", 2.190, 0.175, 0.1537, 0.1143, "B12"),
)

# Landsat-8/9 OLI reflective bands (no 15 m panchromatic, no cirrus); Collection-2 Level-2
# surface reflectance = DN * 2.75e-5 - 0.2. Statistics: global land surface reflectance, rounded.
_OLI_BANDS = (
    Band("coastal", 0.443, 0.016, 0.060, 0.060, "SR_B1"),
    Band("blue", 0.482, 0.060, 0.075, 0.065, "SR_B2"),
    Band("green", 0.561, 0.057, 0.105, 0.070, "SR_B3"),
    Band("red", 0.655, 0.037, 0.120, 0.090, "SR_B4"),
    Band("nir08", 0.865, 0.028, 0.260, 0.110, "SR_B5"),
    Band("swir16", 1.609, 0.085, 0.230, 0.120, "SR_B6"),
    Band("swir22", 2.201, 0.187, 0.160, 0.110, "SR_B7"),
)

_SPOT_CENTRES = (0.660, 0.560, 0.485)
_SPOT_WIDTHS = (0.070, 0.060, 0.070)

_BUILTINS: dict[str, SensorSpec] = {}


def register_sensor(spec: SensorSpec, overwrite: bool = False) -> SensorSpec:
    """Make ``spec`` available by name to :func:`get_sensor` and the command line."""
    if spec.name in _BUILTINS and not overwrite and _BUILTINS[spec.name] != spec:
        raise ValueError(
            f"A different sensor named {spec.name!r} is already registered; "
            "pass overwrite=True to replace it."
        )
    _BUILTINS[spec.name] = spec
    return spec


def get_sensor(name: str) -> SensorSpec:
    """A registered sensor by name; the error lists close matches."""
    try:
        return _BUILTINS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_BUILTINS), n=3, cutoff=0.4)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"Unknown sensor {name!r}.{hint} Known sensors: {sorted(_BUILTINS)}."
        ) from None


def list_sensors() -> list[str]:
    return sorted(_BUILTINS)


register_sensor(
    SensorSpec(
        name="sentinel2",
        bands=_S2_BANDS,
        gsd_m=10.0,
        dtype="uint16",
        scale=1e-4,
        nodata=0,
        units="toa_reflectance",
        description="Sentinel-2 MSI L1C, all 13 bands resampled to 10 m, DN = reflectance x 1e4.",
        normalisation_source="global L1C statistics, rounded (order of SSL4EO-S12)",
    )
)
register_sensor(
    SensorSpec(
        name="sentinel2_rgb",
        bands=_rgb(
            (0.665, 0.560, 0.490), (0.031, 0.036, 0.066), _XSTARS_STATS["sentinel"],
            ("B04", "B03", "B02"),
        ),
        gsd_m=10.0,
        dtype="uint8",
        scale=1.0 / 255.0,
        nodata=None,
        description="Sentinel-2 true-colour composite (B4, B3, B2) as 8-bit imagery, 10 m.",
        normalisation_source=_XSTARS_SOURCE,
    )
)
register_sensor(
    SensorSpec(
        name="landsat8",
        bands=_OLI_BANDS,
        gsd_m=30.0,
        dtype="uint16",
        scale=2.75e-5,
        offset=-0.2,
        nodata=0,
        units="surface_reflectance",
        description="Landsat-8/9 OLI Collection-2 Level-2 surface reflectance, bands 1-7, 30 m.",
        normalisation_source="global surface reflectance statistics, rounded",
    )
)
register_sensor(
    SensorSpec(
        name="landsat8_rgb",
        bands=_rgb(
            (0.655, 0.561, 0.482), (0.037, 0.057, 0.060), _XSTARS_STATS["landsat"],
            ("SR_B4", "SR_B3", "SR_B2"),
        ),
        gsd_m=30.0,
        dtype="uint8",
        scale=1.0 / 255.0,
        nodata=None,
        description="Landsat-8/9 OLI true-colour composite (B4, B3, B2) as 8-bit imagery, 30 m.",
        normalisation_source=_XSTARS_SOURCE,
    )
)
register_sensor(
    SensorSpec(
        name="spot67",
        bands=(
            Band("blue", 0.490, 0.070, 0.2399, 0.1630, "B0"),
            Band("green", 0.560, 0.060, 0.3487, 0.1429, "B1"),
            Band("red", 0.660, 0.070, 0.3101, 0.1671, "B2"),
            Band("nir", 0.825, 0.130, 0.35, 0.15, "B3"),
        ),
        gsd_m=1.5,
        dtype="uint8",
        scale=1.0 / 255.0,
        nodata=None,
        description="SPOT-6/7 pan-sharpened 4-band imagery as 8-bit, 1.5 m.",
        normalisation_source=(
            _XSTARS_SOURCE + " for blue/green/red; nir: rough vegetation-scene estimate"
        ),
    )
)
register_sensor(
    SensorSpec(
        name="spot67_rgb",
        bands=_rgb(_SPOT_CENTRES, _SPOT_WIDTHS, _XSTARS_STATS["spot"]),
        gsd_m=1.5,
        dtype="uint8",
        scale=1.0 / 255.0,
        nodata=None,
        description="SPOT-6/7 pan-sharpened true colour as 8-bit imagery, 1.5 m (MSC-France).",
        normalisation_source=_XSTARS_SOURCE,
    )
)
register_sensor(
    SensorSpec(
        name="aerial_rgb",
        bands=_rgb((0.620, 0.540, 0.460), (0.080, 0.080, 0.080), _IMAGENET),
        gsd_m=0.5,
        dtype="uint8",
        scale=1.0 / 255.0,
        nodata=None,
        description=(
            "Generic 8-bit aerial true colour; set the GSD of your survey with .with_gsd()."
        ),
        normalisation_source="ImageNet RGB statistics (no X-STARS aerial statistics published)",
    )
)
register_sensor(
    SensorSpec(
        name="aerial_rgbn",
        bands=_rgb((0.620, 0.540, 0.460), (0.080, 0.080, 0.080), _IMAGENET)
        + (Band("nir", 0.840, 0.100, 0.45, 0.20),),
        gsd_m=0.5,
        dtype="uint8",
        scale=1.0 / 255.0,
        nodata=None,
        description="Generic 8-bit aerial colour-infrared (R, G, B, NIR); set the GSD with .with_gsd().",
        normalisation_source="ImageNet RGB statistics; nir: rough vegetation-scene estimate",
    )
)
