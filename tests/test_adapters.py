"""LoRA on the trunk and sensor adapter files: LoRA starts as a no-op, trains only its own
parameters, merges back to plain timm weights; adapters round-trip onto their recorded base, stay
small, and refuse the wrong base, damaged files and files that are not adapters."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from torch import nn

from factories import TINY, rgb_images, tiny_model
from toy_data import ToyPairs
from xstars_models import ChecksumError, StateDictMismatchError, XStars, get_sensor
from xstars_models.adapters import ADAPTER_FORMAT, AdapterInfo, load_adapter, read_adapter_info, save_adapter, trunk_sha256
from xstars_models.errors import ConfigError, InvalidInputError, InvalidOptionError, InvalidTypeError
from xstars_models.lora import (
    LoRALinear,
    apply_lora,
    base_state_dict,
    load_lora_state_dict,
    lora_config,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from xstars_models.serialization import write_safetensors
from xstars_models.training import TrainConfig, adapt

SPOT = get_sensor("spot67").with_gsd(5.0, name="spot5m")  # 4 bands at 5 m
# The adapter tests' base: Sentinel-2 RGB with 4 px (40 m) tokens, so SPOT gets 8 px tokens; deep
# and wide enough that the trunk outweighs one stem, as in real ViTs.
BASE = dict(patch_size=4, img_size=32, embed_dim=64, depth=4, num_heads=2)


def _spot_images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 4, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _tokens(model: XStars, sensor: str = "sentinel2_rgb") -> torch.Tensor:
    x = rgb_images(2, 64) if sensor == "sentinel2_rgb" else _spot_images()
    return model.embed(x, sensor, output="patch", progress=False, precision="fp32")


def _perturb_lora(model: XStars) -> None:
    with torch.no_grad():
        for param in lora_parameters(model.trunk):
            param.add_(torch.randn_like(param) * 0.05)


@pytest.fixture()
def base_folder(tmp_path):
    folder = tmp_path / "base"
    torch.manual_seed(0)
    XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], **BASE).save_pretrained(folder)
    return folder


def _adapted(base_folder, lora: bool) -> XStars:
    """What adapt() hands back, without the training: the base with a new stem (and LoRA), the
    new weights moved away from their initialisation."""
    model = XStars.from_pretrained(base_folder)
    model.add_sensor(SPOT, init_from="sentinel2_rgb")
    with torch.no_grad():
        for param in model.stems["spot5m"].parameters():
            param.add_(torch.randn_like(param) * 0.05)
    if lora:
        apply_lora(model.trunk, rank=4, alpha=8)
        _perturb_lora(model)
    model.lineage = {"base_model": str(base_folder), "base_revision": None, "adapt_mode": "lora" if lora else "stem"}
    return model


def test_lora_starts_as_a_no_op_and_freezes_the_wrapped_layers():
    model = tiny_model(extra_sensors=())
    before = _tokens(model)
    replaced = apply_lora(model.trunk, rank=4)
    assert replaced == [f"blocks.{i}.attn.{t}" for i in range(TINY["depth"]) for t in ("qkv", "proj")]
    assert torch.equal(_tokens(model), before)
    layer = model.trunk.blocks[0].attn.qkv
    assert isinstance(layer, LoRALinear) and not layer.base.weight.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert lora_config(model.trunk) == {"rank": 4, "alpha": 16.0, "targets": ["attn.qkv", "attn.proj"]}
    with pytest.raises(InvalidInputError, match="already applied") as info:
        apply_lora(model.trunk)
    assert info.value.field == "trunk"


def test_bad_target_changes_nothing():
    model = tiny_model(extra_sensors=())
    with pytest.raises(InvalidOptionError, match="mlp.act: GELU, not nn.Linear") as info:
        apply_lora(model.trunk, targets=("attn.qkv", "mlp.act"))
    assert info.value.field == "targets"
    assert lora_config(model.trunk) is None


@pytest.mark.parametrize(
    "call, error, field, message",
    [
        (lambda trunk: apply_lora(trunk, targets="attn.qkv"), InvalidTypeError, "targets", "got the string 'attn.qkv'"),
        (lambda trunk: apply_lora(trunk, targets=()), InvalidOptionError, "targets", "at least one target"),
        (lambda trunk: apply_lora(nn.Linear(2, 2)), InvalidTypeError, "trunk", "with .blocks, got Linear"),
        (lambda trunk: apply_lora(trunk, rank=0), InvalidOptionError, "rank", "rank must be a positive integer, got 0"),
        (lambda trunk: apply_lora(trunk, dropout=1.0), InvalidOptionError, "dropout", r"dropout must be in \[0, 1\)"),
        (lambda trunk: LoRALinear(nn.Conv2d(2, 2, 1)), InvalidTypeError, "base", "wraps an nn.Linear, got Conv2d"),
    ],
    ids=["string-targets", "no-targets", "not-a-vit", "rank", "dropout", "not-linear"],
)
def test_bad_lora_arguments_name_the_argument_and_change_nothing(call, error, field, message):
    model = tiny_model(extra_sensors=())
    with pytest.raises(error, match=message) as info:
        call(model.trunk)
    assert info.value.field == field
    assert lora_config(model.trunk) is None


def test_lora_mode_trains_only_lora_and_the_new_stem():
    model = tiny_model(extra_sensors=())
    model.requires_grad_(False)  # as adapt(mode="lora") does
    model.add_sensor(SPOT, init_from="sentinel2_rgb")
    apply_lora(model.trunk, rank=4)
    model.stems["spot5m"].requires_grad_(True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora_names = {f"trunk.{key}" for key in lora_state_dict(model.trunk)}
    assert trainable == lora_names | {"stems.spot5m.proj.weight", "stems.spot5m.proj.bias"}
    assert {id(p) for p in lora_parameters(model.trunk)} == {
        id(p) for n, p in model.named_parameters() if n in lora_names
    }


def test_training_lora_changes_outputs_but_not_base_weights_and_merges_to_timm_keys():
    model = tiny_model(extra_sensors=())
    timm_keys = list(model.trunk.state_dict())
    frozen = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    before = _tokens(model)
    apply_lora(model.trunk, rank=4, dropout=0.1)
    assert "blocks.0.attn.qkv.base.weight" in model.trunk.state_dict()
    optimizer = torch.optim.AdamW(lora_parameters(model.trunk), lr=1e-2)
    x = torch.from_numpy(rgb_images(4, 64)).permute(0, 3, 1, 2).float()
    model.train()
    for _ in range(3):
        loss = model(x, "sentinel2_rgb")[:, 0].pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    adapted = _tokens(model)
    assert not torch.allclose(adapted, before, atol=1e-4)
    base = base_state_dict(model.trunk)
    assert list(base) == timm_keys and all(torch.equal(base[k], frozen[k]) for k in timm_keys)

    assert merge_lora(model.trunk) == [f"blocks.{i}.attn.{t}" for i in range(TINY["depth"]) for t in ("qkv", "proj")]
    assert type(model.trunk.blocks[0].attn.qkv) is nn.Linear
    assert model.trunk.blocks[0].attn.qkv.weight.requires_grad  # as it was before apply_lora
    assert list(model.trunk.state_dict()) == timm_keys
    torch.testing.assert_close(_tokens(model), adapted, rtol=1e-5, atol=1e-5)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **TINY)
    plain.load_state_dict(model.trunk.state_dict(), strict=True)
    assert merge_lora(model.trunk) == []


def test_load_lora_state_dict_is_strict():
    source, target = tiny_model(seed=0, extra_sensors=()), tiny_model(seed=1, extra_sensors=())
    for model in (source, target):
        apply_lora(model.trunk, rank=4)
    _perturb_lora(source)
    tensors = lora_state_dict(source.trunk)
    load_lora_state_dict(target.trunk, tensors)
    assert all(torch.equal(v, lora_state_dict(target.trunk)[k]) for k, v in tensors.items())

    broken = dict(tensors)
    del broken["blocks.1.attn.proj.lora_B"]
    broken["blocks.9.attn.qkv.lora_A"] = tensors["blocks.0.attn.qkv.lora_A"]
    with pytest.raises(StateDictMismatchError) as err:
        load_lora_state_dict(target.trunk, broken)
    assert "missing (1):\n    blocks.1.attn.proj.lora_B" in str(err.value)
    assert "unexpected (1):\n    blocks.9.attn.qkv.lora_A" in str(err.value)
    with pytest.raises(StateDictMismatchError, match="no LoRA layers"):
        load_lora_state_dict(tiny_model(extra_sensors=()).trunk, tensors)


@pytest.mark.parametrize("lora", [False, True], ids=["stem", "lora"])
def test_adapter_round_trip_onto_the_recorded_base(base_folder, tmp_path, lora):
    base = XStars.from_pretrained(base_folder)
    model = _adapted(base_folder, lora)
    path = tmp_path / "spot.safetensors"
    record = save_adapter(model, "spot5m", path)
    assert record.size == path.stat().st_size
    assert record.size * 5 < (base_folder / "model.safetensors").stat().st_size

    info = read_adapter_info(path, expected_sha256=record.sha256)
    config = json.loads((base_folder / "config.json").read_text())
    assert info.base_weights_sha256 == config["files"]["model.safetensors"]["sha256"] == trunk_sha256(base)
    assert (info.base_model, info.base_revision, info.sensor, info.patch_size) == (str(base_folder), None, "spot5m", 8)
    assert info.spec == SPOT and info.mode == ("lora" if lora else "stem")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert metadata["format"] == ADAPTER_FORMAT and json.loads(metadata["sensor_spec"])["gsd_m"] == 5.0
    assert {k for k in keys if k.startswith("stem.")} == {"stem.proj.weight", "stem.proj.bias"}
    assert {k for k in keys if k.startswith("lora.")} == {f"lora.{k}" for k in lora_state_dict(model.trunk)}
    if lora:
        assert json.loads(metadata["lora"]) == {"rank": 4, "alpha": 8.0, "targets": ["attn.qkv", "attn.proj"]}

    loaded = load_adapter(path, expected_sha256=record.sha256)
    assert torch.equal(_tokens(loaded, "spot5m"), _tokens(model, "spot5m"))
    # The base the adapter records is loaded as the class asked for.
    assert type(XStars.load_adapter(path, expected_sha256=record.sha256)) is XStars
    assert torch.equal(_tokens(loaded), _tokens(model))
    if not lora:
        assert torch.equal(_tokens(loaded), _tokens(base))
    assert loaded.lineage["base_model"] == str(base_folder)
    assert loaded.lineage["adapter"] == {"path": str(path), "sha256": record.sha256, "sensor": "spot5m"}
    # A given base is copied, not modified, and the loaded model can be saved as an adapter again.
    onto_given = load_adapter(path, base=base)
    assert "spot5m" not in base.sensors and lora_config(base.trunk) is None
    assert torch.equal(_tokens(onto_given, "spot5m"), _tokens(model, "spot5m"))
    again = save_adapter(loaded, "spot5m", tmp_path / "again.safetensors")
    assert read_adapter_info(tmp_path / "again.safetensors").tensors_sha256 == info.tensors_sha256
    assert again.size == record.size


def test_wrong_base_is_refused_naming_both_hashes(base_folder, tmp_path):
    path = tmp_path / "spot.safetensors"
    save_adapter(_adapted(base_folder, lora=False), "spot5m", path)
    torch.manual_seed(1)
    other = XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], **BASE)
    with pytest.raises(InvalidInputError) as err:
        load_adapter(path, base=other)
    message = str(err.value)
    assert read_adapter_info(path).base_weights_sha256 in message and trunk_sha256(other) in message
    assert err.value.field == "base"
    with pytest.raises(InvalidInputError, match="already has LoRA layers") as err:
        load_adapter(path, base=_adapted(base_folder, lora=True))
    assert err.value.field == "base"
    with pytest.raises(TypeError, match=r"\['cache_dir'\] only apply when the base is loaded here") as type_err:
        load_adapter(path, base=other, cache_dir=tmp_path)
    assert isinstance(type_err.value, InvalidTypeError) and type_err.value.field == "cache_dir"


def test_damaged_adapter_raises_checksum_error(base_folder, tmp_path):
    path = tmp_path / "spot.safetensors"
    record = save_adapter(_adapted(base_folder, lora=True), "spot5m", path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"expected {record.sha256}"):
        load_adapter(path, expected_sha256=record.sha256)
    with pytest.raises(ChecksumError, match="corrupted: its tensors hash to"):
        load_adapter(path)


def test_files_that_are_not_adapters_are_refused(base_folder, tmp_path):
    with pytest.raises(InvalidInputError, match="is not an X-STARS adapter: its safetensors metadata 'format' is 'pt'") as err:
        load_adapter(base_folder / "model.safetensors")
    assert err.value.field == "path"
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, {"x": torch.zeros(2)}, {"format": "xstars-adapter/9"})
    with pytest.raises(InvalidInputError, match="upgrade xstars-models") as err:
        load_adapter(plain)
    assert err.value.field == "path"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InvalidInputError, match="not a valid safetensors file") as err:
        load_adapter(junk)
    assert err.value.field == "path"


def test_malformed_adapter_metadata_names_the_key(base_folder, tmp_path):
    path = tmp_path / "spot.safetensors"
    save_adapter(_adapted(base_folder, lora=False), "spot5m", path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    spec = json.loads(metadata["sensor_spec"])
    spec["bands"][2]["std"] = 0
    cases = {
        "patch_size": ({"patch_size": "0"}, "patch_size must be a positive integer, got 0"),
        "mode": ({"mode": "full"}, r"mode must be one of \('stem', 'lora'\), got 'full'"),
        "sensor_spec.bands.2.std": ({"sensor_spec": json.dumps(spec)}, r"sensor_spec: Band 'red': std 0 must be > 0"),
    }
    for field, (change, message) in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            AdapterInfo.from_metadata({**metadata, **change}, str(path))
        assert err.value.field == field
    without = {k: v for k, v in metadata.items() if k != "sensor"}
    with pytest.raises(ConfigError, match="adapter metadata has no 'sensor'") as err:
        AdapterInfo.from_metadata(without, str(path))
    assert err.value.field == "sensor"


def test_save_adapter_refusals(base_folder, tmp_path):
    path = tmp_path / "a.safetensors"
    model = _adapted(base_folder, lora=True)
    with pytest.raises(InvalidOptionError, match="save_pretrained") as err:
        save_adapter(model, "spot5m", path, mode="full")
    assert err.value.field == "mode"
    with pytest.raises(InvalidOptionError, match="save with mode='lora'") as err:
        save_adapter(model, "spot5m", path, mode="stem")
    assert err.value.field == "mode"
    with pytest.raises(InvalidOptionError, match="primary sensor") as err:
        save_adapter(model, "sentinel2_rgb", path)
    assert err.value.field == "sensor"
    with pytest.raises(InvalidOptionError, match="^mode='lora' but the model's trunk has no LoRA layers") as err:
        save_adapter(_adapted(base_folder, lora=False), "spot5m", path, mode="lora")
    assert err.value.field == "mode"
    unnamed = tiny_model(extra_sensors=())
    unnamed.add_sensor(SPOT)
    with pytest.raises(InvalidInputError, match="does not say which base") as err:
        save_adapter(unnamed, "spot5m", path)
    assert err.value.field == "model"
    assert not path.exists()


def test_hub_base_named_with_a_ref_is_recorded_by_repo_and_commit(base_folder, tmp_path):
    model = _adapted(base_folder, lora=False)
    model.lineage = {"base_model": "org/base@main", "base_revision": "a" * 40}
    save_adapter(model, "spot5m", tmp_path / "a.safetensors")
    info = read_adapter_info(tmp_path / "a.safetensors")
    assert (info.base_model, info.base_revision) == ("org/base", "a" * 40)


@pytest.mark.parametrize("mode", ["stem", "lora"])
def test_adapt_output_saves_and_reloads_as_an_adapter(tmp_path, mode):
    folder = tmp_path / "base"
    tiny_model(extra_sensors=()).save_pretrained(folder)
    config = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=1, dino_out_dim=64, local_crops=2, checkpoint_every=2)
    adapted = adapt(
        XStars.from_pretrained(folder), get_sensor("aerial_rgb").with_gsd(5.0, name="aerial"), ToyPairs(8),
        mode=mode, config=config, out_dir=tmp_path / "run", device="cpu", progress=False, lora_rank=2,
    )
    record = save_adapter(adapted, "aerial", tmp_path / "aerial.safetensors")
    loaded = load_adapter(tmp_path / "aerial.safetensors", expected_sha256=record.sha256)
    images = ToyPairs(2).aerial.numpy()
    assert torch.equal(
        loaded.embed(images, "aerial", layout="CHW", progress=False),
        adapted.eval().embed(images, "aerial", layout="CHW", progress=False),
    )
