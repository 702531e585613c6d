"""Every xstars subcommand given bad arguments, bad files or bad data: exit status 2 and a readable
message saying what is wrong (never a traceback), the whole of it when it spans lines."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from factories import rgb_images, tiny_model
from xstars_models.cli import build_parser, main
from xstars_models.samples import sample_path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model, copies of it with broken config.json/weights, and small inputs."""
    root = tmp_path_factory.mktemp("cli-errors")
    model = root / "model"
    tiny_model(extra_sensors=()).save_pretrained(model)

    def variant(name, change):
        folder = root / name
        shutil.copytree(model, folder)
        config = json.loads((folder / "config.json").read_text())
        change(config, folder)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    def garbage_weights(config, folder):
        data = b"\xff" * 64  # not safetensors, yet its sha256 is what config.json records
        (folder / "model.safetensors").write_bytes(data)
        config["files"]["model.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    out = {
        "MODEL": model,
        "RESNET": variant("resnet", lambda c, f: c.update(arch="resnet18")),
        "DEPTH_STR": variant("depth-str", lambda c, f: c["arch_kwargs"].update(depth="2")),
        "DEPTH_3": variant("depth-3", lambda c, f: c["arch_kwargs"].update(depth=3)),
        "GARBAGE": variant("garbage", garbage_weights),
        "IMG": root / "img.npy",
        "SCENE": root / "scene.tif",
        "PTH": root / "notes.pth",
    }
    np.save(out["IMG"], rgb_images(1)[0])
    shutil.copy(sample_path("sentinel2_rgb_coast"), out["SCENE"])
    out["PTH"].write_text("not a checkpoint")
    for name, config in {"STEPS_STR": {"steps": "2"}, "SCALE_SHORT": {"global_scale": [0.5]},
                         "BAD_JSON": None}.items():
        path = root / f"{name.lower()}.json"
        path.write_text("{not json" if config is None else json.dumps(config))
        out[name] = path
    return out


ADAPT = ["adapt", "MODEL", "--sensor", "aerial_rgb", "--new", "IMG", "--old", "IMG", "--out", "TMP/o"]

