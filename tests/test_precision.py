"""Precision ("auto" | "fp32" | "bf16" | "int8"): what "auto" resolves to, that each precision
really runs, float32 results, accuracy against fp32 on real imagery with the bundled model, int8
refused where it cannot run, and training under bf16 following the fp32 loss trajectory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from torch import nn

import xstars_models.calibration as calibration
import xstars_models.precision as precision_module
from factories import tiny_model
from toy_data import ToyPairs
from xstars_models import XStars
from xstars_models.cli import main
from xstars_models.errors import BackendUnavailableError, InvalidOptionError
from xstars_models.evaluation import load_landcover_chips
from xstars_models.precision import Int8Linear, cpu_bf16_native, quantize_int8, resolve_precision
from xstars_models.samples import list_samples, load_sample, sample_path
from xstars_models.scenes import embed_scene
from xstars_models.training import TrainConfig, pretrain

SENSOR = "sentinel2_rgb"
# The accuracy guard of the issue: mean cosine to the fp32 embedding.
MIN_MEAN_COSINE = 0.999


@pytest.fixture(scope="module")
def bundled() -> XStars:
    return XStars.from_pretrained("xstars-s2-aerial")


@pytest.fixture(scope="module")
def tiny() -> XStars:
    return tiny_model()


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@pytest.mark.parametrize(
    ("flags", "machine", "native", "says"),
    [
        ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "x86_64", True, "AMX-BF16"),
        ({"avx512f", "avx512_bf16", "avx512_vnni"}, "x86_64", False, "no AMX-BF16"),
        ({"avx2", "fma"}, "x86_64", False, "no bf16"),
        ({"fp", "asimd", "bf16", "i8mm"}, "aarch64", True, "BF16"),
        ({"fp", "asimd"}, "aarch64", False, "no BF16"),
        (set(), "aarch64", False, "could not be read"),
        (set(), "riscv64", False, "riscv64"),
    ],
)
def test_cpu_bf16_detection_names_the_deciding_feature(flags, machine, native, says):
    found, reason = cpu_bf16_native(flags, machine)
    assert found is native
    assert says in reason


@pytest.fixture()
def calibrating(monkeypatch, tmp_path):
    """``"auto"`` as users get it (the suite forces fp32, see conftest.py), its cache in tmp_path;
    returns the cache file."""
    monkeypatch.delenv("XSTARS_PRECISION", raising=False)
    monkeypatch.setenv("XSTARS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def fake_timings(monkeypatch, fp32: float, bf16: float) -> list[dict]:
    """Replace the timing of the model's runs by fixed seconds; returns the runs it was given."""
    calls: list[dict] = []

    def timed(runs):
        calls.append(runs)
        return {"fp32": fp32, "bf16": bf16}

    monkeypatch.setattr(calibration, "time_runs", timed)
    return calls


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_without_a_model_guesses_from_the_cpu_features(calibrating, monkeypatch, native, expected):
    monkeypatch.setattr(precision_module, "_this_cpu_bf16", lambda: (native, "patched"))
    resolved = resolve_precision("auto", "cpu")
    assert resolved.name == expected and "not measured: patched" in resolved.reason


@pytest.mark.parametrize(("bf16_s", "expected"), [(0.5, "bf16"), (0.9, "fp32"), (1.6, "fp32")])
def test_auto_runs_what_the_measurement_says(tiny, calibrating, monkeypatch, bf16_s, expected):
    fake_timings(monkeypatch, 1.0, bf16_s)
    images = load_sample("sentinel2_rgb_coast")[:64, :64]
    auto = tiny.embed(images, SENSOR, output="patch", progress=False)
    forced = tiny.embed(images, SENSOR, output="patch", progress=False, precision=expected)
    other = tiny.embed(images, SENSOR, output="patch", progress=False, precision="bf16" if expected == "fp32" else "fp32")
    assert torch.equal(auto, forced)
    assert not torch.equal(auto, other)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def run(self, seconds: float):
        def advance() -> None:
            self.now += seconds

        return advance


