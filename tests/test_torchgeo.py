"""The TorchGeo weights entry: a real TorchGeo pipeline (RasterDataset over a bundled GeoTIFF,
GridGeoSampler, stack_samples DataLoader) through the weights' transforms and the built ViT gives
the embeddings ``embed`` gives on the same pixels read with rasterio; ``meta`` states the sensor."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import rasterio
import timm
import torch
import torchvision.models
from torch.utils.data import DataLoader
from torchgeo.datasets import RasterDataset, stack_samples
from torchgeo.models import api as torchgeo_api
from torchgeo.samplers import GridGeoSampler

import xstars_models
from factories import rgb_images
from xstars_models import XStars
from xstars_models.errors import InvalidInputError
from xstars_models.integrations.torchgeo import XStarsS2Aerial_Weights, xstars_vit

SCENE = Path(xstars_models.__file__).parent / "samples" / "sentinel2_rgb_coast.tif"
WEIGHTS = XStarsS2Aerial_Weights.SENTINEL2_RGB


@pytest.fixture(scope="module")
def bundled() -> XStars:
    return XStars.from_pretrained("xstars-s2-aerial")


def pixels_at(bounds) -> np.ndarray:
    """The C x H x W digital numbers of the GeoTIFF inside a TorchGeo query (x, y, t slices)."""
    x, y = bounds[0], bounds[1]
    with rasterio.open(SCENE) as src:
        window = rasterio.windows.from_bounds(x.start, y.start, x.stop, y.stop, src.transform)
        return src.read(window=window.round_offsets().round_lengths())


def test_sampler_batch_through_the_weights_transforms_equals_embed(bundled):
    dataset = RasterDataset(paths=[str(SCENE)])
    sampler = GridGeoSampler(dataset, size=64, stride=64)
    loader = DataLoader(dataset, sampler=sampler, batch_size=6, collate_fn=stack_samples)
    encoder = xstars_vit(WEIGHTS).eval()
    seen = 0
    for batch in loader:
        dn = np.stack([pixels_at(bounds) for bounds in batch["bounds"]])
        assert dn.shape[1:] == (3, 64, 64) and batch["image"].shape == dn.shape
        with torch.inference_mode():
            vectors = encoder(WEIGHTS.transforms(batch["image"]))
        torch.testing.assert_close(vectors, bundled.embed(dn, "sentinel2_rgb", precision="fp32"), atol=1e-5, rtol=0)
        seen += len(dn)
    assert seen == 16  # the 256 x 256 px scene in 64 px chips


def test_dataset_level_transforms_normalise_each_sample():
    raw = RasterDataset(paths=[str(SCENE)])
    normalised = RasterDataset(paths=[str(SCENE)], transforms=WEIGHTS.transforms)
    query = next(iter(GridGeoSampler(raw, size=32)))
    sample, dn = normalised[query], raw[query]["image"].numpy()
    assert sample["crs"] == raw.crs and sample["bounds"] == query  # the rest of the sample is kept
    # (dn / 255 - mean) / std with the X-STARS sentinel2_rgb statistics, written out here.
    mean, std = np.array([0.1432, 0.1452, 0.0923]), np.array([0.1324, 0.1033, 0.0817])
    expected = (dn / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(sample["image"].numpy(), expected, atol=1e-5)


def test_aerial_member_runs_the_aerial_stem(bundled):
    weights = XStarsS2Aerial_Weights.AERIAL
    dn = rgb_images(2, 128, seed=5)  # 2 x 128 x 128 x 3 uint8
    with torch.inference_mode():
        vectors = xstars_vit(weights).eval()(weights.transforms(torch.from_numpy(dn).permute(0, 3, 1, 2)))
    torch.testing.assert_close(vectors, bundled.embed(dn, "aerial", precision="fp32"), atol=1e-5, rtol=0)


def test_meta_states_the_sensor():
    s2, aerial = XStarsS2Aerial_Weights.SENTINEL2_RGB.meta, XStarsS2Aerial_Weights.AERIAL.meta
    assert {k: s2[k] for k in ("model_id", "sensor", "bands", "band_aliases", "gsd_m", "in_chans", "patch_size", "dtype")} == {
        "model_id": "xstars-s2-aerial", "sensor": "sentinel2_rgb", "bands": ["red", "green", "blue"],
        "band_aliases": ["B04", "B03", "B02"], "gsd_m": 10.0, "in_chans": 3, "patch_size": 8, "dtype": "uint8",
    }
    assert s2["scale"] == pytest.approx(1 / 255) and s2["offset"] == 0.0 and s2["mean"] == [0.1432, 0.1452, 0.0923]
    assert (aerial["sensor"], aerial["gsd_m"], aerial["patch_size"], aerial["bands"]) == ("aerial", 5.0, 16, ["red", "green", "blue"])
    assert aerial["mean"] == [0.485, 0.456, 0.406] and aerial["band_aliases"] == [None, None, None]
    assert s2["model"] == aerial["model"] == "vit_tiny_patch16_224" and s2["license"] == "cc-by-4.0"
    assert s2["model_args"]["img_size"] == [64, 64] and aerial["model_args"]["img_size"] == [128, 128]


def test_state_dict_loads_offline_into_a_model_built_from_meta(hub_server, hf_offline):
    for weights in XStarsS2Aerial_Weights:
        assert issubclass(type(weights), torchgeo_api.WeightsEnum) and torchgeo_api.WeightsEnum is torchvision.models.WeightsEnum
        folder = Path(urlparse(weights.url).path)
        assert urlparse(weights.url).scheme == "file" and (folder / "model.safetensors").is_file()
        model = timm.create_model(weights.meta["model"], num_classes=0, **weights.meta["model_args"])
        model.load_state_dict(weights.get_state_dict(progress=True), strict=True)  # as TorchGeo's trainers call it
    assert hub_server.requests == []


def test_members_survive_pickling_and_name_lookup():
    for weights in XStarsS2Aerial_Weights:
        assert pickle.loads(pickle.dumps(weights)) is weights and copy.deepcopy(weights) is weights
        assert XStarsS2Aerial_Weights.verify(f"XStarsS2Aerial_Weights.{weights.name}") is weights


def test_classifier_head_is_new_and_the_trunk_is_the_model():
    model = xstars_vit(WEIGHTS, num_classes=4).eval()
    state = WEIGHTS.get_state_dict()
    assert model.head.out_features == 4
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_transforms_refuse_the_wrong_band_count():
    with pytest.raises(InvalidInputError, match="3 bands") as err:
        WEIGHTS.transforms(torch.zeros(2, 4, 8, 8))
    assert err.value.field == "images"