# (argv, a piece of the message). Names in capitals are the files of the fixture; TMP/ a fresh folder.
CASES = [
    (["list", "--sensor"], "argument --sensor: expected one argument"),
    (["info", "no-such-model"], "Unknown model 'no-such-model'"),
    (["info", "RESNET"], "field 'arch' 'resnet18' is not a timm VisionTransformer"),
    (["info", "DEPTH_STR"], "field 'arch_kwargs.depth' must be a positive whole number, got '2'"),
    (["info", "GARBAGE"], "model.safetensors at"),
    (["download"], "the following arguments are required: model"),
    (["download", "org/no-such-repo"], "Hub repo 'org/no-such-repo' not found"),
    (["verify", "TMP/absent"], "Unknown model"),
    (["embed", "MODEL", "--sensor", "sentinel2_rgb", "IMG", "--out", "TMP/e.npy", "--batch-size", "0"],
     "batch_size must be >= 1, got 0"),
    (["embed", "MODEL", "--sensor", "sentinel2_rgb", "IMG", "--out", "IMG"], "would replace the input"),
    (["embed", "MODEL", "--sensor", "sentinel2_rgb", "TMP/absent.npy", "--out", "TMP/e.npy"], "absent.npy"),
    (["embed", "MODEL", "--sensor", "sentinel2_rgb", "IMG", "--out", "TMP/e.npy", "--output", "pooled"],
     "invalid choice: 'pooled'"),
    (["embed-scene", "MODEL", "--sensor", "sentinel2_rgb", "SCENE", "--out", "TMP/m.tif", "--max-nodata", "2"],
     "argument --max-nodata: max_nodata is a fraction"),
    (["embed-scene", "MODEL", "--sensor", "sentinel2_rgb", "SCENE", "--out", "TMP/m.tif", "--tile", "7"], "tile"),
    (["embed-scene", "MODEL", "--sensor", "sentinel2_rgb", "SCENE", "--tile", "x"], "invalid int value: 'x'"),
    ([*ADAPT, "--config", "STEPS_STR"], "field 'steps': expected a whole number >= 0, got '2'"),
    ([*ADAPT, "--config", "SCALE_SHORT"], "field 'global_scale': expected [low, high] area fractions"),
    ([*ADAPT, "--config", "BAD_JSON"], "bad_json.json: not valid JSON"),
    ([*ADAPT, "--lr", "-1"], "--lr: expected a finite number >= 0, got -1.0"),
    ([*ADAPT[:3], "TMP/spec.json", *ADAPT[4:]], "spec.json"),
    (["adapt", "MODEL", "--sensor", "aerial_rgb", "--gsd", "1", "--new", "SCENE", "--old", "SCENE", "--out", "TMP/o"],
     "pixel size 10 m but sensor 'aerial_rgb' has a GSD of 1 m (900% apart). Give the sensor's real GSD"),
    (["push", "MODEL", "not a repo"], "Hub repo id 'not a repo' is not 'org/name'"),
    (["convert", "PTH", "TMP/c"], "notes.pth"),
    (["convert", "TMP/absent.pth", "TMP/c"], "No checkpoint file at"),
    (["eval", "MODEL", "--task", "retrieval"], "--task retrieval needs --sensor-a"),
    (["eval", "MODEL", "--task", "segmentation"], "invalid choice: 'segmentation'"),
    (["eval", "MODEL", "--task", "landcover", "--features", "cls-whitened"], "got ('cls-whitened',) (land cover compares raw features"),
    (["eval", "MODEL", "--task", "landcover", "--features", "median"], "invalid choice: 'median'"),
    (["export", "MODEL", "TMP/m.onnx", "--sensor", "aerial_rgb"], "argument --sensor: This model has no stem for sensor 'aerial_rgb'"),
    (["export", "MODEL", "TMP/m.txt", "--sensor", "sentinel2_rgb"], "the ONNX file name must end in .onnx"),
    (["embed-collection", "MODEL", "SCENE", "--sensor", "sentinel2_rgb", "--out", "TMP/d", "--workers", "0"],
     "--workers 0 must be a whole number >= 1"),
    (["embed-collection", "MODEL", "SCENE", "--sensor", "sentinel2_rgb", "--out", "TMP/d", "--scheduler", "banana"],
     "--scheduler banana: not a Dask scheduler address"),
    (["embed-collection", "MODEL", "SCENE", "--sensor", "nope", "--out", "TMP/d"], "argument --sensor: This model has no stem"),
    (["export", "MODEL", "TMP/m.onnx", "--sensor", "sentinel2_rgb", "--opset", "13"], "argument --opset: opset 13 has no antialiased Resize"),
    (["search", "TMP/absent"], "one of the arguments --image --near --like is required"),
    (["search", "TMP/absent", "--near", "13.4", "52.5"], "absent: no such dataset folder"),
]


def test_the_cases_cover_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {argv[0] for argv, _ in CASES} == set(sub.choices)


