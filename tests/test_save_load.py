"""save_pretrained / from_pretrained on local folders: round trip, sha256 checks, strict loading,
atomic writes, sensor stems, and plain-timm compatibility of the trunk."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from factories import TINY, rgb_images, tiny_model
from xstars_models import ChecksumError, StateDictMismatchError, XStars, get_sensor
from xstars_models import serialization
from xstars_models.errors import ConfigError


@pytest.fixture()
def saved(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_gives_identical_embeddings(saved):
    model, folder = saved
    assert sorted(os.listdir(folder)) == [
        "config.json", "model.safetensors", "stac-item.json", "stem-aerial.safetensors", "stem-sentinel2.safetensors",
    ]
    loaded = XStars.from_pretrained(folder)
    x = rgb_images(2, 128)
    for sensor in ("sentinel2_rgb", "aerial"):
        assert torch.equal(loaded.embed(x, sensor, output="map"), model.embed(x, sensor, output="map"))
    s2 = np.random.default_rng(0).integers(0, 5000, (1, 13, 32, 32), dtype=np.uint16)
    assert torch.equal(loaded.embed(s2, "sentinel2"), model.embed(s2, "sentinel2"))
    assert loaded.sensors == model.sensors
    assert not loaded.training


def test_saving_twice_gives_identical_bytes(saved, tmp_path):
    model, folder = saved
    again = model.save_pretrained(tmp_path / "again")
    for name in os.listdir(folder):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_config_records_every_weight_file_hash(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    for name in ("model.safetensors", "stem-aerial.safetensors", "stem-sentinel2.safetensors"):
        assert config["files"][name] == {"sha256": _sha(folder / name), "size": (folder / name).stat().st_size}
    assert config["sensors"]["aerial"]["patch_size"] == 16
    assert config["sensors"]["aerial"]["spec"]["gsd_m"] == 5.0


def test_flipped_byte_raises_with_both_hashes(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    expected = _sha(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        XStars.from_pretrained(folder)
    message = str(err.value)
    assert "model.safetensors" in message and expected in message and _sha(path) in message
    assert "Nothing was loaded" in message


def test_truncated_stem_file_is_named(saved):
    _, folder = saved
    path = folder / "stem-aerial.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match=r"stem-aerial.safetensors .*corrupted \(truncated\)"):
        XStars.from_pretrained(folder)


def test_strict_load_reports_a_readable_diff(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["blocks.1.mlp.fc2.bias"]
    tensors["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    tensors["pos_embed"] = torch.zeros(1, 10, 32)
    save_file(tensors, path)
    config = json.loads((folder / "config.json").read_text())
    config["files"]["model.safetensors"] = {"sha256": _sha(path), "size": path.stat().st_size}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(StateDictMismatchError) as err:
        XStars.from_pretrained(folder)
    message = str(err.value)
    assert "missing (1):\n    blocks.1.mlp.fc2.bias" in message
    assert "unexpected (1):\n    blocks.7.attn.qkv.weight" in message
    assert "pos_embed: file (1, 10, 32) vs model (1, 65, 32)" in message


def test_config_without_hash_for_a_weight_file_is_rejected(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    del config["files"]["stem-aerial.safetensors"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"no sha256 recorded for weight files \['stem-aerial.safetensors'\]") as info:
        XStars.from_pretrained(folder)
    assert info.value.field == "files"



def _set(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split("/")
    for key in parents:
        config = config[key]
    config[last] = value


@pytest.mark.parametrize(
    "key, value, field, message",
    [
        ("format_version", 2, "format_version", r"format_version 2 is not supported"),
        ("arch", "resnet18", "arch", r"field 'arch' 'resnet18' is not a timm VisionTransformer"),
        ("arch", "no_such_net", "arch", r"field 'arch' 'no_such_net' is not a timm architecture"),
        ("arch_kwargs/depth", "2", "arch_kwargs.depth", r"field 'arch_kwargs.depth' must be a positive whole number, got '2'"),
        ("arch_kwargs/img_size", [64, 0], "arch_kwargs.img_size", r"'arch_kwargs.img_size' must be a positive whole number"),
        ("sensors/aerial/patch_size", 0, "sensors.aerial.patch_size", r"sensor 'aerial': patch_size must be a positive integer"),
        ("sensors/aerial", {"patch_size": 16}, "sensors.aerial", r"sensor 'aerial': expected \{'spec'"),
        ("primary_sensor", "aerial", "primary_sensor", r"primary_sensor 'aerial' must be the first"),
        ("files/model.safetensors/sha256", "xyz", "files.model.safetensors.sha256", r"file 'model.safetensors': sha256 must be 64"),
        ("files/model.safetensors", {"sha256": "0" * 64}, "files.model.safetensors.size", r"no 'size' recorded"),
    ],
)
def test_malformed_config_json_names_the_key(saved, key, value, field, message):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    _set(config, key, value)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as info:
        XStars.from_pretrained(folder)
    assert info.value.field == field
    assert str(folder / "config.json") in str(info.value)


def test_config_json_that_is_not_json_names_the_file(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON") as info:
        XStars.from_pretrained(folder)
    assert info.value.field is None
    assert str(folder / "config.json") in str(info.value)

def test_interrupted_save_leaves_no_partial_files(tmp_path, monkeypatch):
    model = tiny_model()
    real = serialization.atomic_write_bytes
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(serialization, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "m")
    names = os.listdir(tmp_path / "m")
    assert names == ["model.safetensors"]  # no config.json pointing at missing stems, no temp files


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        serialization.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_add_sensor_picks_patch_size_from_gsd_and_copies_nearest_wavelength():
    from xstars_models.errors import InvalidOptionError

    model = tiny_model(extra_sensors=())
    stem = model.add_sensor(get_sensor("spot67").with_gsd(5.0), init_from="sentinel2_rgb")
    assert stem.patch_size == 16 and stem.token_ground_m == 80.0
    source = model.trunk.patch_embed.proj.weight  # red, green, blue
    target = model.stems["spot67"].proj.weight  # blue, green, red, nir
    resized = timm.layers.resample_patch_embed(source, [16, 16])
    assert torch.allclose(target[:, 0], resized[:, 2]) and torch.allclose(target[:, 2], resized[:, 0])
    assert torch.allclose(target[:, 3], resized[:, 0])  # nir: nearest is red
    with pytest.raises(InvalidOptionError, match=r"80 m, which is 2.667 px, not a whole number") as info:
        model.add_sensor(get_sensor("landsat8"))
    assert info.value.field == "patch_size"
    with pytest.raises(InvalidOptionError, match="already has a sensor named 'spot67'") as info:
        model.add_sensor(get_sensor("spot67").with_gsd(5.0))
    assert info.value.field == "name"


def test_nearest_wavelength_init_gives_same_tokens_for_upsampled_image():
    model = tiny_model(extra_sensors=())
    model.add_sensor(get_sensor("sentinel2_rgb").with_gsd(5.0, name="s2_5m"), init_from="sentinel2_rgb")
    x = rgb_images(1, 64)
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    a = model.embed(x, "sentinel2_rgb", output="map", precision="fp32")
    b = model.embed(up, "s2_5m", output="map", precision="fp32")
    assert torch.allclose(a, b, atol=1e-3)


def test_trunk_weights_load_in_plain_timm(saved):
    model, folder = saved
    plain = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")),
        num_classes=0,
        dynamic_img_size=True,
        **TINY,
    ).eval()
    x = rgb_images(2, 64)
    spec = model.sensors["sentinel2_rgb"].spec
    normed = (torch.from_numpy(x).permute(0, 3, 1, 2).float() * spec.scale - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = plain.forward_features(normed)[:, 0]
    assert torch.allclose(model.embed(x, "sentinel2_rgb", precision="fp32"), expected, atol=1e-5)


def test_saved_folder_loads_in_timm_local_dir_with_no_arguments(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["num_classes"]) == ("vit_tiny_patch16_224", 0)
    assert config["model_args"]["in_chans"] == 3 and config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    trunk = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert trunk.num_classes == 0
    x = rgb_images(2, 64)
    spec = model.sensors["sentinel2_rgb"].spec
    normed = (torch.from_numpy(x).permute(0, 3, 1, 2).float() * spec.scale - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        assert torch.allclose(trunk.forward_features(normed)[:, 0], model.embed(x, "sentinel2_rgb", precision="fp32"), atol=1e-5)


def test_config_without_timm_keys_still_loads(saved):
    # Models saved before config.json carried timm's keys.
    model, folder = saved
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in ("architecture", "num_classes", "model_args", "pretrained_cfg"):
        del config[key]
    path.write_text(json.dumps(config))
    x = rgb_images(1, 64)
    assert torch.equal(XStars.from_pretrained(folder).embed(x, "aerial"), model.embed(x, "aerial"))


def test_safetensors_files_are_byte_identical_for_the_same_tensors_and_metadata(tmp_path):
    from safetensors import safe_open

    from xstars_models.serialization import write_safetensors

    tensors = {f"layer{i}.weight": torch.full((3, 2), float(i)) for i in range(6)}
    metadata = {f"key{i}": f"value {i}" for i in range(8)}  # many keys: safetensors orders them by hash
    records = [write_safetensors(tmp_path / f"{i}.safetensors", tensors, metadata) for i in range(6)]
    assert len({r.sha256 for r in records}) == 1
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", **metadata}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    header_length = int.from_bytes((tmp_path / "0.safetensors").read_bytes()[:8], "little")
    assert header_length % 8 == 0
