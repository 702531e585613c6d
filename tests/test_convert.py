"""Converting official X-STARS training checkpoints (``xstars_models.convert``).

The checkpoints are built here in the official layout (DINO's ViT key names written out by hand,
not taken from timm), with the official ``vit_tiny`` at a 2 x 2 token grid (32 px) to stay small.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from factories import rgb_images
from torch import nn

from xstars_models import CheckpointFormatError, StateDictMismatchError, XStars, get_sensor
from xstars_models.cli import main
from xstars_models.convert import convert_official_checkpoint
from xstars_models.convert.official import _check_dino_trunk
from xstars_models.errors import InvalidOptionError

DIM, DEPTH, PATCH, GRID = 192, 12, 16, 2  # official vit_tiny, 32 px position grid
IMG = PATCH * GRID
HEAD_HIDDEN, HEAD_BOTTLENECK, OUT_DIM = 16, 8, 32
# Deliberately not any built-in sensor's statistics: the converter must use these.
MEAN = [0.30631185, 0.34405161, 0.23653328]
STD = [0.16821284, 0.14533219, 0.16300538]


@lru_cache(maxsize=None)
def _official_backbone(seed: int) -> dict[str, torch.Tensor]:
    """DINO ViT-Tiny backbone tensors, random, under DINO's own names (cached: callers copy the
    dict before changing it and never change a tensor)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.02, base: float = 0.0) -> torch.Tensor:
        return base + scale * torch.randn(*shape, generator=gen)

    sd = {
        "cls_token": rand(1, 1, DIM),
        "pos_embed": rand(1, GRID * GRID + 1, DIM),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rand(DIM),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": rand(DIM, scale=0.1, base=1.0),
            b + "norm1.bias": rand(DIM),
            b + "attn.qkv.weight": rand(3 * DIM, DIM),
            b + "attn.qkv.bias": rand(3 * DIM),
            b + "attn.proj.weight": rand(DIM, DIM),
            b + "attn.proj.bias": rand(DIM),
            b + "norm2.weight": rand(DIM, scale=0.1, base=1.0),
            b + "norm2.bias": rand(DIM),
            b + "mlp.fc1.weight": rand(4 * DIM, DIM),
            b + "mlp.fc1.bias": rand(4 * DIM),
            b + "mlp.fc2.weight": rand(DIM, 4 * DIM),
            b + "mlp.fc2.bias": rand(DIM),
        })
    sd["norm.weight"] = rand(DIM, scale=0.1, base=1.0)
    sd["norm.bias"] = rand(DIM)
    return sd


@lru_cache(maxsize=None)
def _dino_head(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "mlp.0.weight": (HEAD_HIDDEN, DIM), "mlp.0.bias": (HEAD_HIDDEN,),
        "mlp.2.weight": (HEAD_HIDDEN, HEAD_HIDDEN), "mlp.2.bias": (HEAD_HIDDEN,),
        "mlp.4.weight": (HEAD_BOTTLENECK, HEAD_HIDDEN), "mlp.4.bias": (HEAD_BOTTLENECK,),
        "last_layer.weight_g": (OUT_DIM, 1), "last_layer.weight_v": (OUT_DIM, HEAD_BOTTLENECK),
    }
    return {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}


