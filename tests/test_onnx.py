"""ONNX export: the file ONNX Runtime runs gives the PyTorch model's outputs from raw digital numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import tiny_model

from xstars_models import XStars
from xstars_models.cli import main
from xstars_models.errors import InvalidOptionError

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model() -> XStars:
    return tiny_model()


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"digital_numbers": x})[0]


@pytest.mark.parametrize("output", ["cls", "mean", "map"])
def test_onnx_matches_pytorch_at_two_sizes_and_batches(model, tmp_path, output):
    path = tmp_path / f"{output}.onnx"
    model.export_onnx(path, sensor="aerial", output=output)
    rng = np.random.default_rng(0)
    # The aerial stem's patch is 16 px; neither size is the traced one, the second is not square.
    for batch, height, width in ((1, 64, 64), (3, 96, 48)):
        x = rng.integers(0, 256, (batch, 3, height, width)).astype(np.float32)
        expected = model.embed(torch.from_numpy(x), "aerial", output, precision="fp32", progress=False).numpy()
        got = _run(path, x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_onnx_takes_the_rasters_own_integer_type(model, tmp_path, dtype):
    path = tmp_path / f"{dtype}.onnx"
    model.export_onnx(path, sensor="sentinel2", output="cls", input_dtype=dtype)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == f"tensor({dtype})"
    top = 255 if dtype == "uint8" else 10000
    x = np.random.default_rng(2).integers(0, top, (2, model.sensors["sentinel2"].spec.num_bands, 32, 32)).astype(dtype)
    expected = model.embed(torch.from_numpy(x.astype(np.float32)), "sentinel2", "cls", precision="fp32", progress=False)
    got = session.run(None, {"digital_numbers": x})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="tensor\\(float\\)|type"):  # the graph takes only its own type
        session.run(None, {"digital_numbers": x.astype(np.float32)})


def test_onnx_metadata_and_int8_variant(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    model.name_or_path, model.revision = "tiny-test", "abc123"
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    record = model.export_onnx(fp32, sensor="sentinel2", output="cls")
    model.train()
    model.export_onnx(int8, sensor="sentinel2", output="cls", int8=True)
    assert model.training  # traced in eval mode, then put back as it was
    model.eval()
    assert record.size == fp32.stat().st_size
    assert not list(tmp_path.glob("*.tmp*")) and sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"]
    meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    spec = model.sensors["sentinel2"].spec
    assert meta["xstars.sensor"] == "sentinel2" and meta["xstars.output"] == "cls"
    assert json.loads(meta["xstars.bands"]) == [band.name for band in spec.bands]
    assert float(meta["xstars.gsd_m"]) == spec.gsd_m and meta["xstars.units"] == spec.units
    assert meta["xstars.model_id"] == "tiny-test" and meta["xstars.revision"] == "abc123"
    assert meta["xstars.package_version"]
    x = np.random.default_rng(1).integers(0, 3000, (4, spec.num_bands, 32, 32)).astype(np.float32)
    a, b = _run(fp32, x), _run(int8, x)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert int8.stat().st_size < fp32.stat().st_size
    print(f"int8 CLS cosine to fp32: min {cosine.min():.5f}")
    assert cosine.min() >= 0.99, cosine


def test_bundled_model_cls_matches(tmp_path):
    model = XStars.from_pretrained("xstars-s2-aerial", local_files_only=True)
    path = tmp_path / "s2.onnx"
    model.export_onnx(path, sensor="sentinel2_rgb")
    x = np.random.default_rng(2).integers(0, 256, (2, 3, 64, 64)).astype(np.float32)
    expected = model.embed(torch.from_numpy(x), "sentinel2_rgb", precision="fp32", progress=False).numpy()
    np.testing.assert_allclose(_run(path, x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sensor": "landsat9", "output": "cls"}, "sensor"),
        ({"sensor": "aerial", "output": "patch"}, "output"),
        ({"sensor": "aerial", "output": "cls", "opset": 17}, "opset"),
        ({"sensor": "aerial", "output": "cls", "size": 40}, "size"),
        ({"sensor": "aerial", "output": "cls", "input_dtype": "int16"}, "input_dtype"),
    ],
)
def test_bad_options_are_typed(model, tmp_path, kwargs, field):
    with pytest.raises(InvalidOptionError) as info:
        model.export_onnx(tmp_path / "x.onnx", **kwargs)
    assert info.value.field == field
    assert not list(tmp_path.iterdir())


def test_bad_path_is_typed(model, tmp_path):
    with pytest.raises(InvalidOptionError) as info:
        model.export_onnx(tmp_path / "x.txt", sensor="aerial")
    assert info.value.field == "path"


def test_cli_writes_the_file_and_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "s2.onnx"
    assert main(["export", "xstars-s2-aerial", str(out), "--sensor", "sentinel2_rgb", "--offline", "--input-dtype", "uint8"]) == 0
    assert out.stat().st_size > 0 and "sha256" in capsys.readouterr().out
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].type == "tensor(uint8)"
    assert main(["export", "xstars-s2-aerial", str(tmp_path / "x.onnx"), "--sensor", "nope", "--offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xstars export: error: argument --sensor:") and "\n" not in err
