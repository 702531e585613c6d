"""X-STARS encoders as TerraTorch backbones, run through the real TerraTorch registry, factory and
Lightning task (the ``terratorch`` extra, installed by ``make test``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

if importlib.util.find_spec("terratorch") is None:
    pytest.skip("needs the terratorch extra: pip install -e '.[terratorch]'", allow_module_level=True)

# The integration first: it imports TerraTorch without letting it change this process's matmul
# precision and warning filters (which every later test of the session would inherit).
from xstars_models.integrations import terratorch as xt  # noqa: E402

from terratorch.datasets.utils import HLSBands  # noqa: E402
from terratorch.models import EncoderDecoderFactory  # noqa: E402
from terratorch.registry import BACKBONE_REGISTRY  # noqa: E402
from terratorch.utils import InvalidModelError  # noqa: E402

from factories import rgb_images, tiny_model  # noqa: E402
from xstars_models import XStars, get_sensor  # noqa: E402
from xstars_models.errors import InvalidInputError, InvalidOptionError, SensorMismatchError  # noqa: E402

S2_HLS = [
    "COASTAL_AEROSOL", "BLUE", "GREEN", "RED", "RED_EDGE_1", "RED_EDGE_2", "RED_EDGE_3",
    "NIR_BROAD", "NIR_NARROW", "WATER_VAPOR", "CIRRUS", "SWIR_1", "SWIR_2",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A tiny model (sentinel2_rgb 10 m primary, aerial RGB 5 m, 13-band sentinel2) in a folder."""
    folder = tmp_path_factory.mktemp("tt") / "tiny_model"
    tiny_model().save_pretrained(folder)
    return str(folder)