def _official_args(**overrides: Any) -> argparse.Namespace:
    args = dict(
        arch="vit_tiny", patch_size=PATCH, out_dim=OUT_DIM, norm_last_layer=True, use_bn_in_head=False,
        inp_dim=224, momentum_teacher=0.996, teacher_temp=0.04, epochs=100, lr=0.0005,
        batch_size_per_gpu=4, global_crops_scale=(0.4, 1.0), local_crops_number=8, crop_size=96,
        mean=list(MEAN), std=list(STD), sensors=["SPOT", "Sentinel"], adapt_sensor="SPOT",
        alpha=0.1, use_msad=True, msad_embedding_dim=OUT_DIM, msad_proj_dim=1024,
        pretrained_weights="/home/someone/runs/sentinel/checkpoint.pth",
        data_path="/home/someone/MSC-France", output_dir="/scratch/someone/run1", dist_url="env://",
        gpu=0, rank=0, world_size=1, seed=0,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def _official_checkpoint(**arg_overrides: Any) -> dict[str, Any]:
    """The dict the official code passes to torch.save: the student is DDP-wrapped."""
    student = {f"module.backbone.{k}": v for k, v in _official_backbone(1).items()}
    student.update({f"module.head.{k}": v for k, v in _dino_head(2).items()})
    teacher = {f"backbone.{k}": v for k, v in _official_backbone(3).items()}
    teacher.update({f"head.{k}": v for k, v in _dino_head(4).items()})
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": {
            "state": {0: {"step": torch.tensor(70.0), "exp_avg": torch.zeros(DIM), "exp_avg_sq": torch.zeros(DIM)}},
            "param_groups": [{"lr": 1e-4, "weight_decay": 0.04, "params": [0]}],
        },
        "epoch": 7,
        "args": _official_args(**arg_overrides),
        "dino_loss": {"center": torch.randn(1, OUT_DIM)},
        "fp16_scaler": None,
    }


def _save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "module.backbone." if any(k.startswith("module.") for k in state) else "backbone."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    ckpt = _official_checkpoint()
    return _save(ckpt, tmp_path_factory.mktemp("official") / "checkpoint.pth"), ckpt


@pytest.fixture(scope="module")
def converted(official: tuple[Path, dict[str, Any]]) -> XStars:
    return convert_official_checkpoint(official[0])


def _assert_trunk_equals(model: XStars, expected: dict[str, torch.Tensor]) -> None:
    trunk = model.trunk.state_dict()
    assert set(trunk) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(trunk[name], tensor), name


def test_teacher_backbone_is_loaded_exactly(converted: XStars, official: tuple[Path, dict[str, Any]]) -> None:
    _, ckpt = official
    teacher, student = _backbone_of(ckpt["teacher"]), _backbone_of(ckpt["student"])
    _assert_trunk_equals(converted, teacher)
    assert not torch.equal(teacher["norm.weight"], student["norm.weight"])
    assert converted.arch == "vit_tiny_patch16_224"
    assert converted.arch_kwargs == {"img_size": IMG}
    assert list(converted.sensors) == ["spot67_rgb"]  # args.adapt_sensor == "SPOT"
    assert not converted.training


def test_student_key_loads_the_student(official: tuple[Path, dict[str, Any]]) -> None:
    path, ckpt = official
    model = convert_official_checkpoint(path, key="student")
    _assert_trunk_equals(model, _backbone_of(ckpt["student"]))
    assert model.lineage["converted_from"]["key"] == "student"


