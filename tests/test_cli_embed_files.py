"""What `xstars embed` and `embed-scene` do with the files they are given: an output that is an
input is refused before any work, every image is kept under a distinct name, and an unreadable
input is named."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from factories import rgb_images, tiny_model
from xstars_models.cli import main
from xstars_models.errors import InvalidOptionError
from xstars_models.samples import sample_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny_model(extra_sensors=())
    return model, model.save_pretrained(tmp_path_factory.mktemp("embed-files") / "model")


def embed(folder, *argv):
    return main(["embed", str(folder), "--sensor", "sentinel2_rgb", *map(str, argv)])


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "symlinked-input"])
def test_embed_refuses_an_output_that_is_an_input(tmp_path, capsys, link):
    image = tmp_path / "x.npy"
    np.save(image, rgb_images(1)[0])
    before = image.read_bytes()
    out = tmp_path / "out.npy"
    if link == "same":
        out = image
    elif link == "symlink":
        out.symlink_to(image)
    elif link == "hardlink":
        os.link(image, out)
    else:  # the input is given through a link to the output path
        shutil.move(image, out)
        image.symlink_to(out)
    # An unknown model id: the refusal must come before the model is even looked up.
    assert main(["embed", "no-such-model", "--sensor", "sentinel2_rgb", str(image), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "would replace the input with the results" in err and err.count("\n") == 1
    assert image.read_bytes() == before


def test_embed_scene_refuses_its_source_as_output(model_dir, tmp_path, capsys):
    model, folder = model_dir
    scene = tmp_path / "s.tif"
    shutil.copy(sample_path("sentinel2_rgb_coast"), scene)
    before = scene.read_bytes()
    assert main(["embed-scene", "no-such-model", "--sensor", "sentinel2_rgb", str(scene), "--out", str(scene)]) == 2
    assert f"xstars embed-scene: error: --out {scene} is the input" in capsys.readouterr().err and scene.read_bytes() == before
    link = tmp_path / "link.tif"
    link.symlink_to(scene)
    for out, source in ((link, scene), (scene, str(scene))):
        with pytest.raises(InvalidOptionError, match="would replace the input") as info:
            model.embed_scene(source, "sentinel2_rgb", out=out, progress=False)
        assert info.value.field == "out" and f"out={str(out)!r} is the input" in str(info.value)
    assert scene.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.tif", "s.tif"]


def test_same_stem_in_two_folders_keeps_both(model_dir, tmp_path, capsys):
    model, folder = model_dir
    images = {}
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        images[name] = rgb_images(1, seed=seed)[0]
        np.save(tmp_path / name / "scene.npy", images[name])
    np.save(tmp_path / "other.npy", rgb_images(1, seed=3)[0])
    out = tmp_path / "emb.npz"
    assert embed(folder, tmp_path / "a/scene.npy", tmp_path / "b/scene.npy", tmp_path / "other.npy", "--out", out) == 0
    stored = np.load(out)
    assert sorted(stored.files) == ["a/scene", "b/scene", "other"]
    for name in ("a", "b"):
        expected = model.embed(images[name], "sentinel2_rgb")[0]
        assert torch.allclose(torch.from_numpy(stored[f"{name}/scene"]), expected, atol=1e-6)
    assert "-> 'a/scene'" in capsys.readouterr().out


def test_same_stem_in_one_folder_keeps_the_suffix(model_dir, tmp_path):
    _, folder = model_dir
    np.save(tmp_path / "scene.npy", rgb_images(1)[0])
    from PIL import Image

    Image.fromarray(rgb_images(1, seed=5)[0]).save(tmp_path / "scene.png")
    out = tmp_path / "emb.npz"
    assert embed(folder, tmp_path / "scene.npy", tmp_path / "scene.png", "--out", out) == 0
    assert sorted(np.load(out).files) == ["scene.npy", "scene.png"]


def test_the_same_file_twice_is_refused(model_dir, tmp_path, capsys):
    _, folder = model_dir
    np.save(tmp_path / "x.npy", rgb_images(1)[0])
    (tmp_path / "y.npy").symlink_to(tmp_path / "x.npy")
    assert embed(folder, tmp_path / "x.npy", tmp_path / "y.npy", "--out", tmp_path / "e.npz") == 2
    assert "are the same file" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_batch_in_one_npy_keeps_every_image(model_dir, tmp_path, suffix):
    model, folder = model_dir
    batch = rgb_images(3, seed=7)
    np.save(tmp_path / "batch.npy", batch)
    out = tmp_path / f"emb{suffix}"
    assert embed(folder, tmp_path / "batch.npy", "--out", out, "--output", "mean") == 0
    stored = np.load(out) if suffix == ".npy" else np.load(out)["batch"]
    assert stored.shape == (3, model.embed_dim)
    assert torch.allclose(torch.from_numpy(stored), model.embed(batch, "sentinel2_rgb", output="mean"), atol=1e-6)


def test_a_truncated_tiff_is_named(model_dir, tmp_path, capsys):
    import rasterio
    from affine import Affine

    _, folder = model_dir
    whole = tmp_path / "whole.tif"
    profile = dict(driver="GTiff", width=256, height=256, count=3, dtype="uint8", crs="EPSG:32631",
                   transform=Affine(10, 0, 500000, 0, -10, 5000000))
    with rasterio.open(whole, "w", **profile) as dst:  # uncompressed, header first: a cut loses pixels only
        dst.write(np.random.default_rng(0).integers(0, 255, (3, 256, 256), dtype=np.uint8))
    data = whole.read_bytes()
    broken = tmp_path / "broken.tif"
    broken.write_bytes(data[: len(data) // 2])
    assert embed(folder, broken, "--out", tmp_path / "e.npy") == 2
    err = capsys.readouterr().err
    assert f"{broken}: cannot read it" in err and "truncated or damaged" in err
    assert main(["embed-scene", str(folder), "--sensor", "sentinel2_rgb", str(broken), "--out", str(tmp_path / "m.tif"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "broken.tif" in err and "truncated or damaged" in err and "Traceback" not in err
