"""Invocations that used to end in a traceback (issue 27, point 6): each is now exit status 2 and
ONE line on stderr that names the value at fault and what to do, for the command line and, where
the API is reached the same way, a typed error with its field."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from factories import rgb_images, tiny_model

from xstars_models import XStars
from xstars_models.cli import main
from xstars_models.errors import ConfigError, InvalidInputError, UnknownOptionError
from xstars_models.evaluation import load_landcover_chips
from xstars_models.evaluation.landcover import CHIPS_PATH
from xstars_models.io import rasters
from xstars_models.samples import sample_path

# The tiny model's own sensor, and a new one at 5 m for adapt (patch 16 over the same 80 m tokens).
ADAPT = ["--sensor", "aerial_rgb", "--gsd", "5", "--name", "aerial"]
TRAIN = ["--steps", "1", "--batch-size", "2", "--dino-out-dim", "16", "--local-crops", "1", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model, a copy whose config.json has an unknown arch_kwargs key, a small scene,
    an image as .npy, and co-registered 10 m / 5 m rasters for adapt."""
    import rasterio
    from rasterio.transform import from_origin

    root = tmp_path_factory.mktemp("tracebacks")
    model = tiny_model(extra_sensors=()).save_pretrained(root / "model")
    foo = root / "foo-model"
    shutil.copytree(model, foo)
    config = json.loads((foo / "config.json").read_text())
    config["arch_kwargs"]["foo"] = 1
    (foo / "config.json").write_text(json.dumps(config))
    np.save(root / "img.npy", rgb_images(1)[0])
    rasters_ = {}
    for name, gsd in (("s2", 10.0), ("aerial", 5.0)):
        side = int(2560 / gsd)
        pixels = rgb_images(1, size=side)[0].transpose(2, 0, 1)
        path = root / f"{name}.tif"
        profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32631",
                       transform=from_origin(500000, 4000000, gsd, gsd))
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(pixels)
        rasters_[name] = path
    return {"MODEL": model, "FOO": foo, "IMG": root / "img.npy", "SCENE": sample_path("sentinel2_rgb_coast"), **rasters_}


