"""The quick-start job: embeddings of the bundled samples and the PCA picture."""

from __future__ import annotations

import numpy as np
from PIL import Image

from factories import tiny_model
from xstars_models.demo import main


def test_demo_writes_embeddings_and_picture(tmp_path, capsys):
    folder = tiny_model().save_pretrained(tmp_path / "model")
    assert main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 0
    stored = np.load(tmp_path / "out" / "embeddings.npz")
    assert list(stored["names"]) == ["sentinel2_rgb_coast", "sentinel2_rgb_inland"]
    assert stored["cls"].shape == (2, 32) and stored["maps"].shape == (2, 32, 32, 32)
    picture = Image.open(tmp_path / "out" / "pca.png")
    assert picture.size == (256 * 2 + 8, 256 * 2 + 8)
    pixels = np.asarray(picture)
    assert pixels[:, 264:].std() > 10  # the PCA half is not blank
    assert "wrote" in capsys.readouterr().out


def test_demo_unknown_model_is_one_line(tmp_path, capsys):
    assert main(["--model", "no-such-model", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("demo: error: Unknown model 'no-such-model'")


def test_demo_without_the_geo_extra_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import sys

    folder = tiny_model().save_pretrained(tmp_path / "model")
    monkeypatch.setitem(sys.modules, "rasterio", None)  # what an install without the extra sees
    assert main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("demo: error: Reading samples needs rasterio") and "pip install 'xstars-models[geo]'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
