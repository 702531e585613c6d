"""A run's ``last.pt`` holding a malicious pickle is refused without running anything, and the
message says it was refused because it holds code, naming the objects (issue 27, point 8); a
file that is really truncated or corrupt still says so."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from factories import tiny_model
from toy_data import ToyPairs

from xstars_models import get_sensor
from xstars_models.training import TrainConfig, adapt
from xstars_models.training.checkpoint import CheckpointUnreadableError, load_checkpoint, unsafe_objects


class RunsACommand:
    """Unpickling this runs ``touch MARKER`` through os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def good_state() -> dict:
    return {"step": 2, "modules": {"w": torch.ones(3)}, "optimizer": {}, "rng": torch.get_rng_state(), "config": {}}


def torch_saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def malicious_files(marker) -> dict[str, bytes]:
    """``last.pt`` contents whose loading with pickle would run the command: torch.save's zip
    format (the object nested in the state, or alone), and bare pickles of every protocol."""
    files = {
        "zip-nested": torch_saved({**good_state(), "config": {"x": [RunsACommand(marker)]}}),
        "zip-alone": torch_saved(RunsACommand(marker)),
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        files[f"pickle-{protocol}"] = pickle.dumps({**good_state(), "x": RunsACommand(marker)}, protocol=protocol)
    return files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", list(malicious_files("unused")))
def test_a_checkpoint_holding_code_is_refused_as_code_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(malicious_files(marker)[kind])
    with pytest.raises(CheckpointUnreadableError) as info:
        load_checkpoint(run)
    message = str(info.value)
    assert not marker.exists(), "the pickle's command ran"
    assert "refused to load it because it holds code" in message
    assert f"{os.system.__module__}.system" in message  # posix.system here
    assert "nothing in it was run" in message and "weights_only=True" in message
    assert "truncated or corrupt" not in message
    # A bare pickle also names how it pickled the tensors (torch.storage._load_from_bytes, which
    # safe loading refuses too).
    assert f"{os.system.__module__}.system" in unsafe_objects(run / "last.pt")


@pytest.mark.filterwarnings("ignore:dino.teacher_momentum")
def test_resuming_a_run_from_such_a_checkpoint_is_refused_before_training(tmp_path):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(malicious_files(marker)["zip-nested"])
    config = TrainConfig(steps=2, batch_size=2, dino_out_dim=16, local_crops=1, warmup_steps=1)
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    with pytest.raises(CheckpointUnreadableError, match="holds code"):
        adapt(
            tiny_model(extra_sensors=()), new, ToyPairs(4), config=config, out_dir=run, resume=True, device="cpu",
            progress=False,
        )
    assert not marker.exists()
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("damage", ["cut", "empty", "noise", "cut-pre-zip"])
def test_a_damaged_checkpoint_still_says_truncated_or_corrupt(tmp_path, damage):
    whole = torch_saved(good_state())
    buffer = io.BytesIO()
    torch.save(good_state(), buffer, _use_new_zipfile_serialization=False)
    data = {
        "cut": whole[: len(whole) // 2],
        "empty": b"",
        "noise": bytes(range(256)) * 4,
        "cut-pre-zip": buffer.getvalue()[:300],
    }[damage]
    (tmp_path / "last.pt").write_bytes(data)
    with pytest.raises(CheckpointUnreadableError, match="it is truncated or corrupt") as info:
        load_checkpoint(tmp_path)
    assert "holds code" not in str(info.value)


def test_a_plain_checkpoint_in_either_format_loads(tmp_path):
    for new_format in (True, False):
        buffer = io.BytesIO()
        torch.save(good_state(), buffer, _use_new_zipfile_serialization=new_format)
        (tmp_path / "last.pt").write_bytes(buffer.getvalue())
        assert unsafe_objects(tmp_path / "last.pt") == []
        assert torch.equal(load_checkpoint(tmp_path)["modules"]["w"], torch.ones(3))