@pytest.mark.parametrize(
    ("fp32_s", "bf16_s", "expected", "says"),
    [(0.2, 0.1, "bf16", "bf16 2.00x fp32"), (0.2, 0.18, "fp32", "bf16 1.11x fp32"), (0.1, 0.2, "fp32", "bf16 0.50x fp32")],
)
def test_calibration_picks_bf16_only_when_at_least_15_percent_faster(calibrating, monkeypatch, fp32_s, bf16_s, expected, says):
    clock = FakeClock()
    monkeypatch.setattr(calibration, "clock", clock)
    runs = {"fp32": clock.run(fp32_s), "bf16": clock.run(bf16_s), "int8": clock.run(fp32_s / 2)}
    name, reason = calibration.calibrate("key", lambda: runs)
    assert name == expected
    assert reason.startswith(f"measured: {says}, int8 2.00x") and ">= 1.15x" in reason


@pytest.mark.parametrize(("seconds", "calls"), [(0.01, 1 + 3), (1.0, 1 + 1)])
def test_calibration_stays_within_its_budget(monkeypatch, seconds, calls):
    # Fast runs: a warm-up and 3 timed rounds; runs whose warm-up already spent the 3 s budget:
    # one timed round.
    clock = FakeClock()
    monkeypatch.setattr(calibration, "clock", clock)
    counts = {"fp32": 0, "bf16": 0}

    def run(name):
        def once():
            counts[name] += 1
            clock.now += seconds

        return once

    best = calibration.time_runs({name: run(name) for name in counts})
    assert counts == {"fp32": calls, "bf16": calls}
    assert best == {"fp32": pytest.approx(seconds), "bf16": pytest.approx(seconds)}


def test_calibration_is_cached_atomically_and_per_key(tiny, calibrating, monkeypatch):
    calls = fake_timings(monkeypatch, 1.0, 0.5)
    first = tiny.resolve_precision("auto", tokens=16)
    assert first.name == "bf16" and first.reason.startswith("measured: bf16 2.00x fp32")
    assert sorted(p.name for p in calibrating.parent.iterdir()) == ["precision.json"]  # no temporary file left
    entries = json.loads(calibrating.read_text())["entries"]
    (key, entry), = entries.items()
    assert "16 tokens" in key and tiny.arch in key and "infer" in key and torch.__version__ in key
    assert entry["choice"] == "bf16" and entry["fp32"] == 1.0 and entry["bf16"] == 0.5
    again = tiny.resolve_precision("auto", tokens=16)
    assert again.name == "bf16" and again.reason.startswith("cached: bf16 2.00x fp32")
    assert len(calls) == 1
    tiny.resolve_precision("auto", tokens=64)  # another tile size: measured again
    assert len(calls) == 2
    other = XStars.new("vit_small_patch16_224", {SENSOR: tiny.sensors[SENSOR].spec}, patch_sizes={SENSOR: 8},
                       depth=1, embed_dim=48, num_heads=2)
    other.resolve_precision("auto", tokens=16)  # another model: measured again
    assert len(calls) == 3
    assert len(json.loads(calibrating.read_text())["entries"]) == 3


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "entries": []}', '{"version": 1, "entries": {"k": 3}}'])
def test_a_corrupt_cache_is_remeasured_and_rewritten(tiny, calibrating, monkeypatch, content):
    calls = fake_timings(monkeypatch, 1.0, 0.5)
    calibrating.parent.mkdir(parents=True)
    calibrating.write_text(content)
    if content.endswith("3}}"):  # a well-formed file with a malformed entry for this very key
        key = calibration.calibration_key(tiny.device, tiny.arch, tiny.embed_dim, 16, False)
        calibrating.write_text(json.dumps({"version": 1, "entries": {key: {"choice": "bf16"}}}))
    with pytest.warns(UserWarning, match="measuring again"):
        resolved = tiny.resolve_precision("auto", tokens=16)
    assert resolved.reason.startswith("measured:") and len(calls) == 1
    entries = json.loads(calibrating.read_text())["entries"]
    assert [e["choice"] for e in entries.values()] == ["bf16"]


