"""Saved models load in plain timm with no extra arguments: ``timm.create_model("hf-hub:org/name",
pretrained=True)`` through the real huggingface_hub client against the loopback Hub, and the
model card's timm snippet runs as written."""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
import timm
import torch

from factories import TINY, rgb_images, tiny_model
from xstars_models import XStars


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
