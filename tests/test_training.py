"""pretrain / adapt: the loss trains what it should, checkpoints resume (also after SIGKILL), a
non-finite loss stops with a clear error, and two gloo ranks under torchrun stay in sync."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factories import tiny_model, window_of
from toy_data import ToyPairs
from xstars_models import XStars, get_sensor
from xstars_models.errors import ConfigError, InvalidInputError, InvalidOptionError
from xstars_models.training import TrainConfig, adapt, pretrain
from xstars_models.training.checkpoint import CheckpointExistsError, load_checkpoint

WORKER = Path(__file__).with_name("train_worker.py")


def small_config(**overrides) -> TrainConfig:
    settings = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, dino_out_dim=64, local_crops=2, checkpoint_every=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def two_sensor_model():
    return tiny_model(extra_sensors=("aerial",))


def test_pretrain_trains_encoder_and_msad_heads(tmp_path):
    model = two_sensor_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = pretrain(model, ToyPairs(8), small_config(), out_dir=tmp_path, device="cpu", progress=False)
    assert type(trained) is type(model) is XStars
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(line["msad"] > 0 and line["dino"] > 0 for line in lines)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("trunk.blocks") for k in changed)
    assert any(k.startswith("stems.aerial") for k in changed)
    state = load_checkpoint(tmp_path)["modules"]
    assert "msad.sensor_heads.aerial.proj.weight" in state
    # One DINO centre per sensor, and they differ: each follows its own sensor's teacher outputs.
    centers = state["dino.sentinel2_rgb.center"], state["dino.aerial.center"]
    assert centers[0].abs().sum() > 0 and not torch.allclose(*centers)
    assert trained.training_record["recipe"] == "pretrain"
    assert trained.training_record["settings"]["steps"] == 4


def test_msad_gradient_moves_the_projection_heads(tmp_path):
    """Same seed, same initial heads: with alpha = 0 the MSAD heads get no gradient, with alpha > 0
    they move (the official code's detached loss and un-optimised heads would leave them equal)."""

    def msad_state(alpha, run):
        torch.manual_seed(0)
        pretrain(two_sensor_model(), ToyPairs(8), small_config(alpha=alpha, steps=2), out_dir=tmp_path / run, device="cpu", progress=False)
        return {k: v for k, v in load_checkpoint(tmp_path / run)["modules"].items() if k.startswith("msad.")}

    without, with_msad = msad_state(0.0, "a0"), msad_state(1.0, "a1")
    moved = [k for k in with_msad if not torch.equal(with_msad[k], without[k])]
    assert {"msad.log_tau", "msad.shared.proj.weight", "msad.sensor_heads.aerial.fc.weight"} <= set(moved)


def test_resume_continues_to_the_same_step(tmp_path):
    config = small_config(steps=4)
    pretrain(two_sensor_model(), ToyPairs(8), config, out_dir=tmp_path, device="cpu", progress=False)
    assert load_checkpoint(tmp_path)["step"] == 4
    more = small_config(steps=6)
    trained = pretrain(two_sensor_model(), ToyPairs(8), more, out_dir=tmp_path, resume=True, device="cpu", progress=False)
    assert trained.training_record["resumed_from"] == 4
    assert load_checkpoint(tmp_path)["step"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_training_time_counts_across_resumed_sessions(tmp_path):
    pretrain(two_sensor_model(), ToyPairs(8), small_config(steps=2), out_dir=tmp_path, device="cpu", progress=False)
    first_s = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["time_s"]
    assert first_s > 0
    # Resumed at its last step, the run trains nothing but still took first_s to train.
    again = pretrain(
        two_sensor_model(), ToyPairs(8), small_config(steps=2), out_dir=tmp_path, resume=True, device="cpu", progress=False
    )
    assert again.training_record["wall_time_s"] >= round(first_s, 1)
    pretrain(two_sensor_model(), ToyPairs(8), small_config(steps=3), out_dir=tmp_path, resume=True, device="cpu", progress=False)
    times = [json.loads(line)["time_s"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(times) == 3 and times[2] > first_s


def test_existing_checkpoint_without_resume_is_an_error(tmp_path):
    pretrain(two_sensor_model(), ToyPairs(8), small_config(steps=2), out_dir=tmp_path, device="cpu", progress=False)
    with pytest.raises(FileExistsError, match="checkpoint at step 2; pass resume=True") as info:
        pretrain(two_sensor_model(), ToyPairs(8), small_config(steps=2), out_dir=tmp_path, device="cpu", progress=False)
    assert isinstance(info.value, CheckpointExistsError) and info.value.field == "resume"
    as_flag = info.value.describe(lambda name, value: "--resume" if (name, value) == ("resume", True) else "?")
    assert as_flag.endswith("pass --resume to continue it, or choose a new output folder.")


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 0"):
        pretrain(two_sensor_model(), ToyPairs(8, nan_at=0), small_config(), out_dir=tmp_path, device="cpu", progress=False)
    assert load_checkpoint(tmp_path) is None


def test_sigkill_mid_run_then_resume(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(run), "400", "--checkpoint-every", "2"], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "last.pt").exists():
        assert proc.poll() is None, "the training process ended before its first checkpoint"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run)["step"]
    assert 2 <= killed_at < 400
    target = killed_at + 4
    subprocess.run([sys.executable, str(WORKER), str(run), str(target), "--resume"], env=env, check=True, timeout=300)
    result = json.loads((run / "result-rank0.json").read_text())
    assert result["resumed_from"] == killed_at and result["steps"] == target
    assert load_checkpoint(run)["step"] == target
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, target + 1))  # steps past the checkpoint not repeated
    assert math.isfinite(lines[-1]["loss"])
    assert not list(run.glob(".last.pt.*.tmp"))