def test_the_real_calibration_times_inference_and_training(tiny, calibrating):
    # The tiny model takes milliseconds: this runs the real runs (fp32, bf16, int8; forward and
    # backward for training) without faking anything.
    for training in (False, True):
        resolved = tiny.resolve_precision("auto", tokens=16, batch_size=2, training=training)
        assert resolved.name in ("fp32", "bf16") and resolved.reason.startswith("measured: bf16 ")
        assert ("int8" in resolved.reason) is not training
    assert all(p.grad is None for p in tiny.parameters())  # the timed backward left no gradients
    assert len(json.loads(calibrating.read_text())["entries"]) == 2


def test_the_training_calibration_times_a_model_whose_primary_stem_is_frozen(calibrating):
    # adapt in stem mode: only the new sensor's stem trains, nothing trainable is on the timed
    # (primary) path; the backward through the trunk is timed all the same.
    model = tiny_model()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    resolved = model.resolve_precision("auto", tokens=16, batch_size=2, training=True)
    assert resolved.reason.startswith("measured: bf16 ")
    assert all(p.grad is None for p in model.parameters())


def test_xstars_precision_forces_auto_and_a_bad_value_is_named(tiny, calibrating, monkeypatch):
    calls = fake_timings(monkeypatch, 1.0, 0.5)
    monkeypatch.setenv("XSTARS_PRECISION", "fp32")
    resolved = tiny.resolve_precision("auto")
    assert resolved.name == "fp32" and resolved.reason == "forced by XSTARS_PRECISION=fp32"
    assert tiny.resolve_precision("bf16").name == "bf16"  # an explicit argument wins
    monkeypatch.setenv("XSTARS_PRECISION", "int8")
    assert tiny.resolve_precision("auto").name == "int8"
    with pytest.raises(InvalidOptionError, match="XSTARS_PRECISION='int8' is not a precision for training") as info:
        tiny.resolve_precision("auto", training=True)
    assert info.value.field == "XSTARS_PRECISION"
    monkeypatch.setenv("XSTARS_PRECISION", "fp16")
    with pytest.raises(InvalidOptionError, match="XSTARS_PRECISION='fp16'") as info:
        tiny.embed(load_sample("sentinel2_rgb_coast")[:64, :64], SENSOR, progress=False)
    assert info.value.field == "XSTARS_PRECISION"
    assert calls == []


def test_the_suite_runs_auto_as_fp32_without_measuring(tiny, monkeypatch):
    calls = fake_timings(monkeypatch, 1.0, 0.5)
    assert tiny.resolve_precision("auto").name == "fp32"
    assert calls == []


def test_embed_scene_records_the_measured_precision(tiny, calibrating, monkeypatch, tmp_path):
    calls = fake_timings(monkeypatch, 1.8, 1.0)
    sample = sample_path("sentinel2_rgb_inland")
    first = embed_scene(tiny, sample, SENSOR, out=tmp_path / "a.tif", progress=False, tile=64)
    assert first.precision.startswith("bf16 (precision='auto'): measured: bf16 1.80x fp32")
    second = embed_scene(tiny, sample, SENSOR, out=tmp_path / "b.tif", progress=False, tile=64)
    assert second.precision.startswith("bf16 (precision='auto'): cached: bf16 1.80x fp32")
    assert len(calls) == 1 and "64 tokens" in next(iter(json.loads(calibrating.read_text())["entries"]))
    with rasterio.open(first.path) as written:
        assert written.tags()["xstars_precision"] == "bf16"


@pytest.mark.parametrize(("bf16_s", "expected"), [(0.5, "bf16"), (0.95, "fp32")])
def test_training_auto_uses_the_measured_training_step(calibrating, monkeypatch, tmp_path, bf16_s, expected):
    calls = fake_timings(monkeypatch, 1.0, bf16_s)
    model = tiny_model(extra_sensors=("aerial",))
    config = TrainConfig(steps=1, batch_size=4, dino_out_dim=64, local_crops=2, checkpoint_every=100)
    trained = pretrain(model, ToyPairs(8), config, out_dir=tmp_path / "run", device="cpu", progress=False)
    assert trained.training_record["precision"].startswith(f"{expected} (precision='auto'): measured:")
    assert len(calls) == 1
    assert "train" in next(iter(json.loads(calibrating.read_text())["entries"]))


