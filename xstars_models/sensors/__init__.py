"""Sensor specifications: which bands a sensor has, at what ground sampling distance, and how its
raw values become the normalised numbers an encoder sees.

Every model stores the full :class:`SensorSpec` of each sensor it knows in its ``config.json``;
the built-ins here are a convenience for making new models and for naming sensors on the command
line.
"""

from __future__ import annotations

import difflib

from ..errors import InvalidOptionError
from .spec import Band, SensorSpec

__all__ = [
    "Band",
    "SensorSpec",
    "get_sensor",
    "list_sensors",
    "register_sensor",
]

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
    """Make ``spec`` available by name to :func:`get_sensor` and the command line.

    Raises:
        InvalidOptionError: another spec of that name is registered (``field="spec"``).
    """
    if spec.name in _BUILTINS and not overwrite and _BUILTINS[spec.name] != spec:
        raise InvalidOptionError(
            f"A different sensor named {spec.name!r} is already registered; "
            "pass {overwrite} to replace it.",
            field="spec",
            settings={"overwrite": True},
        )
    _BUILTINS[spec.name] = spec
    return spec


def get_sensor(name: str) -> SensorSpec:
    """A registered sensor by name.

    Raises:
        InvalidOptionError: no such sensor (``field="sensor"``); the message lists close matches.
    """
    try:
        return _BUILTINS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_BUILTINS), n=3, cutoff=0.4)
        hint = f" Did you mean {close}?" if close else ""
        raise InvalidOptionError(
            f"Unknown sensor {name!r}.{hint} Known sensors: {sorted(_BUILTINS)}.", field="sensor"
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
