"""Warnings point at the user's line (this file), whichever public entry point and however many
internal calls, wrappers and decorators lie between it and the ``warnings.warn``."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import rasterio
from affine import Affine

from factories import tiny_model
from toy_data import ToyPairs
from xstars_models import get_sensor
from xstars_models.errors import _PACKAGE_DIR
from xstars_models.samples import sample_path
from xstars_models.scenes import embed_scene
from xstars_models.training import TrainConfig, adapt, pretrain

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model


def caught(call, match: str) -> list[warnings.WarningMessage]:
    """The warnings whose message contains ``match`` that ``call()`` emits (all shown, none filtered)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    found = [w for w in record if match in str(w.message)]
    assert found, f"no warning containing {match!r}; got {[str(w.message) for w in record]}"
    return found


def assert_points_here(found: list[warnings.WarningMessage]) -> None:
    for w in found:
        assert w.filename == __file__, f"{w.message} points at {w.filename}:{w.lineno}"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_user_stacklevel_skips_the_package_and_forwarding_wrappers():
    # Code compiled under the package's folder stands for package functions: one decorated with
    # torch.inference_mode (a wrapper frame in torch) calling another that warns.
    source = (
        "import warnings, torch\n"
        "from xstars_models.errors import user_stacklevel\n"
        "def inner():\n"
        "    warnings.warn('deep in the package', UserWarning, stacklevel=user_stacklevel())\n"
        "@torch.inference_mode()\n"
        "def outer():\n"
        "    inner()\n"
    )
    namespace: dict = {}
    exec(compile(source, os.path.join(_PACKAGE_DIR, "stand_in.py"), "exec"), namespace)
    found = caught(namespace["outer"], "deep in the package")
    assert_points_here(found)


def test_tiling_warning_points_at_the_caller(model, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (3, 70, 70), dtype=np.uint8)  # 70 px: not 8k
    found = caught(lambda: embed_scene(model, pixels, SENSOR, out=tmp_path / "a.tif", progress=False),
                   "is not a multiple of")
    assert_points_here(found)
    found = caught(lambda: model.embed_scene(pixels, SENSOR, out=tmp_path / "b.tif", progress=False),
                   "is not a multiple of")
    assert_points_here(found)


def _copy(tmp_path, name, **profile):
    with rasterio.open(sample_path("sentinel2_rgb_inland")) as src:
        meta, data = src.profile, src.read()
    meta.update(profile)
    with rasterio.open(tmp_path / name, "w", **meta) as dst:
        dst.write(data)
    return tmp_path / name


def test_reading_warnings_point_at_the_caller(model, tmp_path):
    with rasterio.open(sample_path("sentinel2_rgb_inland")) as src:
        t = src.transform
    near = _copy(tmp_path, "near.tif", transform=Affine(10.5, 0, t.c, 0, -10.5, t.f))
    found = caught(lambda: model.embed_scene(near, SENSOR, out=tmp_path / "n.tif", tile=256, progress=False),
                   "differs from sensor")
    assert_points_here(found)

    bare = _copy(tmp_path, "bare.tif", crs=None, transform=Affine.identity())
    found = caught(lambda: embed_scene(model, bare, SENSOR, out=tmp_path / "g.tif", tile=256, progress=False),
                   "has no georeferencing")
    assert_points_here(found)


def _config() -> TrainConfig:
    # teacher_momentum's default over 2 steps keeps 99% of the teacher's initial weights: warns.
    return TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, dino_out_dim=64, local_crops=2)


def test_teacher_lag_warning_points_at_the_caller(tmp_path):
    options = dict(config=_config(), device="cpu", progress=False)
    found = caught(lambda: pretrain(tiny_model(extra_sensors=()), ToyPairs(4), out_dir=tmp_path / "p", **options),
                   "teacher_momentum=")
    assert_points_here(found)

    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    found = caught(lambda: adapt(tiny_model(extra_sensors=()), new, ToyPairs(4), mode="stem", out_dir=tmp_path / "a",
                                 **options), "teacher_momentum=")
    assert_points_here(found)
    found = caught(lambda: tiny_model(extra_sensors=()).adapt(new, ToyPairs(4), mode="stem", out_dir=tmp_path / "m",
                                                              **options), "teacher_momentum=")
    assert_points_here(found)


def test_embed_trimming_warning_points_at_the_caller(model):
    """``embed`` runs under ``torch.inference_mode``, whose decorator adds frames: the warning still
    names this file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.embed(np.zeros((70, 64, 3), dtype=np.uint8), "sentinel2_rgb", progress=False)
    trims = [w for w in caught if "not a multiple of the 8 px patch" in str(w.message)]
    assert len(trims) == 1 and trims[0].filename == __file__
