"""Devices are checked once, before any work (xstars_models.devices.check_device): the kinds the
package computes on are accepted, anything else, and a device this machine lacks, is an
InvalidOptionError naming the value and what to use, in every place a device enters the API."""

from __future__ import annotations

import pytest
import torch
from factories import rgb_images, tiny_model
from toy_data import ToyPairs

from xstars_models import XStars, get_sensor
from xstars_models.devices import check_device
from xstars_models.errors import InvalidOptionError, InvalidTypeError
from xstars_models.scenes import SceneOptions
from xstars_models.training import TrainConfig, adapt, pretrain


@pytest.fixture()
def no_cuda(monkeypatch):
    """A machine without a usable CUDA device, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture()
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as the check can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"])
def test_the_cpu_is_accepted_as_a_torch_device(device):
    assert check_device(device).type == "cpu"
    assert isinstance(check_device(device), torch.device)


def test_cuda_devices_that_exist_are_accepted(two_gpus):
    assert check_device("cuda") == torch.device("cuda")
    assert check_device("cuda:1") == torch.device("cuda", 1)
    assert check_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert check_device(1) == torch.device("cuda", 1)  # torch's shorthand


@pytest.mark.parametrize("device", ["banana", "CUDA", "", "cuda:x", "cuda:-1"])
def test_strings_that_are_no_device_are_refused_with_the_kinds_that_are(device):
    with pytest.raises(InvalidOptionError) as info:
        check_device(device)
    assert info.value.field == "device"
    assert str(info.value).startswith(f"device={device!r} is not a device")
    assert "'cpu', 'cuda', 'cuda:N'" in str(info.value) and "'mps'" in str(info.value)


def test_meta_and_other_device_types_are_refused():
    with pytest.raises(InvalidOptionError, match=r"^device='meta': meta tensors have shapes but no data") as info:
        check_device("meta")
    assert info.value.field == "device"
    with pytest.raises(InvalidOptionError, match=r"^device='xpu': xstars_models computes on 'cpu', 'cuda\[:N\]' or 'mps'"):
        check_device("xpu")


@pytest.mark.parametrize("device", [1.5, None, True, ["cpu"]])
def test_values_of_other_types_are_a_type_error(device):
    with pytest.raises(InvalidTypeError) as info:
        check_device(device)
    assert info.value.field == "device" and isinstance(info.value, TypeError)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 3)])
def test_cuda_without_a_cuda_device_says_so_and_names_the_cpu(no_cuda, device):
    with pytest.raises(InvalidOptionError) as info:
        check_device(device)
    shown = str(device)
    assert info.value.field == "device"
    assert str(info.value).startswith(f"device={shown!r}: ")
    assert "torch.cuda.is_available() is False" in str(info.value) or "built without CUDA" in str(info.value)
    assert str(info.value).endswith("use 'cpu' instead.")


def test_a_torch_without_cuda_is_named(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(InvalidOptionError, match=r"this torch was built without CUDA \(torch.version.cuda is None\)"):
        check_device("cuda")


def test_a_cuda_index_past_the_last_device_names_the_ones_there_are(two_gpus):
    with pytest.raises(InvalidOptionError) as info:
        check_device("cuda:2")
    assert info.value.field == "device"
    assert str(info.value) == "device='cuda:2': this machine has 2 CUDA devices (cuda:0 to cuda:1); use one of them or 'cpu'."


def test_mps_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InvalidOptionError, match=r"^device='mps': MPS .* is not available on this machine") as info:
        check_device("mps")
    assert info.value.field == "device"


def test_the_error_names_the_argument_it_came_from():
    with pytest.raises(InvalidOptionError) as info:
        check_device("banana", field="map_location")
    assert info.value.field == "map_location" and str(info.value).startswith("map_location='banana' is not a device")


# Every place a device enters the API refuses it before any work.


@pytest.mark.parametrize("device", ["banana", "meta"])
def test_scene_options_refuse_the_device(device):
    with pytest.raises(InvalidOptionError) as info:
        SceneOptions(device=device)
    assert info.value.field == "device" and f"device={device!r}" in str(info.value)


def test_scene_options_refuse_cuda_without_it(no_cuda):
    with pytest.raises(InvalidOptionError, match="no CUDA device") as info:
        SceneOptions(device="cuda")
    assert info.value.field == "device"


def test_embed_refuses_a_device_before_moving_the_model(no_cuda):
    model = tiny_model(extra_sensors=())
    for device in ("cuda", "meta", "banana"):
        with pytest.raises(InvalidOptionError) as info:
            model.embed(rgb_images(1), "sentinel2_rgb", device=device, progress=False)
        assert info.value.field == "device"
        assert model.device == torch.device("cpu")
    assert model.embed(rgb_images(1), "sentinel2_rgb", device="cpu", progress=False, precision="fp32").shape == (1, 32)


def test_resolve_precision_refuses_the_device():
    with pytest.raises(InvalidOptionError) as info:
        tiny_model(extra_sensors=()).resolve_precision("fp32", device="meta")
    assert info.value.field == "device"


def test_from_pretrained_refuses_the_map_location_before_reading(tmp_path, no_cuda):
    # The folder does not exist: the device is refused before the model is even looked for.
    with pytest.raises(InvalidOptionError) as info:
        XStars.from_pretrained(tmp_path / "absent", map_location="cuda:1")
    assert info.value.field == "map_location" and "map_location='cuda:1'" in str(info.value)


@pytest.mark.parametrize("device", ["banana", "meta"])
def test_training_refuses_the_device_before_any_run_folder_is_made(tmp_path, device):
    config = TrainConfig(steps=1, batch_size=2, dino_out_dim=16, local_crops=1)
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    with pytest.raises(InvalidOptionError) as info:
        adapt(
            tiny_model(extra_sensors=()), new, ToyPairs(4), config=config, out_dir=tmp_path / "a", device=device,
            progress=False,
        )
    assert info.value.field == "device"
    with pytest.raises(InvalidOptionError) as info:
        pretrain(tiny_model(extra_sensors=()), ToyPairs(4), config=config, out_dir=tmp_path / "p", device=device, progress=False)
    assert info.value.field == "device"
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()