def test_embeddings_match_plain_timm_on_normalised_input(
    converted: XStars, official: tuple[Path, dict[str, Any]]
) -> None:
    _, ckpt = official
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=IMG).eval()
    reference.load_state_dict(_backbone_of(ckpt["teacher"]), strict=True)
    images = rgb_images(n=3, size=IMG)
    # The official input pipeline: ToTensor (/255) then Normalize(args.mean, args.std).
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = reference.forward_features(x)
    cls = converted.embed(images, sensor="spot67_rgb", output="cls", progress=False, precision="fp32")
    patches = converted.embed(images, sensor="spot67_rgb", output="patch", progress=False, precision="fp32")
    torch.testing.assert_close(cls, tokens[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patches, tokens[:, 1:], rtol=1e-4, atol=1e-5)


def test_config_has_checkpoint_normalisation_and_provenance(
    converted: XStars, official: tuple[Path, dict[str, Any]]
) -> None:
    path, _ = official
    spec = converted.sensors["spot67_rgb"].spec
    builtin = get_sensor("spot67_rgb")
    assert spec.mean == tuple(MEAN) and spec.std == tuple(STD)
    assert spec.mean != builtin.mean
    assert "checkpoint.pth" in spec.normalisation_source
    # Only the statistics change: bands, GSD and value scaling stay the built-in sensor's.
    assert spec.band_names == builtin.band_names and spec.gsd_m == builtin.gsd_m
    assert spec.scale == builtin.scale and spec.dtype == builtin.dtype

    source = converted.lineage["converted_from"]
    data = path.read_bytes()
    assert source["sha256"] == hashlib.sha256(data).hexdigest()
    assert source["size"] == len(data)
    assert (source["file"], source["key"], source["epoch"]) == ("checkpoint.pth", "teacher", 7)

    record = converted.training_record
    assert record["epochs_completed"] == 7 and record["recipe"] == "continual pretraining"
    args = record["args"]
    assert args["arch"] == "vit_tiny" and args["mean"] == MEAN and args["std"] == STD
    assert args["sensors"] == ["SPOT", "Sentinel"] and args["adapt_sensor"] == "SPOT"
    assert args["global_crops_scale"] == [0.4, 1.0] and args["alpha"] == 0.1
    assert args["pretrained_weights"] == "checkpoint.pth"  # local path dropped
    for machine in ("data_path", "output_dir", "dist_url", "gpu", "rank"):
        assert machine not in args
    assert "/home/someone" not in converted.config.to_json()
    assert "carries no gradient" in record["note"]
    json.loads(converted.config.to_json())  # everything recorded is JSON


def test_round_trip_through_save_and_from_pretrained(
    official: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = official
    out = tmp_path / "converted"
    model = convert_official_checkpoint(path, out, model_id="xstars-spot-official")
    assert model.name_or_path == "xstars-spot-official"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    loaded = XStars.from_pretrained(out)
    assert loaded.config.to_dict() | {"files": {}} == model.config.to_dict() | {"files": {}}
    for name, tensor in model.trunk.state_dict().items():
        assert torch.equal(loaded.trunk.state_dict()[name], tensor), name
    images = rgb_images(n=2, size=IMG)
    torch.testing.assert_close(
        loaded.embed(images, "spot67_rgb", progress=False), model.embed(images, "spot67_rgb", progress=False),
        rtol=0, atol=0,
    )


def test_arch_and_sensor_can_be_chosen(official: tuple[Path, dict[str, Any]]) -> None:
    path, ckpt = official
    model = convert_official_checkpoint(path, arch="vit_tiny_patch16_224", sensor="sentinel2_rgb")
    assert model.arch == "vit_tiny_patch16_224" and list(model.sensors) == ["sentinel2_rgb"]
    spec = model.sensors["sentinel2_rgb"].spec
    assert spec.gsd_m == 10.0 and spec.mean == tuple(MEAN)
    _assert_trunk_equals(model, _backbone_of(ckpt["teacher"]))
    assert list(convert_official_checkpoint(path, sensor="Landsat").sensors) == ["landsat8_rgb"]


def test_unknown_arch_lists_the_choices(official: tuple[Path, dict[str, Any]]) -> None:
    with pytest.raises(InvalidOptionError, match="vit_huge") as info:
        convert_official_checkpoint(official[0], arch="vit_huge")
    assert info.value.field == "arch"
    for choice in ("vit_tiny", "vit_small", "vit_base", "vit_large"):
        assert choice in str(info.value)


def test_sensor_that_cannot_feed_the_trunk_is_refused(official: tuple[Path, dict[str, Any]]) -> None:
    with pytest.raises(InvalidOptionError, match="8-bit red, green, blue") as info:
        convert_official_checkpoint(official[0], sensor="sentinel2")  # 13 uint16 bands
    assert info.value.field == "sensor"
    with pytest.raises(InvalidOptionError, match="Unknown sensor") as info:
        convert_official_checkpoint(official[0], sensor="worldview3")
    assert info.value.field == "sensor"
    with pytest.raises(InvalidOptionError, match="key must be 'teacher' or 'student', got 'ema'") as info:
        convert_official_checkpoint(official[0], key="ema")  # type: ignore[arg-type]
    assert info.value.field == "key"


def test_sensor_defaults_from_args(tmp_path: Path) -> None:
    single = _save(_official_checkpoint(sensors=["Landsat"], adapt_sensor=None), tmp_path / "single.pth")
    model = convert_official_checkpoint(single)
    assert list(model.sensors) == ["landsat8_rgb"]
    assert model.sensors["landsat8_rgb"].spec.mean == tuple(MEAN)

    scratch = _official_checkpoint()
    del scratch["args"].adapt_sensor  # pretraining.py: several sensors share one patch embedding
    scratch_path = _save(scratch, tmp_path / "scratch.pth")
    with pytest.raises(InvalidOptionError, match="pass sensor=") as info:
        convert_official_checkpoint(scratch_path)
    assert info.value.field == "sensor"
    model = convert_official_checkpoint(scratch_path, sensor="sentinel2_rgb")
    assert model.training_record["recipe"] == "pretraining"


@pytest.mark.parametrize(
    ("change", "named", "kind"),
    [
        ("extra", "blocks.0.attn.extra_scale", "unexpected"),
        ("missing", "norm.bias", "missing"),
        ("shape", "pos_embed", "shape"),
    ],
)
def test_backbone_mismatch_names_the_key(tmp_path: Path, change: str, named: str, kind: str) -> None:
    ckpt = _official_checkpoint()
    teacher = ckpt["teacher"]
    if change == "extra":
        teacher["backbone.blocks.0.attn.extra_scale"] = torch.ones(3)
    elif change == "missing":
        del teacher["backbone.norm.bias"]
    else:
        teacher["backbone.pos_embed"] = torch.zeros(1, GRID * GRID + 1, DIM + 1)
    path = _save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(StateDictMismatchError) as info:
        convert_official_checkpoint(path)
    message = str(info.value)
    assert named in message and kind in message and "bad.pth" in message
    if change == "shape":  # the other network is intact and still converts
        convert_official_checkpoint(path, key="student")


class _Exploit:
    """Pickles as a call to ``_touch``: what a malicious checkpoint would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_touch, (str(self.marker),))


def _touch(path: str) -> None:
    Path(path).write_text("executed")


def test_unsafe_pickled_content_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "was-executed"
    ckpt = _official_checkpoint()
    ckpt["args"] = _Exploit(marker)
    path = _save(ckpt, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointFormatError, match="refused") as info:
        convert_official_checkpoint(path)
    assert "_touch" in str(info.value) and "unsafe.pth" in str(info.value)
    assert info.value.field == "checkpoint"
    assert not marker.exists()


class _ShellExploit:
    """Runs a shell command when unpickled: torch blocks the whole ``posix`` module, which it words
    differently from other unsupported globals."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_blocked_module_is_refused_whatever_torch_calls_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "was-executed"
    ckpt = _official_checkpoint()
    ckpt["args"] = _ShellExploit(marker)
    path = _save(ckpt, tmp_path / "evil.pth")
    with pytest.raises(CheckpointFormatError, match=r"refused to load: it contains the Python objects \['posix.system'\]"):
        convert_official_checkpoint(path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nothing in it was run" in err and "weights_only=False" not in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_refusal_is_detected_from_the_exception_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _official_checkpoint()
    ckpt["args"] = _Exploit(tmp_path / "was-executed")
    path = _save(ckpt, tmp_path / "unsafe.pth")

    def reworded(*args: Any, **kwargs: Any) -> None:  # a future torch with other words for the same refusal
        raise pickle.UnpicklingError("Weights-only unpickling stopped at an object it does not know.")

    monkeypatch.setattr(torch, "load", reworded)
    with pytest.raises(CheckpointFormatError, match=r"refused to load: it contains the Python objects \['test_convert._touch'\]"):
        convert_official_checkpoint(path)


@pytest.mark.parametrize("field, values", [("mean", [0.3, float("nan"), 0.2]), ("std", [0.1, 0.1, float("inf")]),
                                           ("std", [0.1, 0.0, 0.1])])
def test_non_finite_or_zero_normalisation_is_refused(tmp_path: Path, field: str, values: list[float]) -> None:
    path = _save(_official_checkpoint(**{field: values}), tmp_path / "bad-stats.pth")
    with pytest.raises(CheckpointFormatError, match=rf"args.{field} should be 3 finite numbers") as info:
        convert_official_checkpoint(path, tmp_path / "out")
    assert info.value.field == "checkpoint"
    assert not (tmp_path / "out").exists()


def test_files_that_are_not_official_checkpoints(tmp_path: Path) -> None:
    bare = _save({"model": _official_backbone(0), "epoch": 3}, tmp_path / "bare.pth")
    with pytest.raises(CheckpointFormatError, match="'student' or 'teacher'") as info:
        convert_official_checkpoint(bare)
    assert "bare.pth" in str(info.value) and "'model'" in str(info.value)
    assert info.value.field == "checkpoint"

    listed = _save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointFormatError, match="holds a list"):
        convert_official_checkpoint(listed)

    wrong_type = _official_checkpoint()
    wrong_type["teacher"] = {"backbone.cls_token": [0.0, 1.0]}
    with pytest.raises(CheckpointFormatError, match="'backbone.cls_token': list"):
        convert_official_checkpoint(_save(wrong_type, tmp_path / "wrong.pth"))

    only_student = _official_checkpoint()
    del only_student["teacher"]
    with pytest.raises(CheckpointFormatError, match="try key='student'") as info:
        convert_official_checkpoint(_save(only_student, tmp_path / "student-only.pth"))
    assert info.value.field == "key" and info.value.settings == {"key": "student"}

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a readable torch.save file|is damaged"):
        convert_official_checkpoint(text)

    with pytest.raises(FileNotFoundError):
        convert_official_checkpoint(tmp_path / "absent.pth")


def test_checkpoint_without_args_needs_arch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = _official_checkpoint()
    del ckpt["args"]
    path = _save(ckpt, tmp_path / "no-args.pth")
    with pytest.raises(InvalidOptionError, match="pass arch=") as info:
        convert_official_checkpoint(path, sensor="spot67_rgb")
    assert info.value.field == "arch"
    with caplog.at_level("WARNING", logger="xstars_models.convert"):
        model = convert_official_checkpoint(path, arch="vit_tiny", sensor="spot67_rgb")
    assert "no args.mean" in caplog.text
    # Without args.mean/std the built-in statistics are the best available.
    assert model.sensors["spot67_rgb"].spec == get_sensor("spot67_rgb")
    _assert_trunk_equals(model, _backbone_of(ckpt["teacher"]))


@pytest.mark.parametrize(
    "overrides",
    [dict(norm_layer=partial(nn.LayerNorm, eps=1e-5)), dict(act_layer="gelu_tanh")],
)
def test_trunk_that_is_not_dinos_vit_is_refused(overrides: dict[str, Any]) -> None:
    trunk = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=IMG, depth=1, **overrides)
    with pytest.raises(InvalidOptionError, match="not DINO's ViT") as info:
        _check_dino_trunk(trunk, "vit_tiny_patch16_224")
    assert info.value.field == "arch"
    _check_dino_trunk(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=IMG, depth=1), "x")


def test_cli_convert_writes_the_folder_and_errors_in_one_line(official: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, ckpt = official
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out), "--key", "student", "--sensor", "sentinel2_rgb"]) == 0
    assert "sentinel2_rgb" in capsys.readouterr().out
    _assert_trunk_equals(XStars.from_pretrained(out), _backbone_of(ckpt["student"]))
    bare = _save({"model": _official_backbone(0)}, tmp_path / "bare.pth")
    assert main(["convert", str(bare), str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars convert: error:") and "bare.pth" in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()
    # The other network is named by the command's own flag.
    only_student = _official_checkpoint()
    del only_student["teacher"]
    assert main(["convert", str(_save(only_student, tmp_path / "student-only.pth")), str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars convert: error: ") and "try --key student" in err and "key=" not in err