def rgb_batch(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.from_numpy(rgb_images(n, size)).permute(0, 3, 1, 2).float()


def test_the_source_is_in_terratorchs_registry_and_builds_registry_ids():
    assert "xstars" in BACKBONE_REGISTRY.keys()
    assert "xstars_xstars-s2-aerial" in BACKBONE_REGISTRY
    assert "xstars_xstars-s2-aerial" in list(BACKBONE_REGISTRY)
    backbone = BACKBONE_REGISTRY.build("xstars_xstars-s2-aerial", model_bands=["RED", "GREEN", "BLUE"], sensor="sentinel2_rgb")
    assert isinstance(backbone, xt.XStarsBackbone)
    reference = XStars.from_pretrained("xstars-s2-aerial")
    assert torch.equal(backbone.model.trunk.cls_token, reference.trunk.cls_token)
    # Without the prefix the registry tries TerraTorch's and timm's sources first, then this one.
    plain = BACKBONE_REGISTRY.build("xstars-s2-aerial", model_bands=["RED", "GREEN", "BLUE"], sensor="aerial")
    assert plain.sensor == "aerial" and plain.patch_size == 16
    xt.register()  # a second registration is a no-op, not TerraTorch's "already exists"
    assert list(BACKBONE_REGISTRY.keys()).count("xstars") == 1


def test_a_name_that_is_no_xstars_model_is_terratorchs_invalid_model_error():
    with pytest.raises(InvalidModelError, match="not an X-STARS model"):
        BACKBONE_REGISTRY["xstars"].build("resnet50")
    with pytest.raises(Exception, match="could not be instantiated from any source"):
        BACKBONE_REGISTRY.build("no-such-backbone-anywhere")


def test_maps_are_the_models_own_block_outputs_in_the_order_asked(saved):
    model = XStars.from_pretrained(saved)
    images = rgb_batch()
    backbone = BACKBONE_REGISTRY.build(f"xstars_{saved}", model_bands=["RED", "GREEN", "BLUE"], sensor="sentinel2_rgb", out_indices=[1, 0])
    maps = backbone(images)
    expected = model.embed(images, "sentinel2_rgb", output="map", layers=[0, 1], progress=False, precision="fp32")
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 8)] * 2
    torch.testing.assert_close(maps[0], expected[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maps[1], expected[0], rtol=1e-4, atol=1e-5)
    assert backbone.out_channels == [32, 32]


def test_channels_named_in_another_order_are_reordered(saved):
    images = rgb_batch()
    rgb = BACKBONE_REGISTRY.build(f"xstars_{saved}", model_bands=["RED", "GREEN", "BLUE"], sensor="sentinel2_rgb")
    bgr = BACKBONE_REGISTRY.build(f"xstars_{saved}", model_bands=[HLSBands.BLUE, "green", "B04"], sensor="sentinel2_rgb")
    assert bgr.band_names == ("blue", "green", "red")
    for a, b in zip(rgb(images), bgr(images.flip(1))):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(rgb(images)[-1], rgb(images.flip(1))[-1])


def test_terratorch_band_names_pick_the_one_sensor_with_exactly_those_bands(saved):
    model = XStars.from_pretrained(saved)
    sensor, order = xt.select_sensor(model, S2_HLS)
    assert sensor == "sentinel2" and order == list(range(13))
    assert [xt.TERRATORCH_BAND_NAMES[name] for name in S2_HLS] == list(get_sensor("sentinel2").band_names)
    sensor, order = xt.select_sensor(model, S2_HLS[::-1])
    assert sensor == "sentinel2" and order == list(range(12, -1, -1))
    backbone = BACKBONE_REGISTRY.build(f"xstars_{saved}", model_bands=S2_HLS)
    assert backbone.sensor == "sentinel2" and backbone.patch_size == 8


def test_bands_of_several_sensors_need_sensor_and_never_guess(saved):
    several = r"fit several sensors: sentinel2_rgb \(10 m GSD\); aerial \(5 m GSD\)\. Pass sensor="
    with pytest.raises(InvalidOptionError, match=several) as info:
        BACKBONE_REGISTRY.build(f"xstars_{saved}", model_bands=["RED", "GREEN", "BLUE"])
    assert info.value.field == "sensor"
    neither = r"Name the input bands \(model_bands=\[\.\.\.\]\) or the stem \(sensor=\.\.\.\)"
    with pytest.raises(InvalidOptionError, match=neither) as info:
        BACKBONE_REGISTRY.build(f"xstars_{saved}")
    assert info.value.field == "model_bands"


def test_bands_that_fit_no_sensor_are_refused_naming_what_each_needs(saved):
    with pytest.raises(SensorMismatchError, match=r"match no sensor.*sentinel2_rgb \(10 m\): \['red', 'green', 'blue'\]") as info:
        BACKBONE_REGISTRY.build(f"xstars_{saved}", model_bands=["RED", "GREEN", "NIR_NARROW"])
    assert info.value.field == "model_bands"
    not_aerial = r"not the bands of sensor 'aerial', which needs exactly \['red', 'green', 'blue'\]"
    with pytest.raises(SensorMismatchError, match=not_aerial) as info:
        BACKBONE_REGISTRY.build(f"xstars_{saved}", model_bands=["RED", "GREEN"], sensor="aerial")
    assert info.value.field == "model_bands"
    with pytest.raises(InvalidOptionError, match="model_bands entry 3 is not a band name") as info:
        BACKBONE_REGISTRY.build(f"xstars_{saved}", model_bands=["RED", "GREEN", 3], sensor="aerial")
    assert info.value.field == "model_bands"
    with pytest.raises(ValueError, match="no stem for sensor 'landsat8'"):
        BACKBONE_REGISTRY.build(f"xstars_{saved}", sensor="landsat8")


def test_bad_arguments_and_inputs_are_refused_with_the_fix(saved):
    name = f"xstars_{saved}"
    with pytest.raises(InvalidOptionError, match=r"out_indices \[2\] must be .* in -2\.\.1 \(the trunk has 2 blocks\)") as info:
        BACKBONE_REGISTRY.build(name, sensor="aerial", out_indices=[2])
    assert info.value.field == "out_indices"
    with pytest.raises(InvalidOptionError, match=r"got also \['img_size'\]") as info:
        BACKBONE_REGISTRY.build(name, sensor="aerial", img_size=224)
    assert info.value.field == "img_size"
    with pytest.raises(InvalidOptionError, match=r"keyword arguments only, got positional \(1,\)") as info:
        BACKBONE_REGISTRY.build(name, 1, sensor="aerial")
    assert info.value.field == "args"
    backbone = BACKBONE_REGISTRY.build(name, sensor="aerial")
    with pytest.raises(InvalidOptionError, match=r"order must be a permutation of 0\.\.2 for sensor 'aerial'") as info:
        xt.XStarsBackbone(backbone.model, "aerial", order=[0, 0, 1])
    assert info.value.field == "order"
    shape = r"expects B x 3 x H x W images with bands \['red', 'green', 'blue'\], got shape \(2, 4, 64, 64\)"
    with pytest.raises(InvalidInputError, match=shape) as info:
        backbone(torch.zeros(2, 4, 64, 64))
    assert info.value.field == "x"
    with pytest.raises(InvalidInputError, match="60 x 64 px are not a whole number of 16 px patches") as info:
        backbone(torch.zeros(2, 3, 60, 64))
    assert info.value.field == "x"


def test_pretrained_false_is_the_same_configuration_with_fresh_weights(saved):
    pretrained = BACKBONE_REGISTRY.build(f"xstars_{saved}", sensor="sentinel2_rgb")
    random = BACKBONE_REGISTRY.build(f"xstars_{saved}", sensor="sentinel2_rgb", pretrained=False)
    assert random.model.config.sensors == pretrained.model.config.sensors
    assert not torch.equal(random.model.trunk.blocks[0].attn.qkv.weight, pretrained.model.trunk.blocks[0].attn.qkv.weight)


def test_factory_builds_classification_and_segmentation_models_that_fine_tune_the_stem(saved):
    factory = EncoderDecoderFactory()
    images = rgb_batch(2, 64)
    classifier = factory.build_model(
        "classification", backbone=f"xstars_{saved}", backbone_model_bands=["RED", "GREEN", "BLUE"],
        backbone_sensor="sentinel2_rgb", decoder="IdentityDecoder", num_classes=5, head_linear_after_pool=True,
    )
    assert classifier(images).output.shape == (2, 5)
    # Four maps of the aerial stem (16 px patches: 128 px -> 8 x 8) feed a pyramid neck and UPerNet.
    segmenter = factory.build_model(
        "segmentation", backbone=f"xstars_{saved}", backbone_model_bands=["RED", "GREEN", "BLUE"], backbone_sensor="aerial",
        backbone_out_indices=[0, 1, 1, 1], necks=[{"name": "LearnedInterpolateToPyramidal"}],
        decoder="UperNetDecoder", decoder_channels=16, num_classes=3,
    )
    out = segmenter(rgb_batch(2, 128)).output
    assert out.shape == (2, 3, 128, 128)
    out.square().mean().backward()
    stem = segmenter.encoder.model.stems["aerial"].proj.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert segmenter.encoder.model.trunk.patch_embed.proj.weight.grad is None  # the primary stem took no part


def test_a_classification_task_with_a_frozen_backbone_trains_only_the_head(saved):
    import lightning.pytorch as pl
    from terratorch.tasks import ClassificationTask
    from torch.utils.data import DataLoader, Dataset

    class Chips(Dataset):
        def __init__(self) -> None:
            self.x, self.y = rgb_batch(8, 64), torch.arange(8) % 2

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": self.x[i], "label": self.y[i]}

    pl.seed_everything(0, verbose=False)
    task = ClassificationTask(
        model_factory="EncoderDecoderFactory",
        model_args=dict(
            backbone=f"xstars_{saved}", backbone_model_bands=["RED", "GREEN", "BLUE"], backbone_sensor="sentinel2_rgb",
            backbone_out_indices=[-1], decoder="IdentityDecoder", num_classes=2, head_linear_after_pool=True,
        ),
        freeze_backbone=True, lr=1e-2,
    )
    encoder_before = {k: v.clone() for k, v in task.model.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in task.model.head.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, train_dataloaders=DataLoader(Chips(), batch_size=4))
    assert all(torch.equal(v, encoder_before[k]) for k, v in task.model.encoder.state_dict().items())
    assert any(not torch.equal(v, head_before[k]) for k, v in task.model.head.state_dict().items())
    assert np.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_importing_the_integration_leaves_the_process_numerics_and_warnings_as_they_were():
    # A fresh interpreter: in this one TerraTorch is already imported.
    script = (
        "import warnings, torch, xstars_models\n"
        "filters, precision = list(warnings.filters), torch.get_float32_matmul_precision()\n"
        "import xstars_models.integrations.terratorch, terratorch.tasks\n"
        "assert 'terratorch.models.backbones.clay_v15.model' in __import__('sys').modules\n"
        "print(torch.get_float32_matmul_precision() == precision, list(warnings.filters) == filters)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["True", "True"]
    assert torch.get_float32_matmul_precision() == "highest"
