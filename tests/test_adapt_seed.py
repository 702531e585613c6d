"""The run's seed makes training repeat (issue 27, point 7): the same adapt twice with the same
``seed``, from any state of the caller's random generators, writes byte-identical files; another
seed gives another stem; and the caller's global random state is the same after a run as before.

Files that hold timings are compared without them: the model's ``config.json`` (the training
record's ``wall_time_s``) and the run's ``metrics.jsonl`` (each line's ``time_s``). Every other
file, the adapter of ``xstars adapt --adapter`` included, is compared byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import rgb_images, tiny_model
from toy_data import ToyPairs

from xstars_models import get_sensor
from xstars_models.cli import main
from xstars_models.training import TrainConfig, adapt, pretrain

AERIAL = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
TIMED = {"config.json", "metrics.jsonl"}
ADAPTER = "aerial.adapter"


def small_config(seed: int) -> TrainConfig:
    return TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, dino_out_dim=32, local_crops=1, seed=seed)


def without_timings(path: Path) -> object:
    """The contents of a file that holds timings, with them left out."""
    if path.name == "config.json":
        config = json.loads(path.read_text())
        del config["training"]["wall_time_s"]
        return config
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in path.read_text().splitlines()]


def assert_same_files(first: Path, second: Path) -> list[str]:
    """Every file under ``first`` is in ``second`` with the same contents (timings aside)."""
    names = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(second)) for p in second.rglob("*") if p.is_file())
    for name in names:
        a, b = first / name, second / name
        if a.name in TIMED:
            assert without_timings(a) == without_timings(b), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
    return names


def adapt_into(folder: Path, seed: int, caller_seed: int) -> torch.Tensor:
    """Adapt the tiny model to aerial with ``seed`` after seeding the caller's generator with
    ``caller_seed``; save the model in ``folder/model`` and the run in ``folder/run``. Returns the
    caller's random state after the run, which must be the one before it."""
    base = tiny_model(extra_sensors=())  # seeds the global generator itself, so made first
    torch.manual_seed(caller_seed)
    before = torch.get_rng_state()
    model = adapt(base, AERIAL, ToyPairs(8), config=small_config(seed), out_dir=folder / "run", device="cpu", progress=False)
    after = torch.get_rng_state()
    assert torch.equal(before, after), "adapt changed the caller's global random state"
    model.save_pretrained(folder / "model")
    return after


@pytest.mark.filterwarnings("ignore:dino.teacher_momentum", "ignore::xstars_models.training.monitors.CollapseWarning")
def test_the_same_seed_gives_the_same_files_whatever_the_callers_random_state(tmp_path):
    adapt_into(tmp_path / "a", seed=5, caller_seed=1)
    adapt_into(tmp_path / "b", seed=5, caller_seed=2)
    names = assert_same_files(tmp_path / "a", tmp_path / "b")
    assert {"model/stem-aerial.safetensors", "model/model.safetensors", "run/last.pt"} <= set(names)

    adapt_into(tmp_path / "c", seed=6, caller_seed=1)
    stem = "model/stem-aerial.safetensors"
    assert (tmp_path / "a" / stem).read_bytes() != (tmp_path / "c" / stem).read_bytes()


@pytest.mark.filterwarnings("ignore:dino.teacher_momentum", "ignore::xstars_models.training.monitors.CollapseWarning")
def test_pretrain_repeats_and_leaves_the_callers_random_state(tmp_path):
    states = []
    for name, caller_seed in (("a", 1), ("b", 2)):
        start = tiny_model(extra_sensors=("aerial",))
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        model = pretrain(
            start, ToyPairs(8), config=small_config(3), out_dir=tmp_path / name / "run", device="cpu", progress=False
        )
        states.append((before, torch.get_rng_state()))
        model.save_pretrained(tmp_path / name / "model")
    assert all(torch.equal(before, after) for before, after in states)
    assert_same_files(tmp_path / "a", tmp_path / "b")


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """The tiny model saved, and co-registered rasters of it (10 m) and of aerial at 5 m."""
    import rasterio
    from rasterio.transform import from_origin

    root = tmp_path_factory.mktemp("adapt-seed")
    inputs = {"model": tiny_model(extra_sensors=()).save_pretrained(root / "base")}
    for name, gsd in (("s2", 10.0), ("aerial", 5.0)):
        side = int(2560 / gsd)
        coarse = rgb_images(1, size=256, seed=3)[0].transpose(2, 0, 1)  # the same ground in both
        pixels = np.repeat(np.repeat(coarse, side // 256, axis=1), side // 256, axis=2)
        path = root / f"{name}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32631",
                           transform=from_origin(500000, 4000000, gsd, gsd)) as dst:
            dst.write(pixels)
        inputs[name] = path
    return inputs


def cli_adapt(inputs, folder: Path, seed: int) -> None:
    argv = [
        "adapt", inputs["model"], "--sensor", "aerial_rgb", "--gsd", "5", "--name", "aerial", "--new", inputs["aerial"],
        "--old", inputs["s2"], "--run-dir", folder / "run", "--out", folder / "out", "--adapter", folder / ADAPTER,
        "--device", "cpu", "--precision", "fp32", "--seed", str(seed), "--steps", "2", "--batch-size", "2",
        "--dino-out-dim", "32", "--local-crops", "1", "--warmup-steps", "1",
    ]
    assert main([str(a) for a in argv]) == 0


@pytest.mark.filterwarnings("ignore:dino.teacher_momentum", "ignore::xstars_models.training.monitors.CollapseWarning")
def test_xstars_adapt_with_the_same_seed_twice_writes_the_same_files(cli_inputs, tmp_path):
    torch.manual_seed(11)
    before = torch.get_rng_state()
    cli_adapt(cli_inputs, tmp_path / "a", seed=0)
    assert torch.equal(before, torch.get_rng_state())
    torch.manual_seed(12)
    cli_adapt(cli_inputs, tmp_path / "b", seed=0)
    names = assert_same_files(tmp_path / "a", tmp_path / "b")
    assert {"out/stem-aerial.safetensors", ADAPTER, "run/last.pt", "run/metrics.jsonl"} <= set(names)

    cli_adapt(cli_inputs, tmp_path / "c", seed=1)
    stem = "out/stem-aerial.safetensors"
    assert (tmp_path / "a" / stem).read_bytes() != (tmp_path / "c" / stem).read_bytes()
