"""The pieces the commands are thin layers over, called through the Python API: a TrainConfig
from a JSON object, a sensor spec from a JSON file, pairs from lists of raster files, and the one
default footprint (adapt, eval) and tile (embed_scene)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from factories import tiny_model
from xstars_models import get_sensor
from xstars_models.data import check_raster_gsd, default_footprint_m, pretraining_grid, raster_pairs
from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.scenes.tiling import default_tile
from xstars_models.sensors import SensorSpec
from xstars_models.training import TrainConfig

import rasterio  # noqa: E402  (the test extra installs it; a missing install must fail, not skip)
from affine import Affine  # noqa: E402


# ---- TrainConfig.from_dict ---------------------------------------------------------------------


def test_train_config_from_dict_turns_json_lists_into_tuples_and_whole_numbers_into_floats():
    config = TrainConfig.from_dict(json.loads('{"steps": 7, "lr": 1, "global_scale": [0.5, 1], "precision": "fp32"}'))
    assert config.steps == 7 and config.precision == "fp32"
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    assert config.crops.global_scale == (0.5, 1.0) and type(config.crops.global_scale) is tuple
    assert config.crops.local_scale == (0.05, 0.4)  # left out: the default
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_train_config_from_dict_names_unknown_keys_and_the_source():
    from xstars_models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"run\.json: unknown TrainConfig fields \['bogus', 'stpes'\]; known: .*'steps'") as info:
        TrainConfig.from_dict({"stpes": 3, "bogus": 1, "lr": 0.1}, source="run.json")
    assert info.value.field is None  # two keys at fault
    with pytest.raises(ConfigError, match=r"run\.json: expected a JSON object .* got list"):
        TrainConfig.from_dict([1, 2], source="run.json")  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value, message", [
    ("steps", "2", "field 'steps': expected a whole number >= 0, got '2'"),
    ("steps", True, "field 'steps': expected a whole number >= 0, got True"),
    ("lr", -1, "field 'lr': expected a finite number >= 0, got -1"),
    ("lr", float("nan"), "field 'lr': expected a finite number >= 0, got nan"),
    ("global_scale", [0.5], "field 'global_scale': expected [low, high] area fractions"),
    ("local_scale", [0.6, 0.3], "field 'local_scale': expected [low, high] area fractions"),
    ("share_msad_view", 1, "field 'share_msad_view': expected true or false, got 1"),
    ("precision", 16, "field 'precision': expected a string, got 16"),
])
def test_train_config_from_dict_refuses_bad_values_naming_the_field(field, value, message):
    from xstars_models.errors import ConfigError
    from xstars_models.training.config import FLAT_NAMES

    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({field: value}, source="cfg.json")
    assert str(info.value).startswith("cfg.json: ") and message in str(info.value)
    assert info.value.field == FLAT_NAMES[field]


def test_train_config_from_dict_names_a_field_by_its_own_source():
    from xstars_models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--lr: expected a finite number >= 0, got -1\.0") as info:
        TrainConfig.from_dict({"steps": 3, "lr": -1.0}, source="cfg.json", field_sources={"lr": "--lr"})
    assert info.value.field == "optim.lr"


# ---- SensorSpec.from_json ------------------------------------------------------------------------


def test_sensor_spec_from_json_reads_what_to_dict_wrote(tmp_path):
    spec = get_sensor("aerial_rgb").with_gsd(0.5, name="aerial50cm")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert SensorSpec.from_json(path) == spec
    assert SensorSpec.from_json(str(path)) == spec


def test_sensor_spec_from_json_errors_name_the_file(tmp_path):
    from xstars_models.errors import ConfigError

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON") as info:
        SensorSpec.from_json(broken)
    assert info.value.field is None
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({**get_sensor("sentinel2_rgb").to_dict(), "colour": 1}))
    with pytest.raises(ConfigError, match=r"extra\.json: Sensor spec has unknown fields \['colour'\]") as info:
        SensorSpec.from_json(extra)
    assert info.value.field == "colour"
    listed = tmp_path / "listed.json"
    listed.write_text("[1]")
    with pytest.raises(ConfigError, match=r"listed\.json: expected a JSON object") as info:
        SensorSpec.from_json(listed)
    assert info.value.field is None
    with pytest.raises(FileNotFoundError, match="absent.json"):
        SensorSpec.from_json(tmp_path / "absent.json")


# ---- pairs from lists of raster files ------------------------------------------------------------


def _raster(path, res: float, size: int):
    """A 3-band uint8 raster of ``size`` px at ``res`` m whose top-left corner is (500 000, 4 000 000)
    in UTM 33N: the same 1 280 m square whatever the pixel size when ``res * size`` is 1280."""
    data = (np.arange(3 * size * size).reshape(3, size, size) % 250 + 1).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(res, 0, 500_000, 0, -res, 4_000_000)) as dst:
        dst.write(data)
    return path


def test_raster_pairs_cut_both_sensors_to_the_same_footprint(tmp_path):
    s2 = _raster(tmp_path / "s2.tif", 10.0, 128)
    aerial = _raster(tmp_path / "aerial.tif", 5.0, 256)
    aerial_spec = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    inputs = {"aerial": (aerial_spec, [aerial], None), "sentinel2_rgb": (get_sensor("sentinel2_rgb"), [s2], [3, 2, 1])}
    pairs, description = raster_pairs(inputs, 640.0, None, "all", 0.2, "y")
    assert len(pairs) == 4  # a 1 280 m square holds 2 x 2 windows of 640 m
    item = pairs[0]["images"]
    assert tuple(item["aerial"].shape) == (3, 128, 128) and tuple(item["sentinel2_rgb"].shape) == (3, 64, 64)
    first = np.arange(3 * 128 * 128).reshape(3, 128, 128) % 250 + 1  # the raster's DNs, window (0, 0)
    assert np.array_equal(item["sentinel2_rgb"].numpy(), first[[2, 1, 0], :64, :64].astype(np.float32))
    assert description.startswith("aerial aerial.tif <-> sentinel2_rgb s2.tif: 4 pairs of 640 m (whole area")


def test_raster_pairs_refuse_a_raster_off_its_sensor_gsd_unless_resampled(tmp_path):
    coarse = _raster(tmp_path / "coarse.tif", 20.0, 64)
    s2 = _raster(tmp_path / "s2.tif", 10.0, 128)
    inputs = {"a": (get_sensor("sentinel2_rgb"), [coarse], None), "b": (get_sensor("sentinel2_rgb"), [s2], None)}
    message = r"coarse\.tif: pixel size 20 m but sensor 'a' has a GSD of 10 m \(100% apart\).*resample=True"
    with pytest.raises(InvalidInputError, match=message) as info:
        raster_pairs(inputs, 640.0, None, "all", 0.2, "y")
    assert info.value.field == "inputs" and info.value.settings == {"resample": True}
    with pytest.raises(InvalidInputError, match=message) as info:
        check_raster_gsd(coarse, 10.0, "a")
    assert info.value.field == "path"
    pairs, _ = raster_pairs(inputs, 640.0, None, "all", 0.2, "y", resample=True)
    assert tuple(pairs[0]["images"]["a"].shape) == (3, 64, 64)  # 32 px of 20 m resampled to 64 px of 10 m


# ---- the default footprint -----------------------------------------------------------------------


def test_default_footprint_is_the_pretraining_grid_of_the_sensor_tokens():
    model = tiny_model()  # img_size 64 / patch 8: an 8 x 8 token grid; 80 m tokens for S2 RGB and aerial
    assert pretraining_grid(model) == 8
    assert default_footprint_m(model, "sentinel2_rgb") == 640.0
    assert default_footprint_m(model, "aerial") == 640.0  # 5 m x patch 16: the same ground per token
    assert default_footprint_m(model, "sentinel2_rgb", tokens=4) == 320.0  # adapt's global_tokens
    assert default_tile(model, "sentinel2_rgb") == 64 and default_tile(model, "aerial") == 128
    with pytest.raises(InvalidOptionError, match="tokens must be a whole number >= 1, got 0") as info:
        default_footprint_m(model, "sentinel2_rgb", tokens=0)
    assert info.value.field == "tokens"
    with pytest.raises(ValueError, match="landsat"):
        default_footprint_m(model, "landsat")
