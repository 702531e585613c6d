"""Whitening of global embeddings: the fit, its use in embed(), saving and loading it, training
dropping it, the retrieval table's whitened rows and the CLI flag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from factories import tiny_model
from toy_data import ToyPairs
from xstars_models import StateDictMismatchError, XStars
from xstars_models.config import WHITENING_NAME, XStarsConfig
from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.evaluation import recall_at_k, retrieval_table
from xstars_models.training import TrainConfig, fit_global_whitening, pretrain
from xstars_models.whitening import GlobalWhitening, fit_whitening

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _features(n: int = 400, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two sensors' embeddings of the same n footprints: the second is the first plus a large
    constant offset, with the variance concentrated in one direction."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([20.0] + [1.0] * (dim - 1), dtype=torch.float64)
    a = torch.randn(n, dim, generator=generator, dtype=torch.float64) * scales
    b = a + 30.0 + 0.05 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return {"a": a, "b": b}


def test_whitened_training_features_are_centred_per_sensor_with_identity_covariance():
    features = _features()
    whitening = fit_whitening({"cls": features}, shrinkage=1e-9)
    white = {s: whitening.apply(x, "cls", s).double() for s, x in features.items()}
    for x in white.values():
        assert x.mean(0).abs().max() < 1e-4
    pooled = torch.cat(list(white.values()))
    covariance = pooled.T @ pooled / len(pooled)
    assert torch.allclose(covariance, torch.eye(8, dtype=torch.float64), atol=1e-3)


def test_whitening_removes_a_sensor_offset_and_a_dominant_direction():
    train, test = _features(seed=0), _features(n=100, seed=1)
    raw = recall_at_k(test["a"], test["b"])["r@1"]
    whitening = fit_whitening({"cls": train})
    whitened = recall_at_k(whitening.apply(test["a"], "cls", "a"), whitening.apply(test["b"], "cls", "b"))["r@1"]
    assert raw < 0.2 and whitened > 0.95


def test_shrinkage_moves_the_projection_towards_a_rotation():
    features = _features()
    strong = fit_whitening({"cls": features}, shrinkage=100.0).projections["cls"].double()
    # Nearly equal column norms: every axis divided by about the same (shrunk) value.
    norms = strong.norm(dim=0)
    assert norms.max() / norms.min() < 1.05
    weak = fit_whitening({"cls": features}, shrinkage=1e-6).projections["cls"].double().norm(dim=0)
    assert weak.max() / weak.min() > 10


@pytest.mark.parametrize(
    "features, shrinkage, error, message",
    [
        ({"cls": {"a": torch.randn(5, 4), "b": torch.randn(5, 4)}}, 0.0, InvalidOptionError, "shrinkage must be > 0"),
        ({"cls": {"a": torch.randn(1, 4), "b": torch.randn(5, 4)}}, 0.01, InvalidInputError, "N >= 2"),
        ({"cls": {"a": torch.full((5, 4), float("nan")), "b": torch.randn(5, 4)}}, 0.01, InvalidInputError, "NaN or inf"),
        ({"cls": {"a": torch.randn(5, 4), "b": torch.randn(5, 3)}}, 0.01, InvalidInputError, "different widths"),
        ({"cls": {"a": torch.ones(5, 4), "b": torch.ones(5, 4)}}, 0.01, InvalidInputError, "collapsed"),
        ({"cls": {}}, 0.01, InvalidInputError, "no sensors"),
    ],
)
def test_fit_refuses_bad_features(features, shrinkage, error, message):
    with pytest.raises(error, match=message) as info:
        fit_whitening(features, shrinkage)
    assert info.value.field == ("shrinkage" if error is InvalidOptionError else "features")


def test_apply_names_the_sensor_and_pool_it_was_not_fit_for():
    whitening = fit_whitening({"cls": _features()})
    with pytest.raises(InvalidOptionError, match=r"fit on sensors \['a', 'b'\], not 'landsat'.*fit_global_whitening.*or embed without whitening \(whiten=False\)") as info:
        whitening.apply(torch.zeros(2, 8), "cls", "landsat")
    assert info.value.field == "sensor" and info.value.settings == {"whiten": False}
    with pytest.raises(InvalidOptionError, match="not 'mean'") as info:
        whitening.apply(torch.zeros(2, 8), "mean", "a")
    assert info.value.field == "output"


def test_centres_and_projections_that_do_not_fit_are_refused():
    good = fit_whitening({"cls": _features()})
    with pytest.raises(InvalidInputError, match="matching centres and projections") as info:
        GlobalWhitening(good.centres, {"mean": good.projections["cls"]}, 0.01)
    assert info.value.field == "projections"
    with pytest.raises(InvalidInputError, match="do not fit") as info:
        GlobalWhitening(good.centres, {"cls": good.projections["cls"][:4]}, 0.01)
    assert info.value.field == "centres"


@pytest.fixture(scope="module")
def whitened_model() -> XStars:
    model = tiny_model(extra_sensors=("aerial",))
    model.whitening = fit_global_whitening(model, ToyPairs(12), batch_size=5, fit_on="toy pairs", progress=False)
    return model


def test_embed_whiten_applies_the_fitted_whitening(whitened_model):
    images = ToyPairs(3, seed=5).aerial
    for output in ("cls", "mean"):
        raw = whitened_model.embed(images, "aerial", output=output, progress=False)
        white = whitened_model.embed(images, "aerial", output=output, progress=False, whiten=True)
        assert torch.equal(white, whitened_model.whitening.apply(raw, output, "aerial"))
        assert not torch.allclose(white, raw)


def test_embed_whiten_errors_name_the_fix(whitened_model):
    images = ToyPairs(2).aerial
    with pytest.raises(InvalidOptionError, match="^whiten=True needs a fitted whitening.*fit_global_whitening") as info:
        tiny_model(extra_sensors=("aerial",)).embed(images, "aerial", whiten=True)
    assert info.value.field == "whiten"
    with pytest.raises(InvalidOptionError, match="not output='patch'") as info:
        whitened_model.embed(images, "aerial", output="patch", whiten=True)
    assert info.value.field == "output"
    with pytest.raises(InvalidOptionError, match="not output='cls' with layers=1") as info:
        whitened_model.embed(images, "aerial", layers=1, whiten=True)
    assert info.value.field == "layers"


def test_whitening_is_saved_with_the_model_and_loaded_strictly(whitened_model, tmp_path):
    folder = whitened_model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert WHITENING_NAME in config["files"]
    assert config["whitening"]["sensors"] == ["sentinel2_rgb", "aerial"] and config["whitening"]["fit_on"] == "toy pairs"
    loaded = XStars.from_pretrained(folder)
    images = ToyPairs(2, seed=3).s2
    assert torch.equal(
        loaded.embed(images, "sentinel2_rgb", progress=False, whiten=True),
        whitened_model.embed(images, "sentinel2_rgb", progress=False, whiten=True),
    )
    # config.json naming a sensor the file has no centre for is refused, not half-loaded.
    config["whitening"]["sensors"].append("landsat")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(StateDictMismatchError, match=r"missing \['cls.centre.landsat', 'mean.centre.landsat'\]"):
        XStars.from_pretrained(folder)


def test_a_config_without_whitening_has_no_whitening_file(tmp_path):
    folder = tiny_model(extra_sensors=()).save_pretrained(tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    assert data["whitening"] == {} and WHITENING_NAME not in data["files"]
    del data["whitening"]  # configs written before whitening existed
    config = XStarsConfig.from_dict(data)
    assert config.whitening == {} and WHITENING_NAME not in config.weight_files
    assert XStars.from_pretrained(folder).whitening is None


@pytest.mark.filterwarnings("ignore::UserWarning")  # one step: barely moved, and collapsed
def test_training_drops_a_whitening_fit_on_other_weights(whitened_model, tmp_path):
    start = tiny_model(extra_sensors=("aerial",))
    start.whitening = whitened_model.whitening
    config = TrainConfig(steps=1, batch_size=4, warmup_steps=0, dino_out_dim=16, local_crops=0, checkpoint_every=1)
    trained = pretrain(start, ToyPairs(4), config, out_dir=tmp_path, device="cpu", progress=False)
    assert trained.whitening is None and trained.config.whitening == {}


def test_retrieval_table_whitened_rows_and_their_baselines(whitened_model):
    pairs = ToyPairs(6, seed=9)
    features = ("cls", "cls-whitened")
    with_baselines = retrieval_table(whitened_model, pairs, "aerial", "sentinel2_rgb", features, whitening_pairs=ToyPairs(12))
    rows = with_baselines["rows"]
    assert {"model (cls-whitened)", "random init (cls-whitened)", "random init + stem transfer (cls-whitened)"} <= set(rows)
    without = retrieval_table(whitened_model, pairs, "aerial", "sentinel2_rgb", features)["rows"]
    assert "model (cls-whitened)" in without and "random init (cls-whitened)" not in without
    assert without["model (cls-whitened)"] == rows["model (cls-whitened)"]
    with pytest.raises(InvalidOptionError, match="has none") as info:
        retrieval_table(tiny_model(extra_sensors=("aerial",)), pairs, "aerial", "sentinel2_rgb", features)
    assert info.value.field == "features"


def test_cli_embed_whiten(whitened_model, tmp_path):
    folder = whitened_model.save_pretrained(tmp_path / "m")
    image = tmp_path / "img.npy"
    np.save(image, ToyPairs(1).aerial[0].numpy().astype(np.uint8))
    out = tmp_path / "emb.npy"
    cli = [sys.executable, "-m", "xstars_models.cli", "embed", str(folder), str(image), "--sensor", "aerial", "--out", str(out)]
    done = subprocess.run([*cli, "--whiten"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = whitened_model.embed(np.load(image), "aerial", progress=False, whiten=True)[0]
    assert np.allclose(np.load(out), expected.numpy(), atol=1e-5)
    refused = subprocess.run([*cli, "--whiten", "--output", "patch", "--overwrite"], capture_output=True, text=True)
    # The command names its own flags, not the API's keywords.
    assert refused.returncode == 2 and "xstars embed: error: --whiten applies to the final" in refused.stderr
    assert "not --output patch" in refused.stderr and "whiten=True" not in refused.stderr


def test_shrinkage_choice_takes_the_most_regularised_within_one_standard_error():
    sys.path.insert(0, str(SCRIPTS))
    from whitening_shrinkage import one_standard_error_choice

    # Best 0.90 on 105 pairs: standard error 0.029, so 0.89 is within it and 0.80 is not.
    assert one_standard_error_choice({0.1: 0.80, 0.01: 0.89, 0.001: 0.90}, 105) == 0.01
    assert one_standard_error_choice({0.1: 0.80, 0.01: 0.85, 0.001: 0.90}, 105) == 0.001


def test_embed_scene_writes_whitened_tile_vectors(whitened_model, tmp_path):
    import geopandas
    import pyarrow.parquet
    from affine import Affine

    from xstars_models.scenes import embed_scene

    scene = ToyPairs(1, size=128, seed=4).s2[0].numpy().astype(np.uint8)  # 3 x 128 x 128, 2 x 2 tiles of 64 px
    options = dict(tile=64, output="cls", progress=False, transform=Affine(10, 0, 500000, 0, -10, 4000000), crs="EPSG:32618")
    result = embed_scene(whitened_model, scene, "sentinel2_rgb", out=tmp_path / "w.parquet", whiten=True, **options)
    vectors = np.stack(geopandas.read_parquet(result.path)["embedding"].to_numpy())
    tiles = np.stack([scene[:, r : r + 64, c : c + 64] for r in (0, 64) for c in (0, 64)])
    expected = whitened_model.embed(tiles, "sentinel2_rgb", progress=False, whiten=True).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-3)
    assert json.loads(pyarrow.parquet.read_schema(result.path).metadata[b"xstars"])["whitened"] is True
    with pytest.raises(ValueError, match="not output='map'"):
        embed_scene(whitened_model, scene, "sentinel2_rgb", out=tmp_path / "m.tif", whiten=True, **{**options, "output": "map"})
    # A sensor the whitening was not fit on is refused before any tile is read.
    three_sensors = tiny_model()
    three_sensors.whitening = whitened_model.whitening
    with pytest.raises(ValueError, match="not 'sentinel2'"):
        embed_scene(three_sensors, scene, "sentinel2", out=tmp_path / "x.parquet", whiten=True, **options)


def test_whitening_travels_through_the_hub(whitened_model, hub_server, hf_cache):
    """push_to_hub uploads whitening.safetensors with the weights; from_pretrained of the repo
    verifies and loads it."""
    repo_id = "org/whitened-tiny"
    commit = whitened_model.push_to_hub(repo_id)
    assert WHITENING_NAME in hub_server.files(repo_id, commit)
    loaded = XStars.from_pretrained(f"{repo_id}@{commit}")
    images = ToyPairs(2, seed=7).aerial
    assert torch.equal(
        loaded.embed(images, "aerial", output="mean", progress=False, whiten=True),
        whitened_model.embed(images, "aerial", output="mean", progress=False, whiten=True),
    )
