"""`xstars embed` refuses, before reading, a .npy or PNG/JPEG whose decoded size would not fit in
memory, and a PNG Pillow takes for a decompression bomb: one line naming the file and pointing to
`xstars embed-scene`, never numpy's MemoryError or Pillow's traceback."""

from __future__ import annotations

import numpy as np
import pytest
from factories import tiny_model
from PIL import Image

from xstars_models.cli import main
from xstars_models.io import rasters


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model().save_pretrained(tmp_path_factory.mktemp("m") / "model"))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    return err


def test_a_npy_declaring_a_huge_array_is_refused_from_its_header(model_dir, tmp_path, capsys):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as fh:  # the header of a 200000 x 200000 x 3 uint8 array, and no data
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (200000, 200000, 3)})
    assert path.stat().st_size < 1000
    assert main(["embed", model_dir, str(path), "--sensor", "sentinel2_rgb", "--out", str(tmp_path / "e.npz")]) == 2
    err = one_line(capsys)
    assert str(path) in err and "200000 x 200000 x 3" in err and "xstars embed-scene" in err
    assert not (tmp_path / "e.npz").exists()


def test_a_png_too_large_for_the_memory_left_is_refused_before_decoding(model_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "chip.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    monkeypatch.setattr(rasters, "available_memory", lambda: 1000)
    assert main(["embed", model_dir, str(path), "--sensor", "sentinel2_rgb", "--out", str(tmp_path / "e.npz")]) == 2
    err = one_line(capsys)
    assert str(path) in err and "64 x 64 x 3" in err and "refused before reading it" in err
    monkeypatch.setattr(rasters, "available_memory", lambda: None)  # unknown: nothing is refused
    assert main(["embed", model_dir, str(path), "--sensor", "sentinel2_rgb", "--out", str(tmp_path / "e.npz")]) == 0


def test_a_decompression_bomb_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px is then over twice the limit: Pillow refuses
    assert main(["embed", model_dir, str(path), "--sensor", "sentinel2_rgb", "--out", str(tmp_path / "e.npz")]) == 2
    err = one_line(capsys)
    assert str(path) in err and "decompression bomb" in err and "xstars embed-scene" in err