def test_auto_on_cuda_is_bf16_and_says_why(calibrating):
    resolved = resolve_precision("auto", "cuda")
    assert resolved.name == "bf16" and "CUDA" in str(resolved) and "precision='auto'" in str(resolved)


def test_unknown_precision_names_the_value_and_the_choices(tiny):
    choices = r"\('auto', 'fp32', 'bf16', 'int8'\)"
    with pytest.raises(InvalidOptionError, match=rf"precision must be one of {choices}, got 'fp16'") as info:
        tiny.embed(load_sample("sentinel2_rgb_coast")[:64, :64], SENSOR, progress=False, precision="fp16")
    assert info.value.field == "precision"


def test_int8_is_inference_only_and_cpu_only():
    from xstars_models.errors import ConfigError

    with pytest.raises(ConfigError, match="inference only") as info:
        TrainConfig(precision="int8")
    assert info.value.field == "precision"
    with pytest.raises(InvalidOptionError, match=r"^precision='int8' is for inference only") as info:
        resolve_precision("int8", "cpu", training=True)
    assert info.value.field == "precision"
    with pytest.raises(InvalidOptionError, match=r"^precision='int8' runs on CPU only.*'cuda'.*bf16") as info:
        resolve_precision("int8", "cuda")
    assert info.value.field == "precision"
    # The command line names its own flag for the setting.
    assert info.value.describe(lambda name, value: f"--{name} {value}").startswith("--precision int8 runs on CPU only")
    with pytest.raises(ConfigError, match="got 'half'") as info:
        TrainConfig(precision="half")
    assert info.value.field == "precision"


def test_int8_without_quantised_kernels_is_a_typed_error(monkeypatch):
    # A torch built without fbgemm/qnnpack: the property lives on the module's class.
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["none"])
    with pytest.raises(BackendUnavailableError, match=r"^precision='int8' needs torch's quantised linear kernels") as info:
        Int8Linear(nn.Linear(4, 4))
    assert info.value.field == "precision"


