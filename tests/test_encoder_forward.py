"""The encoder runs timm's own ViT forward for every sensor: the sensor's stem is routed through
the trunk's patch embedding, so timm's gradient checkpointing and forward_intermediates apply."""

from __future__ import annotations

import copy

import pytest
import torch

from factories import TINY, rgb_images, tiny_model
from xstars_models import XStars, get_sensor
from xstars_models.encoder import SensorPatchEmbed, build_trunk
from xstars_models.errors import InvalidOptionError


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(rgb_images(n, size, seed)).permute(0, 3, 1, 2).float()


def plain_timm_trunk_with_stem(model, sensor: str) -> torch.nn.Module:
    """A copy of the trunk whose patch embedding is replaced by ``sensor``'s stem: plain timm,
    no routing, as the reference for what the encoder should compute."""
    trunk = copy.deepcopy(model.trunk)
    trunk.patch_embed = copy.deepcopy(model.stems[sensor])
    return trunk


def block_calls(model) -> list[int]:
    # a pre-hook: torch stops a recomputation as soon as it has what backward needs, before a
    # block's forward hooks would run
    calls = [0]
    model.trunk.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("sensor, size", [("sentinel2_rgb", 64), ("aerial", 128)])
def test_grad_checkpointing_gives_the_same_output_and_gradients(sensor, size):
    x = pixels(2, size)
    results = {}
    for checkpointing in (False, True):
        model = tiny_model().train()
        model.set_grad_checkpointing(checkpointing)
        calls = block_calls(model)
        tokens = model(x, sensor)
        tokens.square().mean().backward()
        # checkpointing recomputes each block during the backward pass instead of storing it
        assert calls[0] == (2 if checkpointing else 1)
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[checkpointing] = tokens.detach(), grads
    (plain, plain_grads), (ckpt, ckpt_grads) = results[False], results[True]
    assert torch.allclose(plain, ckpt, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    stem = "trunk.patch_embed.proj.weight" if sensor == "sentinel2_rgb" else f"stems.{sensor}.proj.weight"
    assert stem in plain_grads and "trunk.blocks.1.mlp.fc2.weight" in plain_grads
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], atol=1e-6), name


def test_grad_checkpointing_also_runs_in_forward_intermediates():
    model = tiny_model().train()
    model.set_grad_checkpointing()
    calls = block_calls(model)
    final, _ = model.forward_intermediates(pixels(1, 128), "aerial", indices=[1])
    final.sum().backward()
    assert calls[0] == 2


@pytest.mark.parametrize("sensor, size, grid", [("sentinel2_rgb", 64, 8), ("aerial", 128, 8), ("aerial", 96, 6)])
def test_forward_intermediates_per_sensor_match_timm_on_that_stem(sensor, size, grid):
    model = tiny_model()
    x = pixels(2, size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, sensor, indices=[0, 1])
        normed = model.norms[sensor](x)
        if sensor == "sentinel2_rgb":
            reference = copy.deepcopy(model.trunk)
        else:
            reference = plain_timm_trunk_with_stem(model, sensor)
        want_final, want_maps = reference.forward_intermediates(normed, indices=[0, 1])
    assert [m.shape for m in maps] == [(2, model.embed_dim, grid, grid)] * 2
    assert torch.allclose(final, want_final, atol=1e-5)
    for got, want in zip(maps, want_maps):
        assert torch.allclose(got, want, atol=1e-5)
    # embed(layers=) and forward_tokens give the same blocks
    embedded = model.embed(rgb_images(2, size), sensor, output="map", layers=[0, 1], precision="fp32")
    for got, want in zip(embedded, maps):
        assert torch.allclose(got, want, atol=1e-5)


def test_forward_intermediates_pass_timm_options_through():
    model = tiny_model()
    x = pixels(1, 128)
    with torch.no_grad():
        early = model.forward_intermediates(x, "aerial", indices=[0], stop_early=True, intermediates_only=True)
        full = model.forward_intermediates(x, "aerial", indices=[0], intermediates_only=True)
        with_prefix = model.forward_intermediates(x, "aerial", indices=1, return_prefix_tokens=True, output_fmt="NLC")
    assert len(early) == 1 and torch.allclose(early[0], full[0], atol=1e-6)
    (patches, prefix), = with_prefix[1]
    assert patches.shape == (1, 64, model.embed_dim) and prefix.shape == (1, 1, model.embed_dim)
    with pytest.raises(InvalidOptionError, match=r"indices=\[\] chooses no block") as info:
        model.forward_intermediates(x, "aerial", indices=[])
    assert info.value.field == "indices"
    with pytest.raises(InvalidOptionError, match=r"Block indexes \[5\] out of range for a 2-block encoder") as info:
        model.forward_intermediates(x, "aerial", indices=[5])
    assert info.value.field == "indices"
    with pytest.raises(InvalidOptionError, match=r"Asked for the last 3 blocks of a 2-block encoder") as info:
        model.forward_intermediates(x, "aerial", indices=3)
    assert info.value.field == "indices"
    with pytest.raises(InvalidOptionError, match=r"output_fmt must be 'NCHW' or 'NLC', got 'NHWC'") as info:
        model.forward_intermediates(x, "aerial", indices=1, output_fmt="NHWC")
    assert info.value.field == "output_fmt"
    with pytest.raises(InvalidOptionError, match=r"no stem for sensor 'landsat'") as info:
        model.forward_intermediates(x, "landsat", indices=1)
    assert info.value.field == "sensor"


def test_routing_ends_with_the_call_even_when_it_fails():
    model = tiny_model()
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            model(pixels(1, 64)[:, :2], "aerial")  # two bands for a three-band stem
        assert model.trunk.patch_embed._route == ()
        # the trunk on its own is the primary sensor's plain timm ViT again
        primary = model.norms["sentinel2_rgb"](pixels(1, 64))
        assert torch.allclose(model.trunk.forward_features(primary), model(pixels(1, 64), "sentinel2_rgb"), atol=1e-6)


def test_a_stem_copied_from_a_trunk_without_patch_bias_starts_with_zero_bias():
    model = XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], **{**TINY, "pre_norm": True})  # CLIP-style
    assert model.trunk.patch_embed.proj.bias is None
    model.add_sensor(get_sensor("aerial_rgb").with_gsd(5.0, name="aerial"), init_from="sentinel2_rgb")
    assert torch.count_nonzero(model.stems["aerial"].proj.bias) == 0
    assert model.embed(rgb_images(1, 128), "aerial").shape == (1, model.embed_dim)


def test_trunk_keeps_timm_keys_and_refuses_non_vit_architectures():
    model = tiny_model()
    assert isinstance(model.trunk.patch_embed, SensorPatchEmbed)
    assert not any(key.startswith("patch_embed.") and "stem" in key for key in model.trunk.state_dict())
    assert {k for k in model.trunk.state_dict() if k.startswith("patch_embed.")} == {
        "patch_embed.proj.weight", "patch_embed.proj.bias"
    }
    with pytest.raises(InvalidOptionError, match=r"'resnet18' is not a timm VisionTransformer") as info:
        build_trunk("resnet18", 3)
    assert info.value.field == "arch"