def run(argv, files, tmp_path, capsys) -> tuple[int, str]:
    argv = [str(files[a]) if a in files else a.replace("TMP", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    out = capsys.readouterr()
    assert out.out.count("Traceback") == 0
    return code, out.err


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_arguments_exit_2_with_one_readable_message(files, tmp_path, capsys, argv, message):
    code, err = run(argv, files, tmp_path, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"xstars {argv[0]}: error: ")]
    assert len(lines) == 1, err
    assert message in err


def test_multi_line_errors_are_shown_whole(files, tmp_path, capsys):
    code, err = run(["info", "DEPTH_3"], files, tmp_path, capsys)
    assert code == 2 and err.startswith("xstars info: error: Weights of")
    assert "missing (" in err and "blocks.2.attn.qkv.weight" in err and "arch_kwargs" in err


def test_adapt_on_nan_rasters_is_an_error_not_a_traceback(files, tmp_path, capsys):
    """NaN pixels are missing (whatever the file's nodata says), so rasters of NaN leave no
    footprint to train on: one line naming the threshold, not a NaN loss or a traceback."""
    import rasterio
    from affine import Affine

    rasters = {}
    for name, gsd, side in (("new", 5, 512), ("old", 10, 256)):
        pixels = np.random.default_rng(0).uniform(0, 255, (3, side, side)).astype(np.float32)
        pixels[:, :, : side * 7 // 8] = np.nan
        rasters[name] = tmp_path / f"{name}.tif"
        with rasterio.open(rasters[name], "w", driver="GTiff", width=side, height=side, count=3, dtype="float32",
                           crs="EPSG:32631", transform=Affine(gsd, 0, 500000, 0, -gsd, 5000000)) as dst:
            dst.write(pixels)
    argv = ["adapt", "MODEL", "--sensor", "aerial_rgb", "--gsd", "5", "--name", "aerial", "--new", str(rasters["new"]),
            "--old", str(rasters["old"]), "--run-dir", "TMP/run", "--out", "TMP/out", "--device", "cpu", "--steps", "2",
            "--batch-size", "2", "--dino-out-dim", "64", "--local-crops", "2", "--warmup-steps", "1"]
    code, err = run(argv, files, tmp_path, capsys)
    assert code == 2 and "xstars adapt: error: " in err and "max_nodata=0.05" in err


def test_api_keywords_in_messages_become_the_commands_flags(files, tmp_path, capsys, monkeypatch):
    from xstars_models import XStars

    model = XStars.from_pretrained(files["MODEL"])
    out = tmp_path / "m.tif"
    calls = {"n": 0}
    original = model.forward_tokens

    def dies_on_the_second_strip(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward_tokens", dies_on_the_second_strip)
    with pytest.raises(KeyboardInterrupt):
        model.embed_scene(files["SCENE"], "sentinel2_rgb", out=out, progress=False, batch_size=256)  # a call per strip
    argv = ["embed-scene", "MODEL", "--sensor", "sentinel2_rgb", "SCENE", "--out", str(out), "--max-nodata", "0.1",
            "--no-progress"]
    code, err = run(argv, files, tmp_path, capsys)
    assert code == 2 and "partial run with other settings" in err
    assert "--restart" in err and "resume=False" not in err


def test_offline_hint_names_the_flag(files, tmp_path, capsys, hf_cache):
    code, err = run(["info", "org/never-downloaded", "--offline"], files, tmp_path, capsys)
    assert code == 2 and "--offline or HF_HUB_OFFLINE=1" in err and "local_files_only" not in err


def test_subprocess_shows_no_traceback(files, tmp_path):
    argv = [sys.executable, "-m", "xstars_models.cli", "info", str(files["RESNET"])]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "resnet18" in proc.stderr


def test_typed_errors_name_the_commands_flags_whatever_the_settings_values(monkeypatch, capsys):
    # The command renders the error's settings by its flags: an on/off flag left off, a list value
    # (unhashable, so never one of the command's special cases) and a field the message leaves
    # unnamed, which then leads the line.
    from xstars_models.cli import embedding
    from xstars_models.errors import InvalidOptionError

    def refuse(args):
        raise InvalidOptionError(
            "window outside the scene; try {bounds} or embed {whiten}", field="tile",
            settings={"bounds": [0, 0, 10, 10], "whiten": False},
        )

    monkeypatch.setattr(embedding, "_embed_scene", refuse)
    assert main(["embed-scene", "MODEL", "--sensor", "sentinel2_rgb", "scene.tif"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "xstars embed-scene: error: argument --tile: window outside the scene; try --bounds [0, 0, 10, 10] "
        "or embed no --whiten\n"
    )
