"""Training runs survive being killed and resumed: a resumed run ends bit-identical to the
uninterrupted one, checkpoints are replaced atomically and their leftovers cleaned, a resume with
other settings or an unreadable checkpoint is refused with a message naming the file, and the
teacher follows the student by the documented EMA."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from factories import tiny_model
from toy_data import ToyPairs
from xstars_models import get_sensor
from xstars_models.training import TrainConfig, adapt, pretrain
from xstars_models.training.checkpoint import (
    CheckpointUnreadableError,
    ResumeMismatchError,
    load_checkpoint,
)
from xstars_models.training.loop import train_loop

WORKER = Path(__file__).with_name("train_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def small_config(**overrides: Any) -> TrainConfig:
    settings = dict(
        steps=4, batch_size=4, lr=1e-3, warmup_steps=1, dino_out_dim=64, local_crops=2, checkpoint_every=2, teacher_momentum=0.5
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def run_pretrain(run_dir: Path, config: TrainConfig, resume: bool = False, pairs: ToyPairs | None = None, **model: Any):
    return pretrain(
        tiny_model(extra_sensors=model.get("extra_sensors", ("aerial",))), pairs or ToyPairs(8), config,
        out_dir=run_dir, resume=resume, device="cpu", progress=False,
    )


def worker(run_dir: Path, steps: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), str(run_dir), str(steps), *flags], env=ENV, timeout=300, capture_output=True, text=True
    )


def assert_identical(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Nested dicts/lists of tensors and plain values, compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_steps(run_dir: Path) -> list[int]:
    return [line["step"] for line in metric_lines(run_dir)]


def test_run_killed_after_its_step_2_checkpoint_resumes_bit_identical(tmp_path):
    """Killed at the start of step 3 (checkpoint at step 2, metrics logged up to step 3), then
    resumed: weights, teacher, optimizer state and RNG equal the uninterrupted run's exactly, and
    metrics.jsonl lists each step once."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert worker(whole, 4).returncode == 0
    died = worker(killed, 4, "--kill-at-step", "3")
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert load_checkpoint(killed)["step"] == 2
    assert metric_steps(killed) == [1, 2, 3]
    resumed = worker(killed, 4, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((killed / "result-rank0.json").read_text())["resumed_from"] == 2
    final, reference = load_checkpoint(killed), load_checkpoint(whole)
    for part in ("student", "teacher"):
        keys = [k for k in final["modules"] if k.startswith(part + ".")]
        differ = [k for k in keys if not torch.equal(final["modules"][k], reference["modules"][k])]
        assert keys and not differ, f"{part} weights differ: {differ[:5]}"
    assert_identical(final["optimizer"], reference["optimizer"], "optimizer")
    assert_identical(final, reference)
    assert metric_steps(killed) == [1, 2, 3, 4]
    assert [line["loss"] for line in metric_lines(killed)] == [line["loss"] for line in metric_lines(whole)]
    digest = lambda run: json.loads((run / "result-rank0.json").read_text())["digest"]  # noqa: E731
    assert digest(killed) == digest(whole)  # the returned model (the teacher's encoder)


def test_sigkill_mid_save_keeps_the_previous_checkpoint_and_the_leftover_is_cleaned(tmp_path):
    run = tmp_path / "run"
    died = worker(run, 6, "--kill-in-save", "2")  # checkpoints at steps 2 and 4; killed writing the second
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert load_checkpoint(run)["step"] == 2
    orphans = list(run.glob(".last.pt.*.tmp"))
    assert len(orphans) == 1 and orphans[0].stat().st_size > 0
    resumed = worker(run, 6, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run)["step"] == 6
    assert not list(run.glob(".last.pt.*.tmp"))
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]


def _failing_half_way(real_save, fail_on_call: int):
    """A ``torch.save`` whose ``fail_on_call``-th call writes half of its bytes to wherever it was
    asked to write, then fails as a full disk would."""
    calls = 0

    def save(obj, f, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls != fail_on_call:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(half)
        else:
            f.write(half)
        raise OSError(28, "No space left on device")

    return save


def test_a_save_failing_half_way_keeps_the_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _failing_half_way(torch.save, fail_on_call=2))
    with pytest.raises(OSError, match="No space left"):
        run_pretrain(tmp_path, small_config(steps=4, checkpoint_every=2))
    assert load_checkpoint(tmp_path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]


