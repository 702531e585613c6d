"""SensorSpec: built-ins, validation with clear messages, views and serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from xstars_models import Band, SensorSpec, get_sensor, list_sensors, register_sensor
from xstars_models import sensors as sensors_module
from xstars_models.errors import ConfigError, InvalidOptionError


def test_builtins_cover_the_sensors_and_official_normalisation():
    assert {"sentinel2", "sentinel2_rgb", "landsat8", "landsat8_rgb", "spot67", "spot67_rgb", "aerial_rgb", "aerial_rgbn"} <= set(list_sensors())
    s2 = get_sensor("sentinel2")
    assert s2.num_bands == 13 and s2.gsd_m == 10.0 and s2.dtype == "uint16" and s2.scale == 1e-4
    assert s2.band_names[s2.band_index("B8A")] == "nir08" and s2.bands[s2.band_index("swir22")].center_um == pytest.approx(2.19)
    rgb = get_sensor("sentinel2_rgb")
    assert rgb.band_names == ("red", "green", "blue")
    assert rgb.mean == (0.1432, 0.1452, 0.0923) and rgb.std == (0.1324, 0.1033, 0.0817)
    assert get_sensor("landsat8_rgb").mean == (0.2706, 0.2784, 0.1806)
    assert get_sensor("spot67_rgb").std == (0.1671, 0.1429, 0.1630)
    assert get_sensor("landsat8").offset == -0.2 and get_sensor("spot67").gsd_m == 1.5
    assert get_sensor("aerial_rgbn").band_names[-1] == "nir"


def test_round_trip_and_views():
    spec = get_sensor("sentinel2")
    assert SensorSpec.from_dict(spec.to_dict()) == spec
    view = spec.select(["B04", "green", "blue"], name="s2_rgb_reflectance")
    assert view.band_names == ("red", "green", "blue") and view.scale == 1e-4 and view.name == "s2_rgb_reflectance"
    assert get_sensor("aerial_rgb").with_gsd(0.2).gsd_m == 0.2


@pytest.mark.parametrize(
    "change, field, message",
    [
        (dict(gsd_m=0), "gsd_m", r"GSD 0 m must be > 0"),
        (dict(dtype="int64"), "dtype", r"dtype 'int64' is not one of"),
        (dict(name="bad name"), "name", r"Sensor name 'bad name'"),
        (dict(bands=()), "bands", r"has no bands"),
        (dict(scale=0), "scale", r"scale must be non-zero"),
        (dict(units="kelvin"), "units", r"units 'kelvin' is not one of"),
    ],
)
def test_invalid_specs(change, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        dataclasses.replace(get_sensor("sentinel2_rgb"), **change)
    assert info.value.field == field


def test_band_checks():
    with pytest.raises(ConfigError, match=r"665 is not in micrometres .*665 nm is 0.665") as info:
        Band("red", 665, 0.03, 0.1, 0.1)
    assert info.value.field == "center_um"
    with pytest.raises(ConfigError, match="std 0 must be > 0") as info:
        Band("red", 0.665, 0.03, 0.1, 0)
    assert info.value.field == "std"
    bands = (Band("red", 0.665, 0.03, 0.1, 0.1), Band("red", 0.56, 0.03, 0.1, 0.1))
    with pytest.raises(ConfigError, match=r"band names repeated: \['red'\]") as info:
        SensorSpec("dup", bands, 10.0)
    assert info.value.field == "bands"
    with pytest.raises(ConfigError, match=r"Sensor spec has unknown fields \['colour'\]") as info:
        SensorSpec.from_dict({**get_sensor("sentinel2_rgb").to_dict(), "colour": 1})
    assert info.value.field == "colour"


def test_spec_errors_name_the_dotted_field_and_the_file(tmp_path):
    data = get_sensor("sentinel2_rgb").to_dict()
    data["bands"][1]["std"] = 0
    with pytest.raises(ConfigError, match="std 0 must be > 0") as info:
        SensorSpec.from_dict(data)
    assert info.value.field == "bands.1.std"
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"spec\.json: Band 'green': std 0 must be > 0") as info:
        SensorSpec.from_json(path)
    assert info.value.field == "bands.1.std"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"spec\.json: not valid JSON") as info:
        SensorSpec.from_json(path)
    assert info.value.field is None


def test_unknown_band_names_the_argument_that_gave_it():
    spec = get_sensor("sentinel2")
    with pytest.raises(InvalidOptionError, match=r"has no band 'B13'; its bands are \['coastal \(B01\)'") as info:
        spec.select(["B04", "B13"])
    assert info.value.field == "bands"
    with pytest.raises(InvalidOptionError) as info:
        spec.band_index("B13", field="model_bands")
    assert info.value.field == "model_bands"


def test_registry_of_sensors(monkeypatch):
    monkeypatch.setattr(sensors_module, "_BUILTINS", dict(sensors_module._BUILTINS))
    with pytest.raises(InvalidOptionError, match=r"Unknown sensor 'sentinel-2'\. Did you mean \['sentinel2'") as info:
        get_sensor("sentinel-2")
    assert info.value.field == "sensor"
    custom = get_sensor("aerial_rgb").with_gsd(0.2, name="my_drone")
    assert register_sensor(custom) is custom and get_sensor("my_drone") == custom
    with pytest.raises(InvalidOptionError, match=r"already registered; pass overwrite=True to replace it") as info:
        register_sensor(custom.with_gsd(0.1))
    assert info.value.field == "spec" and info.value.settings == {"overwrite": True}


# The built-in statistics, pinned: a model normalises with them, so a silent edit (two bands swapped,
# a rounding change) would change every embedding of these sensors. (band, mean, std) in the
# sensor's order, reflectance scale.
SENTINEL2_STATS = [
    ("coastal", 0.1613, 0.0791), ("blue", 0.1398, 0.0854), ("green", 0.1322, 0.0879), ("red", 0.1373, 0.1145),
    ("rededge071", 0.1561, 0.1128), ("rededge075", 0.2108, 0.1164), ("rededge078", 0.2391, 0.1276),
    ("nir", 0.2319, 0.1250), ("nir08", 0.2581, 0.1346), ("nir09", 0.0838, 0.0578), ("cirrus", 0.0022, 0.0051),
    ("swir16", 0.2195, 0.1340), ("swir22", 0.1537, 0.1143),
]
LANDSAT8_STATS = [
    ("coastal", 0.060, 0.060), ("blue", 0.075, 0.065), ("green", 0.105, 0.070), ("red", 0.120, 0.090),
    ("nir08", 0.260, 0.110), ("swir16", 0.230, 0.120), ("swir22", 0.160, 0.110),
]


@pytest.mark.parametrize("name, stats, scale, offset", [("sentinel2", SENTINEL2_STATS, 1e-4, 0.0),
                                                        ("landsat8", LANDSAT8_STATS, 2.75e-5, -0.2)])
def test_builtin_multispectral_statistics_are_pinned(name, stats, scale, offset):
    spec = get_sensor(name)
    assert [(b.name, b.mean, b.std) for b in spec.bands] == stats
    assert spec.scale == scale and spec.offset == offset
