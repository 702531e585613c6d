"""XStars.embed: input formats, outputs, layers, sizes and every kind of bad input."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from factories import rgb_images, tiny_model
from xstars_models.errors import InvalidInputError, InvalidOptionError, InvalidTypeError


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_outputs_have_documented_shapes(model):
    x = rgb_images(3, 64)
    d = model.embed_dim
    assert model.embed(x, "sentinel2_rgb", output="cls").shape == (3, d)
    assert model.embed(x, "sentinel2_rgb", output="mean").shape == (3, d)
    assert model.embed(x, "sentinel2_rgb", output="patch").shape == (3, 64, d)
    assert model.embed(x, "sentinel2_rgb", output="map").shape == (3, d, 8, 8)


def test_map_and_patch_and_mean_agree(model):
    x = rgb_images(2, 64)
    fmap = model.embed(x, "sentinel2_rgb", output="map")
    patch = model.embed(x, "sentinel2_rgb", output="patch")
    mean = model.embed(x, "sentinel2_rgb", output="mean")
    # token (i, j) of the map is patch token i * w + j
    assert torch.allclose(fmap[:, :, 2, 5], patch[:, 2 * 8 + 5])
    assert torch.allclose(mean, patch.mean(1), atol=1e-6)


def test_input_formats_give_identical_embeddings(model):
    x = rgb_images(2, 64)
    ref = model.embed(x, "sentinel2_rgb")
    chw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(model.embed(chw, "sentinel2_rgb"), ref)
    assert torch.equal(model.embed(list(x), "sentinel2_rgb"), ref)
    assert torch.equal(model.embed([Image.fromarray(a) for a in x], "sentinel2_rgb"), ref)
    assert torch.equal(model.embed(x[0], "sentinel2_rgb"), ref[:1])
    assert torch.equal(model.embed(chw[0].numpy(), "sentinel2_rgb"), ref[:1])
    assert torch.allclose(model.embed(x.astype(np.float32), "sentinel2_rgb"), ref)


def test_band_names_reorder_channels(model):
    x = rgb_images(2, 64)
    ref = model.embed(x, "sentinel2_rgb")
    bgr = x[..., ::-1].copy()
    assert torch.equal(model.embed(bgr, "sentinel2_rgb", bands=["blue", "green", "red"]), ref)
    assert torch.equal(model.embed(bgr, "sentinel2_rgb", bands=["B02", "B03", "B04"]), ref)
    assert not torch.allclose(model.embed(bgr, "sentinel2_rgb"), ref)


# Sentinel-2 L1C statistics (reflectance) in band order B01..B12, written out here rather than read
# from the spec, so that the test checks the normalisation the model applies against the published
# numbers (test_sensors pins them in the spec too).
S2_MEAN = [0.1613, 0.1398, 0.1322, 0.1373, 0.1561, 0.2108, 0.2391, 0.2319, 0.2581, 0.0838, 0.0022, 0.2195, 0.1537]
S2_STD = [0.0791, 0.0854, 0.0879, 0.1145, 0.1128, 0.1164, 0.1276, 0.1250, 0.1346, 0.0578, 0.0051, 0.1340, 0.1143]


def _without_normalisation(model, sensor):
    """A copy of ``model`` whose ``sensor`` stem takes already-normalised float inputs (identity
    normalisation), the same patch embedding and trunk."""
    from xstars_models.encoder import SensorNorm, StemConfig

    spec = model.sensors[sensor].spec
    identity = dataclasses.replace(
        spec, bands=tuple(dataclasses.replace(b, mean=0.0, std=1.0) for b in spec.bands),
        scale=1.0, offset=0.0, dtype="float32", units="unspecified",
    )
    plain = copy.deepcopy(model)
    plain.sensors[sensor] = StemConfig(identity, model.sensors[sensor].patch_size)
    plain.norms[sensor] = SensorNorm(identity)
    return plain


def test_uint16_sensor_and_reflectance_scale(model):
    rng = np.random.default_rng(1)
    x = rng.integers(1, 6000, size=(2, 13, 32, 32), dtype=np.uint16)
    out = model.embed(x, "sentinel2", output="map")
    assert out.shape == (2, model.embed_dim, 4, 4)
    # uint16 digital numbers are reflectance x 1e4, normalised per band with the published statistics.
    reflectance = x.astype(np.float64) * 1e-4
    normalised = (reflectance - np.array(S2_MEAN)[:, None, None]) / np.array(S2_STD)[:, None, None]
    by_hand = _without_normalisation(model, "sentinel2").embed(normalised.astype(np.float32), "sentinel2", output="map")
    assert torch.allclose(out, by_hand, atol=1e-4)
    # Floats in the same units (digital numbers) give the same embedding as the uint16 values.
    assert torch.allclose(model.embed(x.astype(np.float32), "sentinel2", output="map"), out, atol=1e-5)
    # Two bands swapped (here B11 and B12 given in each other's place) change it: the stem is per band.
    swapped = x[:, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 11]]
    assert not torch.allclose(model.embed(swapped, "sentinel2", output="map"), out, atol=1e-3)


@pytest.mark.parametrize(
    "image, layout",
    [
        (np.zeros((64, 64, 4), np.uint8), "HWC"),
        (np.zeros((4, 64, 64), np.uint8), "CHW"),
        (np.zeros((64, 64, 3), np.uint8), "CHW"),  # HWC data declared CHW: 64 "channels"
        (torch.zeros(2, 64, 64, dtype=torch.uint8), "CHW"),
        (np.zeros((2, 64, 64, 5), np.uint8), "HWC"),  # a batch
    ],
)
def test_wrong_band_count_with_explicit_layout_is_a_clear_error(model, image, layout):
    with pytest.raises(InvalidInputError, match=rf"sentinel2_rgb' expects 3 bands .*given as {layout} has shape") as info:
        model.embed(image, "sentinel2_rgb", layout=layout)
    assert info.value.field == "images"


def test_an_unknown_layout_is_a_bad_option(model):
    with pytest.raises(InvalidOptionError, match=r"layout must be 'CHW', 'HWC' or None \(guess\), got 'WHC'") as info:
        model.embed(np.zeros((64, 64, 3), np.uint8), "sentinel2_rgb", layout="WHC")
    assert info.value.field == "layout"


def test_huge_single_images_point_to_embed_scene(model):
    with pytest.raises(InvalidInputError, match=r"1040 x 1040 px is 130 x 130 = 16900 tokens, more than max_tokens=16384.*embed_scene") as info:
        model.embed(np.zeros((1040, 1040, 3), np.uint8), "sentinel2_rgb")
    assert info.value.field == "images" and info.value.settings == {"max_tokens": 16384}
    x = rgb_images(1, 64)  # 8 x 8 = 64 tokens
    with pytest.raises(InvalidInputError, match=r"more than max_tokens=63"):
        model.embed(x, "sentinel2_rgb", max_tokens=63)
    assert torch.equal(model.embed(x, "sentinel2_rgb", max_tokens=64), model.embed(x, "sentinel2_rgb", max_tokens=None))


def test_batching_and_progress_do_not_change_results(model):
    x = rgb_images(5, 64)
    full = model.embed(x, "sentinel2_rgb", batch_size=5)
    chunked = model.embed(x, "sentinel2_rgb", batch_size=2, progress=True)
    assert torch.allclose(full, chunked, atol=1e-5)


def test_arbitrary_sizes_interpolate_positions(model):
    x = rgb_images(1, 128)[:, :96]  # 96 x 128, not the 64 x 64 the trunk was built for
    fmap = model.embed(x, "sentinel2_rgb", output="map", precision="fp32")
    assert fmap.shape == (1, model.embed_dim, 12, 16)
    # timm's own forward with dynamic_img_size interpolates the 8 x 8 position grid to 12 x 16.
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        tokens = model.trunk.forward_features(model.norms["sentinel2_rgb"](pixels))
    expected = tokens[:, model.trunk.num_prefix_tokens:].reshape(1, 12, 16, -1).permute(0, 3, 1, 2)
    assert torch.allclose(fmap, expected, atol=1e-5)
    same_grid = model.trunk.pos_embed.shape[1] - model.trunk.num_prefix_tokens
    assert same_grid == 64  # the trunk was built for 8 x 8 tokens: 12 x 16 needs interpolation


def test_sizes_not_multiple_of_patch_are_trimmed_with_a_warning(model):
    x = rgb_images(1, 64)
    padded = np.pad(x, ((0, 0), (0, 5), (0, 3), (0, 0)))
    with pytest.warns(UserWarning, match="5 rows and 3 columns"):
        out = model.embed(padded, "sentinel2_rgb", output="map")
    assert torch.equal(out, model.embed(x, "sentinel2_rgb", output="map"))


def test_aerial_stem_tokens_cover_the_same_ground(model):
    aerial = rgb_images(1, 128)  # 128 px at 5 m = 640 m = 64 px of Sentinel-2
    assert model.embed(aerial, "aerial", output="map").shape[-2:] == (8, 8)


def test_layers_return_intermediate_blocks(model):
    x = rgb_images(2, 64)
    per_block = model.embed(x, "sentinel2_rgb", output="map", layers=[0, 1])
    assert len(per_block) == 2 and all(t.shape == (2, model.embed_dim, 8, 8) for t in per_block)
    last = model.embed(x, "sentinel2_rgb", output="patch", layers=1)
    assert len(last) == 1
    # the final output is the last block's output after the final LayerNorm
    with torch.inference_mode():
        normed = model.trunk.norm(last[0])
    assert torch.allclose(normed, model.embed(x, "sentinel2_rgb", output="patch"), atol=1e-5)
    cls_per_block = model.embed(x, "sentinel2_rgb", output="cls", layers=[0])
    assert cls_per_block[0].shape == (2, model.embed_dim)
    assert not torch.allclose(per_block[0], per_block[1])


def test_embed_runs_without_autograd_and_restores_mode(model):
    model.train()
    out = model.embed(rgb_images(1, 64), "sentinel2_rgb")
    assert model.training
    model.eval()
    assert not out.requires_grad
    assert out.is_inference()


def test_forward_intermediates_follow_timm(model):
    x = torch.from_numpy(rgb_images(2, 64)).permute(0, 3, 1, 2).float()
    final, inter = model.forward_intermediates(x, "sentinel2_rgb", indices=2, output_fmt="NLC", norm=True)
    assert final.shape == (2, 65, model.embed_dim)
    assert torch.allclose(inter[-1], final[:, 1:], atol=1e-5)
    _, maps = model.forward_intermediates(x, "sentinel2_rgb", indices=[0])
    assert maps[0].shape == (2, model.embed_dim, 8, 8)


@pytest.mark.parametrize(
    "images, kwargs, error, field, message",
    [
        (np.zeros((64, 64, 4), np.uint8), {}, InvalidInputError, "images", r"has 3 bands .*shape \(64, 64, 4\)"),
        (np.zeros((64, 64, 3), np.uint16), {}, InvalidInputError, "images", r"sentinel2_rgb.*expects uint8.*got uint16"),
        (np.zeros((64, 64, 3), np.int64), {}, InvalidInputError, "images", r"expects uint8.*got int64"),
        (np.zeros((64, 64, 3), np.uint8), {"bands": ["red", "green", "swir16"]}, InvalidOptionError, "bands",
         r"no band 'swir16'.*bands are"),
        (np.zeros((64, 64, 3), np.uint8), {"bands": ["red", "green", "green"]}, InvalidOptionError, "bands",
         r"name a band twice"),
        (np.zeros((64, 64, 3), np.uint8), {"bands": ["red", "green"]}, InvalidOptionError, "bands",
         r"\['blue'\] missing from the given band names"),
        (np.zeros((6, 6, 3), np.uint8), {}, InvalidInputError, "images", r"6 x 6 px are smaller than one patch \(8 x 8 px = 80 m"),
        ([np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)], {}, InvalidInputError, "images",
         r"must share a size"),
        (np.zeros((2, 2, 64, 64, 3), np.uint8), {}, InvalidInputError, "images", r"shape"),
        (np.zeros((64, 64), np.uint8), {}, InvalidInputError, "images", r"image 0 is 2-D \(64, 64\) \(a single band\)"),
        ([], {}, InvalidInputError, "images", r"empty"),
        (np.zeros((64, 64, 3), np.uint8), {"batch_size": 0}, InvalidOptionError, "batch_size", r"batch_size must be >= 1, got 0"),
        (np.zeros((64, 64, 3), np.uint8), {"layers": [7]}, InvalidOptionError, "layers", r"Block indexes \[7\] out of range"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, images, kwargs, error, field, message):
    with pytest.raises(error, match=message) as info:
        model.embed(images, "sentinel2_rgb", **kwargs)
    assert info.value.field == field


def test_nan_and_inf_name_image_and_band(model):
    x = rgb_images(2, 64).astype(np.float32)
    x[1, 3, 4, 2] = np.nan
    with pytest.raises(InvalidInputError, match=r"image 1, band 'blue' contains NaN") as info:
        model.embed(x, "sentinel2_rgb")
    assert info.value.field == "images"
    x[1, 3, 4, 2] = 0
    x[0, 0, 0, 0] = np.inf
    with pytest.raises(InvalidInputError, match=r"image 0, band 'red'"):
        model.embed(x, "sentinel2_rgb")


def test_unknown_sensor_and_output(model):
    with pytest.raises(InvalidOptionError, match=r"no stem for sensor 'landsat8'.*knows \['sentinel2_rgb', 'aerial'") as info:
        model.embed(rgb_images(1), "landsat8")
    assert info.value.field == "sensor"
    with pytest.raises(InvalidOptionError, match=r"output must be one of") as info:
        model.embed(rgb_images(1), "sentinel2_rgb", output="pooled")
    assert info.value.field == "output"
    # A wrong type stays a TypeError for callers who catch that.
    with pytest.raises(TypeError, match=r"numpy arrays, torch tensors or PIL images") as type_info:
        model.embed("image.png", "sentinel2_rgb")
    assert isinstance(type_info.value, InvalidTypeError) and type_info.value.field == "images"
