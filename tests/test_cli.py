"""The xstars command: output, files written, and one-line errors with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from factories import tiny_model
from xstars_models.cli import main
from xstars_models.samples import load_sample, sample_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    model = tiny_model()
    model.save_pretrained(folder)
    return model, folder


def test_embed_writes_npz_equal_to_the_api(model_dir, tmp_path, capsys):
    model, folder = model_dir
    out = tmp_path / "emb.npz"
    files = [str(sample_path("sentinel2_rgb_coast")), str(sample_path("sentinel2_rgb_inland"))]
    assert main(["embed", str(folder), "--sensor", "sentinel2_rgb", *files, "--out", str(out), "--output", "map"]) == 0
    stored = np.load(out)
    expected = model.embed(load_sample("sentinel2_rgb_coast"), "sentinel2_rgb", output="map")[0]
    assert torch.allclose(torch.from_numpy(stored["sentinel2_rgb_coast"]), expected, atol=1e-6)
    assert "wrote" in capsys.readouterr().out


def test_info_and_verify(model_dir, capsys):
    _, folder = model_dir
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "sensor aerial: 5 m GSD, patch 16 px (80 m per token)" in text and "0.665 um" in text
    assert main(["verify", str(folder)]) == 0
    assert capsys.readouterr().out.count("ok  ") == 3


def test_verify_reports_corruption_in_one_line(tmp_path, capsys):
    folder = tiny_model().save_pretrained(tmp_path / "m")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[50] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars verify: error: model.safetensors") and "corrupted" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "no-such-model"], "Unknown model 'no-such-model'"),
        (["embed", "MODEL", "--sensor", "landsat8", "IMG", "--out", "x.npz"], "no stem for sensor 'landsat8'"),
        (["embed", "MODEL", "--sensor", "sentinel2_rgb", "IMG", "--out", "x.txt"], "use a .npy or .npz"),
        (["embed", "MODEL", "--sensor", "sentinel2_rgb", "README.md", "--out", "x.npz"], "unsupported file type '.md'"),
    ],
)
def test_bad_input_exits_non_zero_without_traceback(model_dir, tmp_path, argv, message):
    _, folder = model_dir
    argv = [str(folder) if a == "MODEL" else str(sample_path("sentinel2_rgb_coast")) if a == "IMG" else a for a in argv]
    argv = [str(tmp_path / a) if a.startswith("x.") else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "xstars_models.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_units():
    proc = subprocess.run([sys.executable, "-m", "xstars_models.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "metres" in proc.stdout and "micrometres" in proc.stdout
