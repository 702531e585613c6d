"""Saved models load in plain timm with no extra arguments: ``timm.create_model("hf-hub:org/name",
pretrained=True)`` through the real huggingface_hub client against the loopback Hub, and the
model card's timm snippet runs as written. timm's own data pipeline (``resolve_data_config`` +
``create_transform``) keeps a chip its size and normalises it as ``embed`` does, the sensor's
facts reach ``trunk.pretrained_cfg``, and another sensor's stem loads through timm's arguments."""

from __future__ import annotations

import json
import re
import uuid

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from factories import TINY, rgb_images, tiny_model
from xstars_models import XStars, get_model_entry
from xstars_models.config import XStarsConfig


def published(model: XStars, hub_server) -> str:
    repo_id = f"org/timm-{uuid.uuid4().hex[:8]}"
    model.push_to_hub(repo_id)
    hub_server.clear_log()
    return repo_id


def test_hf_hub_create_model_loads_the_trunk_with_no_arguments(hub_server, hf_cache):
    model = tiny_model()
    repo_id = published(model, hub_server)
    trunk = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    fetched = {r[1].split("/resolve/")[-1] for r in hub_server.requests if "/resolve/" in r[1]}
    assert {"main/config.json", "main/model.safetensors"} <= fetched, "timm never talked to the server"
    assert trunk.num_classes == 0 and trunk.patch_embed.proj.in_channels == 3
    spec = model.sensors["sentinel2_rgb"].spec
    assert trunk.pretrained_cfg["mean"] == list(spec.mean) and trunk.pretrained_cfg["std"] == list(spec.std)
    # Any image size: position embeddings are interpolated (dynamic_img_size from config.json).
    x = rgb_images(2, 96)
    normed = (torch.from_numpy(x).permute(0, 3, 1, 2).float() * spec.scale - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(
        spec.std
    ).view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens = trunk.forward_features(normed)
    torch.testing.assert_close(tokens[:, 1:], model.embed(x, "sentinel2_rgb", output="patch", precision="fp32"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("primary", ["sentinel2_rgb", "sentinel2"])
def test_model_card_timm_snippet_runs_as_written(primary, hub_server, hf_cache):
    torch.manual_seed(0)
    model = XStars.new("vit_tiny_patch16_224", [primary], **TINY).eval()
    repo_id = published(model, hub_server)
    card = hub_server.files(repo_id)["README.md"].decode()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", card, re.S) if "timm.create_model" in block)
    assert f'"hf-hub:{repo_id}", pretrained=True)' in snippet
    spec = model.sensors[primary].spec
    rng = np.random.default_rng(0)
    high = 256 if spec.dtype == "uint8" else 10000
    dn = rng.integers(1, high, (spec.num_bands, 64, 64)).astype(spec.dtype)
    namespace = {"dn": dn}
    exec(snippet, namespace)  # the card's own code, JSON literals and all
    torch.testing.assert_close(namespace["tokens"][:, 0], model.embed(dn, primary, precision="fp32"), atol=1e-5, rtol=0)


# --- The saved pretrained_cfg as timm's data pipeline and factory read it (issue 30, point 4) ---

BUNDLED = get_model_entry("xstars-s2-aerial").bundled_path


@pytest.fixture(scope="module")
def bundled() -> XStars:
    return XStars.from_pretrained("xstars-s2-aerial")


def normalised_by_hand(dn: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """H x W x C uint8 -> C x H x W float64 (dn / 255 - mean) / std, written out here (not the package's code)."""
    return (dn.transpose(2, 0, 1) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


@pytest.mark.parametrize("size", [64, 128, 256])
def test_create_transform_keeps_a_chip_its_size_and_matches_embed(size, bundled):
    trunk = timm.create_model(f"local-dir:{BUNDLED}", pretrained=True).eval()
    plain = timm.data.resolve_data_config({}, model=trunk)
    assert plain["crop_pct"] == 1.0 and tuple(plain["input_size"]) == (3, 64, 64)  # the pretraining size
    config = timm.data.resolve_data_config({"input_size": (3, size, size)}, model=trunk)
    transform = timm.data.create_transform(**config)
    dn = rgb_images(1, size, seed=size)[0]
    x = transform(Image.fromarray(dn))
    assert tuple(x.shape) == (3, size, size)  # neither resized nor cropped
    np.testing.assert_allclose(x.numpy(), normalised_by_hand(dn, [0.1432, 0.1452, 0.0923], [0.1324, 0.1033, 0.0817]), atol=1e-6)
    with torch.inference_mode():
        vector = trunk(x[None])
    torch.testing.assert_close(vector, bundled.embed(dn, "sentinel2_rgb", precision="fp32"), atol=1e-5, rtol=0)


def test_plain_data_config_keeps_a_chip_of_the_pretraining_size():
    trunk = timm.create_model(f"local-dir:{BUNDLED}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=trunk))
    dn = rgb_images(1, 64, seed=1)[0]
    np.testing.assert_allclose(
        transform(Image.fromarray(dn)).numpy(), normalised_by_hand(dn, trunk.pretrained_cfg["mean"], trunk.pretrained_cfg["std"]),
        atol=1e-6,
    )


SENSOR_FACTS = [
    "sensor=sentinel2_rgb", "bands=red,green,blue", "band_aliases=B04,B03,B02", "gsd_m=10.0", "dtype=uint8",
    "value_scale=0.00392156862745098", "value_offset=0.0", "units=display", "patch_size=8",
]


def test_sensor_facts_survive_local_dir_and_hf_hub_loading(hub_server, hf_cache, tmp_path):
    model = tiny_model(extra_sensors=("aerial",))
    folder = model.save_pretrained(tmp_path / "tiny")
    repo_id = published(model, hub_server)
    for name in (f"local-dir:{folder}", f"hf-hub:{repo_id}"):
        cfg = timm.create_model(name, pretrained=True).pretrained_cfg
        assert list(cfg["notes"][:-1]) == SENSOR_FACTS, name
        assert cfg["notes"][-1].startswith("stem_aerial=stem-aerial.safetensors patch_size=16 img_size=128 in_chans=3 gsd_m=5.0")
        assert "'sentinel2_rgb'" in cfg["description"] and "(dn * 0.00392156862745098 + 0.0 - mean) / std" in cfg["description"]
        assert cfg["crop_pct"] == 1.0 and cfg["input_size"] == (3, 64, 64) and cfg["fixed_input_size"] is False


def test_16_bit_primary_says_timm_transforms_do_not_apply(tmp_path):
    model = XStars.new("vit_tiny_patch16_224", ["sentinel2"], **TINY)
    cfg = timm.create_model(f"local-dir:{model.save_pretrained(tmp_path / 's2')}", pretrained=True).pretrained_cfg
    assert "gsd_m=10.0" in cfg["notes"] and "dtype=uint16" in cfg["notes"] and "value_scale=0.0001" in cfg["notes"]
    assert "does not: it divides by 255" in cfg["description"]


def test_bundled_config_carries_the_current_timm_keys():
    saved = json.loads((BUNDLED / "config.json").read_text())
    expected = XStarsConfig.from_dict(saved).timm_keys()
    assert {key: saved[key] for key in expected} == json.loads(json.dumps(expected))


def test_other_sensor_stem_loads_through_model_args_and_overlay(bundled):
    """The README's recipe: timm builds the trunk at the stem's patch size (img_size keeping the
    8 x 8 position grid), the overlay gives the sensor's statistics, the stem file its weights."""
    spec = bundled.sensors["aerial"].spec
    trunk = timm.create_model(
        f"local-dir:{BUNDLED}", pretrained=True, patch_size=16, img_size=128,
        pretrained_cfg_overlay=dict(mean=list(spec.mean), std=list(spec.std), input_size=(3, 128, 128)),
    ).eval()
    trunk.patch_embed.load_state_dict(load_file(BUNDLED / "stem-aerial.safetensors"))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=trunk))
    dn = rgb_images(2, 128, seed=3)
    x = torch.stack([transform(Image.fromarray(image)) for image in dn])
    with torch.inference_mode():
        vectors = trunk(x)
    torch.testing.assert_close(vectors, bundled.embed(dn, "aerial", precision="fp32"), atol=1e-5, rtol=0)
    assert not torch.allclose(vectors, bundled.embed(dn, "sentinel2_rgb", precision="fp32"), atol=1e-3)