def test_two_gloo_ranks_stay_in_sync(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path), "3"],
        env=env, check=True, timeout=300, capture_output=True,
    )
    results = [json.loads((tmp_path / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["digest"] == results[1]["digest"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(WORKER), str(single), "3"], env=env, check=True, timeout=300)
    # Same seed, different data split: the two-rank model must not be the one-process model.
    assert json.loads((single / "result-rank0.json").read_text())["digest"] != results[0]["digest"]


@pytest.mark.parametrize("mode", ["stem", "lora", "full"])
def test_adapt_trains_what_the_mode_says(tmp_path, mode):
    base = tiny_model(extra_sensors=())
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    adapted = adapt(base, new, ToyPairs(8), mode=mode, config=small_config(), out_dir=tmp_path, device="cpu", progress=False)
    assert all(torch.equal(v, base_state[k]) for k, v in base.state_dict().items()), "the base model was modified"
    assert adapted.sensors["aerial"].patch_size == 16
    trunk_changed = any(
        not torch.equal(v, base_state[f"trunk.{k}"]) for k, v in adapted.trunk.state_dict().items() if f"trunk.{k}" in base_state
    )
    assert trunk_changed == (mode == "full")
    assert adapted.lineage["adapt_mode"] == mode
    assert type(adapted) is type(base) is XStars  # so the adapted model has embed_scene, push_to_hub...
    out = adapted.embed(ToyPairs(2).aerial.numpy(), "aerial", output="map", layout="CHW", precision="fp32")
    assert out.shape == (2, 32, 8, 8)
    reloaded = XStars.from_pretrained(adapted.save_pretrained(tmp_path / "saved"))  # LoRA merged on save
    assert torch.allclose(reloaded.embed(ToyPairs(2).aerial.numpy(), "aerial", output="map", layout="CHW", precision="fp32"), out, atol=1e-4)


@pytest.mark.parametrize("share", [True, False])
def test_msad_view_shared_with_the_first_dino_global_view(tmp_path, monkeypatch, share):
    """Shared: the student's first global views are the un-augmented aerial images themselves
    and the student runs twice per step (global, local); separate: a third student forward."""
    from xstars_models.encoder import XStarsEncoder

    calls = []
    original = XStarsEncoder.forward

    def recording(self, x, sensor):
        if torch.is_grad_enabled() and sensor == "aerial":
            calls.append(x.detach().clone())
        return original(self, x, sensor)

    monkeypatch.setattr(XStarsEncoder, "forward", recording)
    pairs = ToyPairs(8)
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    config = small_config(steps=2, batch_size=4, share_msad_view=share)
    adapt(tiny_model(extra_sensors=()), new, pairs, mode="stem", config=config, out_dir=tmp_path, device="cpu", progress=False)
    assert len(calls) == 2 * (2 if share else 3)
    first_globals = calls[0][: config.batch_size]
    matches = [any(torch.equal(view, image) for image in pairs.aerial) for view in first_globals]
    assert all(matches) if share else not any(matches)


def test_short_run_warns_that_the_returned_teacher_barely_moved(tmp_path, recwarn):
    from xstars_models.training.schedules import ema_initial_weight

    assert ema_initial_weight(2, 0.5) == pytest.approx(0.5 * 0.75)  # momenta 0.5, then halfway to 1
    with pytest.warns(UserWarning, match=r"teacher_momentum=0.996 over 2 steps: the returned EMA teacher keeps 99%"):
        pretrain(tiny_model(extra_sensors=()), ToyPairs(4), small_config(steps=2), out_dir=tmp_path / "a", device="cpu", progress=False)
    recwarn.clear()
    pretrain(tiny_model(extra_sensors=()), ToyPairs(4), small_config(steps=2, teacher_momentum=0.5), out_dir=tmp_path / "b", device="cpu", progress=False)
    assert not [w for w in recwarn if "teacher_momentum" in str(w.message)]


def test_photometric_augmentation_follows_the_config():
    """``color_jitter`` and ``grey_p`` reach the views: without them a global view that covers
    the whole image keeps its mean colour (up to the resize); with them it does not."""
    from xstars_models.training.views import make_augment

    model = tiny_model()
    image = torch.rand(3, 64, 64) * 200 + 20
    settings = dict(global_scale=(1.0, 1.0), local_crops=0)
    plain = make_augment(model, "aerial", TrainConfig(color_jitter=0.0, grey_p=0.0, **settings))
    jittered = make_augment(model, "aerial", TrainConfig(color_jitter=0.5, grey_p=1.0, **settings))
    assert plain.grey_p == 0.0 and jittered.jitter == 0.5
    plain.blur_p = plain.noise_p = jittered.blur_p = jittered.noise_p = 0.0
    colour = image.mean(dim=(1, 2))
    for seed in range(4):
        view = plain(image, torch.Generator().manual_seed(seed))[0]
        assert torch.allclose(view.mean(dim=(1, 2)), colour, rtol=0.02)
        grey = jittered(image, torch.Generator().manual_seed(seed))[0]
        assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    with pytest.raises(ConfigError, match=r"crops.color_jitter: expected a number in \[0, 1\), got 1.5") as info:
        TrainConfig(color_jitter=1.5)
    assert info.value.field == "crops.color_jitter"


def test_native_crops_follow_the_config():
    """``native_crops`` reaches the views: they are then windows of the image, never resized, and
    an image smaller than the global view is refused by name."""
    from xstars_models.training.views import make_augment

    model = tiny_model()
    assert not make_augment(model, "aerial", TrainConfig()).native
    native = make_augment(model, "aerial", TrainConfig(native_crops=True, local_crops=0, color_jitter=0.0, grey_p=0.0))
    native.blur_p = native.noise_p = 0.0
    size = native.plan[0][0]
    image = torch.rand(3, size + 8, size + 8) * 200
    view = native(image, torch.Generator().manual_seed(0))[0]
    assert window_of(view, image) is not None, "the global view is a window of the image at its own resolution"
    with pytest.raises(InvalidInputError, match="native-resolution views") as info:
        native(torch.rand(3, size - 1, size - 1))
    assert info.value.field == "images"


def test_pretraining_an_adapted_model_trains_its_trunk(tmp_path):
    """``adapt`` in stem mode freezes the trunk while it trains; the model it returns must train
    like any module, and ``pretrain`` on it (a joint stage) must move the trunk, not only heads."""
    base = tiny_model(extra_sensors=())
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    adapted = adapt(base, new, ToyPairs(8), mode="stem", config=small_config(), out_dir=tmp_path / "adapt",
                    device="cpu", progress=False)
    assert all(p.requires_grad for p in adapted.parameters())
    before = {k: v.clone() for k, v in adapted.trunk.state_dict().items()}
    joint = pretrain(adapted, ToyPairs(8), small_config(teacher_momentum=0.0), out_dir=tmp_path / "joint",
                     device="cpu", progress=False)
    moved = [k for k, v in joint.trunk.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in moved and len(moved) > len(before) // 2


def _token_drift(model: XStars, start: XStars, images: torch.Tensor) -> float:
    """Mean 1 - cosine between the two models' tokens of ``images`` on the primary sensor."""
    with torch.no_grad():
        a, b = model.eval()(images, "sentinel2_rgb"), start.eval()(images, "sentinel2_rgb")
    return float(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def test_anchor_keeps_pretraining_near_the_starting_model(tmp_path):
    """``anchor_weight`` pulls every sensor's tokens towards a frozen copy of the model that
    ``pretrain`` started from: the term is logged, starts at ~0 (student = anchor) and leaves the
    trained model's tokens closer to the start than the same run without it."""
    images = torch.rand(4, 3, 64, 64) * 255
    drift = {}
    for weight in (0.0, 20.0):
        start = two_sensor_model()
        reference = two_sensor_model()
        run = tmp_path / f"anchor-{weight}"
        trained = pretrain(start, ToyPairs(8), small_config(steps=6, teacher_momentum=0.0, anchor_weight=weight),
                           out_dir=run, device="cpu", progress=False)
        drift[weight] = _token_drift(trained, reference, images)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if weight:
            assert lines[0]["anchor"] < 0.01 and lines[-1]["anchor"] > 0
        else:
            assert "anchor" not in lines[0]
    assert drift[20.0] < 0.5 * drift[0.0], drift


def test_adapt_refuses_an_anchor(tmp_path):
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    with pytest.raises(ConfigError, match="anchor.weight=1.0 is a setting of pretrain") as info:
        adapt(tiny_model(extra_sensors=()), new, ToyPairs(8), config=small_config(anchor_weight=1.0), out_dir=tmp_path,
              device="cpu", progress=False)
    assert info.value.field == "anchor.weight" and str(info.value).endswith("so it would ignore it. Set it to 0.")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before any training


def test_masked_patches_do_not_reach_the_encoder():
    """iBOT's mask: a masked patch's pixels have no effect on any token; unmasked they do."""
    from xstars_models.training.heads import DINOHead
    from xstars_models.training.terms import DINONet

    model = tiny_model(extra_sensors=()).eval()
    net = DINONet(model, DINOHead(model.embed_dim, 16), mask_token=True)
    patch = model.sensors["sentinel2_rgb"].patch_size
    x = torch.rand(1, 3, 64, 64) * 255
    changed = x.clone()
    changed[..., patch:2 * patch, 0:patch] = 0  # the patch at grid row 1, column 0
    grid = (64 // patch) ** 2
    mask = torch.zeros(1, grid, dtype=torch.bool)
    mask[0, 64 // patch] = True
    with torch.no_grad():
        masked = [net.forward_with_bottleneck(image, "sentinel2_rgb", mask)[1] for image in (x, changed)]
        plain = [net(image, "sentinel2_rgb")[1] for image in (x, changed)]
    assert torch.allclose(*masked)
    assert not torch.allclose(*plain, atol=1e-4)
    with pytest.raises(InvalidOptionError, match="no mask token") as info:
        DINONet(model, DINOHead(model.embed_dim, 16)).forward_with_bottleneck(x, "sentinel2_rgb", mask)
    assert info.value.field == "mask"


def test_ibot_term_trains_a_mask_token_that_is_not_saved(tmp_path):
    model = two_sensor_model()
    plain_keys = set(model.state_dict())
    trained = pretrain(model, ToyPairs(8), small_config(ibot_weight=1.0), out_dir=tmp_path, device="cpu", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Cross-entropy over K = 64 prototypes: positive and at most about ln K at the start.
    assert all(0 < line["ibot"] < 1.5 * math.log(64) for line in lines)
    state = load_checkpoint(tmp_path)["modules"]
    assert state["student.mask_token"].abs().sum() > 0
    assert "dino.ibot_aerial.center" in state and "dino.ibot_sentinel2_rgb.center" in state
    assert set(trained.state_dict()) == plain_keys
    assert trained.training_record["settings"]["ibot"]["weight"] == 1.0


def test_adapt_runs_the_ibot_term_on_the_new_sensor(tmp_path):
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    adapt(tiny_model(extra_sensors=()), new, ToyPairs(8), mode="full", config=small_config(ibot_weight=1.0),
          out_dir=tmp_path, device="cpu", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(line["ibot"] > 0 for line in lines)
    assert "dino.ibot_aerial.center" in load_checkpoint(tmp_path)["modules"]


def test_ibot_config_is_checked():
    with pytest.raises(ConfigError, match="crops.n_global >= 2") as info:
        TrainConfig(ibot_weight=1.0, global_crops=1)
    assert info.value.field == "ibot.weight"
    with pytest.raises(ConfigError, match=r"fractions of the patches with 0 < low <= high < 1, got \(0.2, 1.0\)") as info:
        TrainConfig(mask_ratio=(0.2, 1.0))
    assert info.value.field == "ibot.mask_ratio"


def test_native_msad_views_are_windows_over_the_same_ground():
    """With ``native_crops`` the MSAD views are unresized windows at one random position over the
    same ground in both sensors (the aerial window at twice the S2 offset for twice the pixels),
    the monitor batch central windows; images of other ground extents are refused."""
    from xstars_models.training.views import TrainingViews, monitor_images

    s2 = torch.arange(96 * 96, dtype=torch.float32).reshape(1, 96, 96).expand(3, -1, -1).clone()
    aerial = torch.nn.functional.interpolate(s2[None], scale_factor=2, mode="nearest")[0]
    pairs = [{"images": {"s2": s2, "aerial": aerial}}]
    sizes = {"s2": 64, "aerial": 128}
    positions = set()
    for step in range(6):
        paired = TrainingViews(pairs, {}, sizes, seed=0, native=True)[0, step]["pairs"]
        s2_at, aerial_at = window_of(paired["s2"], s2), window_of(paired["aerial"], aerial)
        assert s2_at is not None and aerial_at == (2 * s2_at[0], 2 * s2_at[1])
        positions.add(s2_at)
    assert len(positions) > 1
    resized = TrainingViews(pairs, {}, sizes, seed=0)[0, 0]["pairs"]
    assert window_of(resized["s2"], s2) is None
    views = TrainingViews(pairs, {}, sizes, seed=0, native=True)
    assert torch.equal(monitor_images(views, "s2", 64, 1)[0], s2[:, 16:80, 16:80])
    other_ground = [{"images": {"s2": s2, "aerial": aerial[:, :160, :160]}}]
    with pytest.raises(InvalidInputError, match="same ground in every sensor") as info:
        TrainingViews(other_ground, {}, sizes, seed=0, native=True)[0, 0]
    assert info.value.field == "images"
    with pytest.raises(ValueError, match="'aerial'.*need images of at least"):
        TrainingViews(pairs, {}, {"s2": 64, "aerial": 200}, seed=0, native=True)[0, 0]