def test_int8_linear_matches_the_float_layer_and_quantize_copies():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 16, bias=False))
    x = torch.randn(2, 40, 48)
    quantized = quantize_int8(net)
    assert [type(m) for m in net] == [nn.Linear, nn.GELU, nn.Linear]  # the original is untouched
    assert [type(m) for m in quantized] == [Int8Linear, nn.GELU, Int8Linear]
    with torch.inference_mode():
        expected, got = net(x), quantized(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert not torch.equal(got, expected)
    assert float((got - expected).norm() / expected.norm()) < 0.05


def test_int8_copy_is_reused_until_a_weight_changes(tiny):
    first = tiny.int8_copy()
    assert tiny.int8_copy() is first
    assert isinstance(first.trunk.blocks[0].attn.qkv, Int8Linear)
    assert type(tiny.trunk.blocks[0].attn.qkv) is nn.Linear
    images = load_sample("sentinel2_rgb_coast")[:64, :64]
    before = tiny.embed(images, SENSOR, progress=False, precision="int8")
    weight = tiny.trunk.blocks[0].mlp.fc1.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(2)
        assert tiny.int8_copy() is not first
        assert not torch.equal(tiny.embed(images, SENSOR, progress=False, precision="int8"), before)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_bf16_inference_runs_a_copy_with_bf16_linear_weights_and_fused_attention(tiny, monkeypatch):
    copy = precision_module.bf16_copy(tiny)
    assert precision_module.bf16_copy(tiny) is copy and precision_module.inference_copy(tiny, "bf16") is copy
    assert precision_module.inference_copy(tiny, "fp32") is tiny
    block = copy.trunk.blocks[0]
    assert block.attn.qkv.weight.dtype == block.mlp.fc2.bias.dtype == torch.bfloat16
    assert block.norm1.weight.dtype == torch.float32  # LayerNorm keeps fp32 (autocast runs it in fp32)
    assert tiny.trunk.blocks[0].attn.qkv.weight.dtype == torch.float32  # the model itself is untouched
    # What embed runs at bf16: the copy's bf16 weights (no per-call weight casts), attention through
    # scaled_dot_product_attention (one call per block), the result float32 and close to fp32.
    sdpa, linear = F.scaled_dot_product_attention, F.linear
    attention_calls, weight_dtypes = [], set()

    def counting_sdpa(*args, **kwargs):
        attention_calls.append(args[0].dtype)
        return sdpa(*args, **kwargs)

    def recording_linear(x, weight, bias=None):
        weight_dtypes.add(weight.dtype)
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(F, "linear", recording_linear)
    images = load_sample("sentinel2_rgb_coast")[:64, :64]
    got = tiny.embed(images, SENSOR, progress=False, precision="bf16")
    assert attention_calls == [torch.bfloat16] * len(tiny.trunk.blocks)
    assert weight_dtypes == {torch.bfloat16}
    monkeypatch.undo()
    reference = tiny.embed(images, SENSOR, progress=False, precision="fp32")
    assert got.dtype == torch.float32 and mean_cosine(got, reference) >= MIN_MEAN_COSINE
    with torch.no_grad():
        tiny.trunk.blocks[0].mlp.fc1.weight.mul_(1.0)  # any in-place change makes a new copy
    assert precision_module.bf16_copy(tiny) is not copy


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bundled_model_on_the_bundled_samples_keeps_the_fp32_embedding(bundled, precision):
    for name in list_samples():
        image = load_sample(name)  # 256 x 256 real Sentinel-2 RGB
        for output in ("cls", "patch"):
            reference = bundled.embed(image, SENSOR, output=output, progress=False, precision="fp32")
            got = bundled.embed(image, SENSOR, output=output, progress=False, precision=precision)
            assert got.dtype == torch.float32 and got.shape == reference.shape
            assert not torch.equal(got, reference), f"{precision} ran as fp32"
            assert mean_cosine(got, reference) >= MIN_MEAN_COSINE, (name, output)


@pytest.fixture(scope="module")
def chips_fp32(bundled) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chips = load_landcover_chips().chips  # 833 real 64 x 64 px Sentinel-2 chips
    return chips, {
        output: bundled.embed(chips, SENSOR, output=output, batch_size=128, progress=False, precision="fp32")
        for output in ("cls", "mean")
    }


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bundled_model_on_the_landcover_chips_keeps_the_fp32_embedding(bundled, chips_fp32, precision):
    chips, references = chips_fp32
    for output, reference in references.items():
        got = bundled.embed(chips, SENSOR, output=output, batch_size=128, progress=False, precision=precision)
        assert got.dtype == torch.float32
        assert mean_cosine(got, reference) >= MIN_MEAN_COSINE, output


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_embed_scene_runs_the_precision_and_keeps_the_map(bundled, tmp_path, precision):
    sample = sample_path("sentinel2_rgb_inland")
    reference = embed_scene(bundled, sample, SENSOR, out=tmp_path / "fp32.tif", progress=False, precision="fp32")
    result = embed_scene(bundled, sample, SENSOR, out=tmp_path / "x.tif", progress=False, precision=precision)
    assert reference.precision.startswith("fp32") and result.precision.startswith(precision)
    with rasterio.open(reference.path) as a, rasterio.open(result.path) as b:
        expected, got = a.read(), b.read()
        assert b.dtypes[0] == "float32"
    assert not np.array_equal(got, expected)
    # One feature vector per token: bands are the feature dimension.
    vectors = lambda m: torch.from_numpy(m.reshape(m.shape[0], -1).T)  # noqa: E731
    assert mean_cosine(vectors(got), vectors(expected)) >= MIN_MEAN_COSINE


def test_a_partial_scene_run_does_not_resume_under_another_precision(tiny, tmp_path, monkeypatch):
    import xstars_models.scenes.writers as writers
    from xstars_models.errors import InvalidOptionError

    out = tmp_path / "map.tif"
    calls = {"n": 0}
    real_commit = writers.Partial.commit

    def stop_after_first_strip(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(writers.Partial, "commit", stop_after_first_strip)
    with pytest.raises(KeyboardInterrupt):
        embed_scene(tiny, sample_path("sentinel2_rgb_inland"), SENSOR, out=out, progress=False, precision="fp32")
    monkeypatch.setattr(writers.Partial, "commit", real_commit)
    with pytest.raises(InvalidOptionError, match='precision: "fp32" then, "int8" now') as info:
        embed_scene(tiny, sample_path("sentinel2_rgb_inland"), SENSOR, out=out, progress=False, precision="int8")
    assert info.value.field == "resume"


def test_cli_precision_flag_prints_what_ran(tiny, tmp_path, capsys):
    folder = tiny.save_pretrained(tmp_path / "model")
    sample = str(sample_path("sentinel2_rgb_coast"))
    results = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.npy"
        assert main(["embed", str(folder), sample, "--sensor", SENSOR, "--out", str(out), "--precision", precision]) == 0
        assert f"precision: {precision}" in capsys.readouterr().out
        results[precision] = torch.from_numpy(np.load(out))
    expected = tiny.embed(load_sample("sentinel2_rgb_coast"), SENSOR, progress=False, precision="fp32")[0]
    assert torch.equal(results["fp32"], expected)
    assert not torch.equal(results["int8"], expected)
    out = tmp_path / "scene.tif"
    argv = ["embed-scene", str(folder), sample, "--sensor", SENSOR, "--out", str(out), "--no-progress", "--precision", "bf16"]
    assert main(argv) == 0
    assert "precision: bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["embed", str(folder), sample, "--sensor", SENSOR, "--out", str(out) + ".npy", "--precision", "fp16"])
    assert exited.value.code == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_cli_embed_prints_the_precision_it_runs_timed_on_the_files_size(tiny, calibrating, monkeypatch, tmp_path, capsys):
    import xstars_models.model as model_module

    timed_tokens = []
    real_runs = model_module.model_runs

    def recording_runs(model, device, tokens, batch, training):
        timed_tokens.append(tokens)
        return real_runs(model, device, tokens, batch, training)

    monkeypatch.setattr(model_module, "model_runs", recording_runs)
    # bf16 pays on the 256 px file, not on the default tile: the line must say what ran on the file.
    monkeypatch.setattr(calibration, "time_runs", lambda runs: {"fp32": 1.0, "bf16": 0.5 if timed_tokens[-1] >= 256 else 1.0})
    folder = tiny.save_pretrained(tmp_path / "model")
    out = tmp_path / "auto.npy"
    assert main(["embed", str(folder), str(sample_path("sentinel2_rgb_coast")), "--sensor", SENSOR, "--out", str(out)]) == 0
    patch = tiny.sensors[SENSOR].patch_size
    assert timed_tokens == [(256 // patch) ** 2]
    assert "precision: bf16 (precision='auto'): measured: bf16 2.00x" in capsys.readouterr().out
    expected = tiny.embed(load_sample("sentinel2_rgb_coast"), SENSOR, progress=False, precision="bf16")[0]
    assert torch.equal(torch.from_numpy(np.load(out)), expected)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_training_follows_the_fp32_loss_trajectory(tmp_path):
    config = dict(steps=8, batch_size=8, lr=1e-3, warmup_steps=2, dino_out_dim=64, local_crops=2, checkpoint_every=100)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model(extra_sensors=("aerial",))
        trained = pretrain(model, ToyPairs(16), TrainConfig(**config, precision=precision),
                           out_dir=tmp_path / precision, device="cpu", progress=False)
        assert trained.training_record["precision"].startswith(precision)
        runs[precision] = losses(tmp_path / precision)
    fp32, bf16 = np.array(runs["fp32"]), np.array(runs["bf16"])
    assert len(fp32) == len(bf16) == 8
    assert not np.array_equal(fp32, bf16), "bf16 ran as fp32"
    # Same trajectory: every step within 2% of the fp32 loss.
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)