def test_a_rename_failing_during_a_save_keeps_the_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    run_pretrain(tmp_path, small_config(steps=2))
    real_replace = os.replace

    def failing_for_checkpoints(src, dst):
        if Path(dst).name == "last.pt":
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_for_checkpoints)
    with pytest.raises(OSError, match="Input/output error"):
        run_pretrain(tmp_path, small_config(steps=4), resume=True)
    assert load_checkpoint(tmp_path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        (dict(lr=2e-3), "\n  optim.lr: 0.001 in the checkpoint, 0.002 now"),
        (dict(batch_size=2), "\n  batch_size: 4 in the checkpoint, 2 now"),
        (dict(seed=1), "\n  seed: 0 in the checkpoint, 1 now"),
        (dict(alpha=0.5), "\n  msad.alpha: 0.1 in the checkpoint, 0.5 now"),
        (dict(dino_out_dim=32), "\n  dino.out_dim: 64 in the checkpoint, 32 now"),
        (dict(global_scale=(0.5, 1.0)), "\n  crops.global_scale: (0.4, 1.0) in the checkpoint, (0.5, 1.0) now"),
        (dict(color_jitter=0.1), "\n  crops.color_jitter: 0.3 in the checkpoint, 0.1 now"),
        (dict(steps=1), "steps=1 is below the checkpoint's step 2"),
    ],
)
def test_resume_with_other_settings_is_refused_with_the_differences(tmp_path, change, shown):
    run_pretrain(tmp_path, small_config(steps=2))
    before = (tmp_path / "last.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ResumeMismatchError) as caught:
        run_pretrain(tmp_path, small_config(**{"steps": 4, **change}), resume=True)
    message = str(caught.value)
    assert str(tmp_path / "last.pt") in message and shown in message
    assert ((tmp_path / "last.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()) == before


def test_resume_lists_every_changed_setting(tmp_path):
    run_pretrain(tmp_path, small_config(steps=2))
    with pytest.raises(ResumeMismatchError) as caught:
        run_pretrain(tmp_path, small_config(steps=4, lr=2e-3, seed=3), resume=True)
    message = str(caught.value)
    assert "optim.lr: 0.001 in the checkpoint, 0.002 now" in message and "seed: 0 in the checkpoint, 3 now" in message
    assert "steps" not in message.split("now")[0]  # more steps is allowed, so not listed as a difference


def test_resume_may_change_steps_workers_checkpointing_and_precision(tmp_path):
    run_pretrain(tmp_path, small_config(steps=2))
    trained = run_pretrain(tmp_path, small_config(steps=4, checkpoint_every=1, num_workers=1, precision="fp32"), resume=True)
    assert trained.training_record["resumed_from"] == 2
    assert load_checkpoint(tmp_path)["config"]["checkpoint_every"] == 1
    assert metric_steps(tmp_path) == [1, 2, 3, 4]


def test_a_setting_added_after_the_checkpoint_was_written_compares_as_its_default(tmp_path):
    """Checkpoints of long runs outlive releases: one written before ``crops.grey_p`` existed
    resumes with the default (what the run used), and refuses another value."""
    run_pretrain(tmp_path, small_config(steps=2))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=False)
    del checkpoint["config"]["crops"]["grey_p"]
    torch.save(checkpoint, tmp_path / "last.pt")
    with pytest.raises(ResumeMismatchError, match="crops.grey_p: 0.2 in the checkpoint, 0.0 now"):
        run_pretrain(tmp_path, small_config(steps=4, grey_p=0.0), resume=True)
    assert run_pretrain(tmp_path, small_config(steps=4), resume=True).training_record["resumed_from"] == 2


# small_config's settings as TrainConfig.to_dict wrote them before the settings were grouped
# (the 41 flat names of xstars_models/training/config.py up to commit 5d2c116).
FLAT_SMALL_CONFIG = {
    "steps": 2, "batch_size": 4, "lr": 0.001, "min_lr": 1e-06, "warmup_steps": 1, "weight_decay": 0.04, "alpha": 0.1,
    "teacher_momentum": 0.5, "dino_out_dim": 64, "dino_bottleneck": 256, "student_temp": 0.1, "teacher_temp": 0.04,
    "warmup_teacher_temp": 0.04, "warmup_teacher_temp_steps": 0, "global_tokens": 8, "local_tokens": 4, "global_crops": 2,
    "local_crops": 2, "global_scale": (0.4, 1.0), "local_scale": (0.05, 0.4), "native_crops": False, "checkpoint_every": 2,
    "grad_clip": 3.0, "freeze_last_layer_steps": 0, "num_workers": 0, "seed": 0, "precision": "auto",
    "share_msad_view": True, "koleo_weight": 0.0, "contrast_weight": 0.0, "contrast_temp": 0.1, "gap_weight": 0.0,
    "neighbour_group": 0, "cross_sensor_dino": False, "monitor_every": 50, "monitor_images": 128, "color_jitter": 0.3,
    "grey_p": 0.2, "anchor_weight": 0.0, "ibot_weight": 0.0, "mask_ratio": (0.1, 0.5),
}


def test_a_checkpoint_with_flat_settings_resumes_and_names_a_change_by_its_dotted_name(tmp_path):
    """A checkpoint written before the settings were grouped holds them flat; resuming maps them
    into the groups: the same settings resume, a changed one is refused naming it as it is now
    called. One written before ``precision`` existed holds ``amp`` (how a run computes, so free
    to change, as ``precision`` is)."""
    run_pretrain(tmp_path, small_config(steps=2))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=False)
    assert len(FLAT_SMALL_CONFIG) == 41 and checkpoint["config"]["optim"]["lr"] == FLAT_SMALL_CONFIG["lr"]
    checkpoint["config"] = dict(FLAT_SMALL_CONFIG)
    torch.save(checkpoint, tmp_path / "last.pt")
    with pytest.raises(ResumeMismatchError) as caught:
        run_pretrain(tmp_path, small_config(steps=4, teacher_momentum=0.9, local_crops=3), resume=True)
    problems = [line.strip() for line in str(caught.value).splitlines() if line.startswith("  ")]
    assert problems == [
        "crops.n_local: 2 in the checkpoint, 3 now", "dino.teacher_momentum: 0.5 in the checkpoint, 0.9 now",
    ]
    pre_precision = {k: v for k, v in FLAT_SMALL_CONFIG.items() if k != "precision"}
    checkpoint["config"] = {**pre_precision, "amp": True}
    torch.save(checkpoint, tmp_path / "last.pt")
    trained = run_pretrain(tmp_path, small_config(steps=4, precision="fp32"), resume=True)
    assert trained.training_record["resumed_from"] == 2
    assert load_checkpoint(tmp_path)["config"] == small_config(steps=4, precision="fp32").to_dict()


def test_resume_of_another_model_names_the_checkpoint_and_the_keys(tmp_path):
    run_pretrain(tmp_path, small_config(steps=2))
    with pytest.raises(ResumeMismatchError) as caught:
        run_pretrain(tmp_path, small_config(steps=4), resume=True, extra_sensors=())
    message = str(caught.value)
    assert str(tmp_path / "last.pt") in message
    assert "student.encoder.stems.aerial" in message and "unexpected" in message


@pytest.mark.parametrize(("mode", "shown"), [("full", "other trainable parameters"), ("lora", "unexpected")])
def test_resume_of_an_adapt_run_in_another_mode_names_the_checkpoint(tmp_path, mode, shown):
    """Stem and full mode hold the same tensors but train different ones (the optimizer state
    does not fit); LoRA adds tensors."""
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    run = lambda mode, steps, resume: adapt(  # noqa: E731
        tiny_model(extra_sensors=()), new, ToyPairs(8), mode=mode, config=small_config(steps=steps), out_dir=tmp_path,
        resume=resume, device="cpu", progress=False,
    )
    run("stem", 2, False)
    with pytest.raises(ResumeMismatchError) as caught:
        run(mode, 4, True)
    assert str(tmp_path / "last.pt") in str(caught.value) and shown in str(caught.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_checkpoint"])
def test_an_unreadable_checkpoint_is_named_with_what_to_do(tmp_path, damage):
    run_pretrain(tmp_path, small_config(steps=2))
    path = tmp_path / "last.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 100)
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointUnreadableError) as caught:
        run_pretrain(tmp_path, small_config(steps=4), resume=True)
    message = str(caught.value)
    assert str(path) in message and "delete it" in message.lower()


def test_nan_error_points_at_the_last_good_checkpoint_only_when_there_is_one(tmp_path):
    with pytest.raises(FloatingPointError) as caught:
        run_pretrain(tmp_path / "fresh", small_config(), pairs=ToyPairs(8, nan_at=0))
    assert "loss became nan at step 0" in str(caught.value)
    assert "no checkpoint" in str(caught.value) and "last good checkpoint" not in str(caught.value)
    assert load_checkpoint(tmp_path / "fresh") is None

    run_pretrain(tmp_path / "later", small_config(steps=2))
    with pytest.raises(FloatingPointError) as caught:
        run_pretrain(tmp_path / "later", small_config(steps=4), resume=True, pairs=ToyPairs(8, nan_at=0))
    assert f"The last good checkpoint (step 2) is {tmp_path / 'later' / 'last.pt'}" in str(caught.value)


def test_metrics_of_a_run_that_never_checkpointed_are_not_kept(tmp_path):
    """A run killed before its first checkpoint starts again from step 0, so the lines it logged
    describe steps that will be run again."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    run_pretrain(tmp_path, small_config(steps=2))
    assert metric_steps(tmp_path) == [1, 2]


class _Pair(nn.Module):
    def __init__(self, fill: float) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        nn.init.constant_(self.linear.weight, fill)
        nn.init.constant_(self.linear.bias, fill)


@pytest.mark.filterwarnings("ignore:dino.teacher_momentum=0.75")
def test_teacher_follows_the_student_by_ema_with_the_scheduled_momentum(tmp_path):
    """Teacher 0, student 1 and a zero gradient (the student stays 1): with momentum m the
    teacher becomes m * teacher + (1 - m) * student. Momentum 0.75 at step 0, cosine to 1 over 2
    steps gives 0.875 at step 1: 0 -> 0.25 -> 0.25 * 0.875 + 0.125 = 0.34375. A frozen student
    parameter (the bias) leaves its teacher copy exactly as it was."""
    student, teacher = _Pair(1.0), _Pair(0.0)
    student.linear.bias.requires_grad_(False)
    teacher.requires_grad_(False)
    modules = nn.ModuleDict({"student": student, "teacher": teacher})
    config = TrainConfig(steps=2, lr=1e-3, warmup_steps=0, weight_decay=0.0, teacher_momentum=0.75, checkpoint_every=1)

    def step_fn(batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return (student.linear.weight * 0).sum(), {}

    train_loop(modules, [(teacher, student)], step_fn, lambda start: [{}] * (2 - start), config, tmp_path, progress=False)
    assert torch.equal(student.linear.weight, torch.ones(2, 3))
    assert torch.equal(teacher.linear.weight, torch.full((2, 3), 0.34375))
    assert torch.equal(teacher.linear.bias, torch.zeros(2))
    momenta = [json.loads(line)["momentum"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert momenta == [0.75, 0.875]


def test_a_cuda_run_saves_and_restores_the_cuda_random_state(tmp_path, monkeypatch):
    """Dropout on a GPU draws from CUDA's generator, so its state is saved with the CPU's and
    restored on resume (the CUDA calls are recorded here, so this runs without a GPU)."""
    saved_state = torch.arange(8, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    cuda = torch.device("cuda")
    student, teacher = _Pair(1.0), _Pair(0.0)
    modules = nn.ModuleDict({"student": student, "teacher": teacher})

    def run(steps: int, resume: bool) -> None:
        config = TrainConfig(steps=steps, lr=1e-3, warmup_steps=0, checkpoint_every=1, teacher_momentum=0.5, precision="fp32")
        step_fn = lambda batch, step: ((student.linear.weight * 0).sum(), {})  # noqa: E731
        batches = lambda start: [{}] * (steps - start)  # noqa: E731
        train_loop(modules, [(teacher, student)], step_fn, batches, config, tmp_path, resume=resume, progress=False, device=cuda)

    run(1, resume=False)
    assert torch.equal(load_checkpoint(tmp_path)["cuda_rng"], saved_state)
    assert not restored
    run(2, resume=True)
    assert len(restored) == 1 and torch.equal(restored[0][0], saved_state) and torch.device(restored[0][1]) == cuda
