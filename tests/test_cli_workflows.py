"""The xstars commands that run whole workflows: adapt on real co-registered rasters, push to the
loopback Hub, and retrieval evaluation; each checked against the Python API it wraps."""

from __future__ import annotations

import json

import pytest
import torch

from factories import HOMONIM_AERIAL, HOMONIM_S2, require_shared_data, rgb_images, tiny_model
from xstars_models import XStars
from xstars_models import manifest as manifest_module
from xstars_models.cli import main
from xstars_models.data import raster_pairs
from xstars_models.evaluation import retrieval_table

TRAIN_FLAGS = ["--steps", "2", "--batch-size", "2", "--dino-out-dim", "64", "--local-crops", "2", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_model(extra_sensors=()).save_pretrained(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def adapted(base_dir, tmp_path_factory):
    """``xstars adapt`` of the tiny S2 model to aerial 5 m on the real homonim rasters."""
    require_shared_data()
    work = tmp_path_factory.mktemp("adapt")
    argv = [
        "adapt", str(base_dir), "--sensor", "aerial_rgb", "--gsd", "5", "--name", "aerial",
        "--new", *map(str, HOMONIM_AERIAL), "--old", str(HOMONIM_S2), "--old-bands", "1", "2", "3",
        "--mode", "stem", "--run-dir", str(work / "run"), "--out", str(work / "out"),
        "--adapter", str(work / "aerial.adapter.safetensors"), "--device", "cpu", *TRAIN_FLAGS,
    ]
    assert main(argv) == 0
    return work


def test_adapt_trains_saves_and_records_the_run(adapted, base_dir):
    model = XStars.from_pretrained(adapted / "out")
    assert list(model.sensors) == ["sentinel2_rgb", "aerial"]
    assert model.sensors["aerial"].patch_size == 16  # 5 m pixels, 80 m tokens like the base's 10 m x 8
    record = model.training_record
    assert record["recipe"] == "adapt" and record["settings"]["steps"] == 2 and record["settings"]["dino"]["out_dim"] == 64
    assert "ngi_rgb_byte_1.tif" in record["data"] and "pairs of 640 m (training area" in record["data"]
    lines = (adapted / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert model.lineage["base_model"] == str(base_dir) and model.lineage["adapt_mode"] == "stem"
    # The adapter file alone, loaded onto the base, gives the adapted model's aerial embeddings.
    on_base = XStars.load_adapter(adapted / "aerial.adapter.safetensors", base=XStars.from_pretrained(base_dir))
    x = rgb_images(2, 128)
    assert torch.equal(on_base.embed(x, "aerial", output="map"), model.embed(x, "aerial", output="map"))


def test_adapt_config_file_and_flags(base_dir, tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"steps": 5, "alpha": 2.0, "bogus": 1}))
    argv = ["adapt", str(base_dir), "--sensor", "aerial_rgb", "--new", "a.tif", "--old", "b.tif", "--config", str(config), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "unknown TrainConfig fields ['bogus']" in capsys.readouterr().err
    both = ["adapt", str(base_dir), "--sensor", "aerial_rgb", "--new", "a.tif", "--old", "b.tif", "--msc-root", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(both) == 2
    assert "either as rasters" in capsys.readouterr().err
    unknown = ["adapt", str(base_dir), "--sensor", "aerial_rbg", "--new", "a.tif", "--old", "b.tif", "--out", str(tmp_path / "o")]
    assert main(unknown) == 2
    err = capsys.readouterr().err
    assert "Unknown sensor 'aerial_rbg'" in err and "aerial_rgb" in err and err.count("\n") == 1


def test_adapt_names_the_training_settings_it_refuses_by_their_flags(adapted, base_dir, tmp_path, capsys):
    """A setting adapt would ignore, and a run folder that already holds a checkpoint, are named
    by the flags that set them."""
    argv = [
        "adapt", str(base_dir), "--sensor", "aerial_rgb", "--gsd", "5", "--name", "aerial",
        "--new", *map(str, HOMONIM_AERIAL), "--old", str(HOMONIM_S2), "--old-bands", "1", "2", "3",
        "--out", str(tmp_path / "out"), "--device", "cpu", *TRAIN_FLAGS,
    ]
    assert main([*argv, "--run-dir", str(tmp_path / "run"), "--anchor-weight", "1"]) == 2
    err = capsys.readouterr().err
    assert "xstars adapt: error: --anchor-weight 1.0 is a setting of pretrain" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--run-dir", str(adapted / "run")]) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint at step 2; pass --resume to continue it" in err and "resume=True" not in err


def test_push_uploads_what_from_pretrained_loads(adapted, tmp_path, hub_server, hf_cache, monkeypatch, capsys):
    monkeypatch.setattr(manifest_module, "_registered", {})
    manifest = tmp_path / "models.json"
    argv = ["push", str(adapted / "out"), "org/cli-pushed", "--manifest", str(manifest), "--model-id", "cli-pushed"]
    assert main(argv) == 0
    commit = hub_server.head("org/cli-pushed")
    assert f"org/cli-pushed@{commit}" in capsys.readouterr().out
    entry = json.loads(manifest.read_text())["models"]["cli-pushed"]
    assert entry["source"] == {"repo_id": "org/cli-pushed", "revision": commit}
    remote = hub_server.files("org/cli-pushed", commit)
    for name in ("config.json", "model.safetensors", "stem-aerial.safetensors"):
        assert remote[name] == (adapted / "out" / name).read_bytes()
    assert main(argv) == 0  # unchanged weights: no new commit
    assert hub_server.head("org/cli-pushed") == commit

    generated = remote["README.md"]
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "README.md").write_bytes(generated + b"\n## Notes from the owners\n")
    hub_server.seed_repo("org/cli-pushed", edited)
    assert main(argv) == 0
    assert hub_server.files("org/cli-pushed", hub_server.head("org/cli-pushed"))["README.md"].endswith(b"owners\n")
    assert main([*argv, "--overwrite-card"]) == 0
    assert hub_server.files("org/cli-pushed", hub_server.head("org/cli-pushed"))["README.md"] == generated


def test_push_token_problems_are_one_line_and_never_show_the_token(adapted, hub_server, hf_cache, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    secret = "hf_cli_secret_not_valid_42"
    monkeypatch.setenv("HF_TOKEN", secret)
    assert main(["push", str(adapted / "out"), "org/bad-token"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("xstars push: error:") and "rejected the token" in err and err.count("\n") == 1
    assert secret not in out + err and hub_server.head("org/bad-token") is None
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert main(["push", str(adapted / "out"), "org/no-token"]) == 2
    err = capsys.readouterr().err
    assert "token" in err and err.count("\n") == 1 and hub_server.head("org/no-token") is None


def test_eval_retrieval_prints_and_writes_the_api_table(adapted, tmp_path, capsys):
    out = tmp_path / "retrieval.json"
    argv = [
        "eval", str(adapted / "out"), "--task", "retrieval", "--sensor-a", "aerial", "--a", *map(str, HOMONIM_AERIAL),
        "--sensor-b", "sentinel2_rgb", "--b", str(HOMONIM_S2), "--b-bands", "1", "2", "3", "--json", str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| model (patch) |" in printed and "| random init (patch) |" in printed and "| mean colour |" in printed
    written = json.loads(out.read_text())
    model = XStars.from_pretrained(adapted / "out")
    specs = {s: model.sensors[s].spec for s in ("aerial", "sentinel2_rgb")}
    inputs = {"aerial": (specs["aerial"], HOMONIM_AERIAL, None), "sentinel2_rgb": (specs["sentinel2_rgb"], [HOMONIM_S2], [1, 2, 3])}
    pairs, _ = raster_pairs(inputs, 640.0, None, "val", 0.2, "y")
    expected = retrieval_table(model, pairs, "aerial", "sentinel2_rgb")
    assert written["pairs"] == expected["pairs"] == len(pairs) > 10
    assert written["rows"] == expected["rows"]


def test_eval_retrieval_needs_both_sensors(base_dir, capsys):
    assert main(["eval", str(base_dir), "--task", "retrieval", "--sensor-a", "sentinel2_rgb"]) == 2
    assert "--task retrieval needs" in capsys.readouterr().err
