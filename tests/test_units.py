"""The unit contract: SensorSpec states what its values measure, and imagery whose values cannot
be the sensor's digital numbers is refused with an error naming the expected units."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from factories import rgb_images, tiny_model
from xstars_models import SensorSpec, get_sensor
from xstars_models.errors import ConfigError, InvalidInputError


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_specs_state_units_machine_readably():
    assert get_sensor("sentinel2").units == "toa_reflectance"
    assert get_sensor("landsat8").units == "surface_reflectance"
    assert get_sensor("sentinel2_rgb").units == "display"
    spec = get_sensor("sentinel2")
    assert spec.to_dict()["units"] == "toa_reflectance" and SensorSpec.from_dict(spec.to_dict()) == spec
    # Specs saved before the field existed: 8-bit imagery is display brightness, else unstated.
    old = {k: v for k, v in spec.to_dict().items() if k != "units"}
    assert SensorSpec.from_dict(old).units == "unspecified"
    assert SensorSpec.from_dict({k: v for k, v in get_sensor("aerial_rgb").to_dict().items() if k != "units"}).units == "display"
    with pytest.raises(ConfigError, match=r"units 'kelvin' is not one of \[.*'toa_reflectance'") as info:
        dataclasses.replace(spec, units="kelvin")
    assert info.value.field == "units"


def test_uint16_reflectance_as_floats_into_an_8bit_sensor_names_the_units(model):
    reflectance = np.random.default_rng(0).uniform(0, 10000, (64, 64, 3)).astype(np.float32)
    with pytest.raises(InvalidInputError, match=r"image 0: values up to 99\d\d(\.\d+)? exceed 255\. Sensor 'sentinel2_rgb' expects uint8 digital numbers 0-255 \(DN x 0\.00392157 = 8-bit display brightness") as info:
        model.embed(reflectance, "sentinel2_rgb")
    assert info.value.field == "images"


def test_zero_one_floats_where_digital_numbers_are_expected(model):
    scaled = rgb_images(1, 64)[0].astype(np.float32) / 255
    with pytest.raises(InvalidInputError, match=r"look already scaled.*uint8 digital numbers 0-255.*multiply scaled values by 255") as info:
        model.embed(scaled, "sentinel2_rgb")
    assert info.value.field == "images"
    s2 = np.random.default_rng(0).uniform(0.0, 0.6, (13, 32, 32)).astype(np.float32)
    with pytest.raises(InvalidInputError, match=r"uint16 digital numbers 0-65535 \(DN x 0\.0001 = top-of-atmosphere reflectance.*multiply scaled values by 10000"):
        model.embed(torch.from_numpy(s2), "sentinel2")
    with pytest.raises(InvalidInputError, match=r"look already scaled") as info:
        model.embed(torch.from_numpy(s2).to(torch.bfloat16), "sentinel2")
    assert info.value.field == "images"


def test_already_normalised_inputs_are_refused(model):
    normed = np.random.default_rng(0).normal(0, 1, (3, 64, 64)).astype(np.float32)
    with pytest.raises(InvalidInputError, match=r"below 0.*already normalised \(mean/std\)") as info:
        model.embed(normed, "sentinel2_rgb")
    assert info.value.field == "images"


def test_plausible_float_digital_numbers_pass(model):
    dn = rgb_images(1, 64)[0]
    # 8-bit values as floats, with slight resampling undershoot, embed like the integers.
    as_float = dn.astype(np.float32)
    assert torch.equal(model.embed(as_float, "sentinel2_rgb"), model.embed(dn, "sentinel2_rgb"))
    as_float[0, 0, 0] = -0.5
    model.embed(as_float, "sentinel2_rgb")
    # A nearly black image of whole DNs is not mistaken for scaled values.
    dark = np.zeros((64, 64, 3), np.float32)
    dark[::2] = 1.0
    model.embed(dark, "sentinel2_rgb")