def one_line_error(capsys, argv, *named):
    """Run ``xstars argv``: exit status 2, one line on stderr led by the command, naming each of
    ``named``, no traceback. Returns the line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and err.startswith(f"xstars {argv[0]}: error: "), err
    for text in named:
        assert text in err, (text, err)
    return err


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def scene_argv(files, tmp_path, *extra):
    return ["embed-scene", files["MODEL"], files["SCENE"], "--sensor", "sentinel2_rgb", "--out", tmp_path / "o.tif", *extra]


def test_embed_scene_on_cuda_without_cuda(files, tmp_path, capsys, no_cuda):
    one_line_error(capsys, scene_argv(files, tmp_path, "--device", "cuda"), "--device cuda: no CUDA device", "use 'cpu'")
    assert not (tmp_path / "o.tif").exists()


def test_embed_scene_on_a_device_that_is_no_device(files, tmp_path, capsys):
    one_line_error(capsys, scene_argv(files, tmp_path, "--device", "banana"), "--device banana is not a device", "'cpu'")


def test_embed_scene_compiled_on_meta(files, tmp_path, capsys):
    one_line_error(capsys, scene_argv(files, tmp_path, "--compile", "--device", "meta"), "--device meta: meta tensors", "'cpu'")


def adapt_argv(files, tmp_path, *extra):
    return [
        "adapt", files["MODEL"], *ADAPT, "--new", files["aerial"], "--old", files["s2"], "--run-dir", tmp_path / "run",
        "--out", tmp_path / "out", *TRAIN, *extra,
    ]


@pytest.mark.parametrize("device", ["banana", "cuda:1", "meta"])
def test_adapt_on_a_device_it_cannot_train_on(files, tmp_path, capsys, no_cuda, device):
    one_line_error(capsys, adapt_argv(files, tmp_path, "--device", device), f"--device {device}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--dino-out-dim", "--dino-bottleneck", "--global-tokens", "--local-tokens"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_adapt_with_a_size_below_one(files, tmp_path, capsys, flag, value):
    one_line_error(capsys, adapt_argv(files, tmp_path, flag, value), f"argument {flag}:", f"got {value}", ">= 1")
    assert not (tmp_path / "run").exists()


def test_adapt_with_a_lora_rank_below_one(files, tmp_path, capsys):
    one_line_error(capsys, adapt_argv(files, tmp_path, "--mode", "lora", "--lora-rank", "0"), "--lora-rank 0", ">= 1")


def test_eval_landcover_on_a_single_array(files, capsys):
    err = one_line_error(capsys, ["eval", files["MODEL"], "--task", "landcover", "--chips", files["IMG"]], str(files["IMG"]))
    assert "holds one array" in err and "'labels'" in err
    with pytest.raises(InvalidInputError) as info:
        load_landcover_chips(files["IMG"])
    assert info.value.field == "path"


def test_eval_landcover_on_chips_missing_a_field(files, tmp_path, capsys):
    chips = tmp_path / "chips.npz"
    with np.load(CHIPS_PATH) as data:
        np.savez(chips, **{key: data[key] for key in data.files if key != "labels"})
    one_line_error(capsys, ["eval", files["MODEL"], "--task", "landcover", "--chips", chips], str(chips), "['labels']")


def test_a_config_json_with_an_unknown_arch_kwargs_key(files, tmp_path, capsys):
    config = files["FOO"] / "config.json"
    argv = ["embed", files["FOO"], files["IMG"], "--sensor", "sentinel2_rgb", "--out", tmp_path / "e.npz"]
    one_line_error(capsys, argv, str(config), "'arch_kwargs.foo'", "not a setting of timm's VisionTransformer")
    with pytest.raises(ConfigError) as info:
        XStars.from_pretrained(files["FOO"])
    assert info.value.field == "arch_kwargs.foo" and str(config) in str(info.value)


def test_new_with_an_unknown_or_reserved_arch_keyword():
    with pytest.raises(UnknownOptionError, match="did you mean 'depth'") as info:
        XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], patch_size=8, img_size=64, deph=2)
    assert info.value.field == "deph" and isinstance(info.value, TypeError)
    with pytest.raises(UnknownOptionError, match="'in_chans' is set by the model itself") as info:
        XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], patch_size=8, img_size=64, in_chans=4)
    assert info.value.field == "in_chans"


def test_arch_kwargs_timm_cannot_build_are_a_config_error():
    with pytest.raises(ConfigError, match=r"timm cannot build 'vit_tiny_patch16_224' with arch_kwargs") as info:
        XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], patch_size=8, img_size=64, embed_dim=32, num_heads=5)
    assert info.value.field == "arch_kwargs"


HUGE_SHAPE = (3, 200000, 200000)  # 112 GiB as uint8, 559 GiB with the float32 copy embed makes


@pytest.fixture(scope="module")
def huge_tif(tmp_path_factory):
    """A GeoTIFF that declares 200000 x 200000 px x 3 bands and stores none of them (a sparse
    tiled file of a few kB)."""
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path_factory.mktemp("huge") / "huge.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=HUGE_SHAPE[2], height=HUGE_SHAPE[1], count=HUGE_SHAPE[0], dtype="uint8",
        tiled=True, blockxsize=4096, blockysize=4096, sparse_ok=True, BIGTIFF="YES", crs="EPSG:32631",
        transform=from_origin(500000, 4000000, 10, 10),
    ):
        pass
    assert path.stat().st_size < 1_000_000
    return path


def test_embed_refuses_a_raster_that_would_not_fit_in_memory_before_reading_it(files, huge_tif, tmp_path, capsys):
    available = rasters.available_memory()
    assert available is not None and available > 0  # Linux: psutil or /proc/meminfo
    if available >= np.prod(HUGE_SHAPE) * 5:
        pytest.skip(f"this machine has {available} bytes available: the declared raster would fit")
    err = one_line_error(
        capsys, ["embed", files["MODEL"], huge_tif, "--sensor", "sentinel2_rgb", "--out", tmp_path / "e.npz"],
        str(huge_tif), "3 x 200000 x 200000", "refused before reading it", "xstars embed-scene",
    )
    assert "111.8 GiB" in err
    assert not (tmp_path / "e.npz").exists()


def test_the_memory_check_compares_with_what_is_available(files, tmp_path, monkeypatch):
    scene = files["SCENE"]
    assert rasters.read_raster(scene, extra_bytes_per_value=4).ndim == 3
    monkeypatch.setattr(rasters, "available_memory", lambda: 1000)
    with pytest.raises(InvalidInputError, match=r"more than the 0\.0 GiB of memory available now") as info:
        rasters.read_raster(scene, field="files", too_large="Do X.")
    assert info.value.field == "files" and str(info.value).endswith("Do X.")
    monkeypatch.setattr(rasters, "available_memory", lambda: None)  # unknown: nothing is refused
    assert rasters.read_raster(scene).ndim == 3
