"""TrainConfig: settings grouped as DINOv2 groups its config, configs written before the grouping
(flat names) still load into the right groups, each recipe refuses by name a setting it would
ignore, and each range check applies to the settings it is about."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import xstars_models
from factories import tiny_model
from toy_data import ToyPairs
from xstars_models.errors import ConfigError
from xstars_models.training import CropsConfig, MSADConfig, OptimConfig, TrainConfig, pretrain
from xstars_models.training.checkpoint import RESUMABLE_CHANGES
from xstars_models.training.config import FLAT_NAMES

BUNDLED_CONFIG = Path(xstars_models.__file__).parent / "weights" / "xstars-s2-aerial" / "config.json"


def test_settings_are_grouped_and_the_flat_keywords_land_in_their_groups():
    nested = TrainConfig(steps=20, optim=OptimConfig(lr=2e-4, warmup_steps=5), msad=MSADConfig(alpha=1.0))
    flat = TrainConfig(steps=20, lr=2e-4, warmup_steps=5, alpha=1.0)
    assert nested == flat
    assert flat.optim.lr == 2e-4 and flat.optim.warmup_steps == 5 and flat.msad.alpha == 1.0
    assert flat.optim.min_lr == OptimConfig().min_lr and flat.crops == CropsConfig()  # untouched groups: defaults
    saved = flat.to_dict()
    assert saved["optim"]["lr"] == 2e-4 and saved["msad"] == {"alpha": 1.0, "share_view": True} and saved["steps"] == 20
    assert flat.dotted()["optim.lr"] == 2e-4 and set(flat.dotted()) == set(FLAT_NAMES.values())


def test_a_setting_given_twice_or_unknown_is_refused_by_name():
    with pytest.raises(ConfigError, match="both msad= and alpha=") as info:
        TrainConfig(msad=MSADConfig(), alpha=1.0)
    assert info.value.field == "msad.alpha"
    with pytest.raises(ConfigError, match="unknown setting 'alhpa'") as info:
        TrainConfig(alhpa=1.0)
    assert info.value.field == "alhpa"
    with pytest.raises(ConfigError, match="TrainConfig.msad must be a MSADConfig, got OptimConfig") as info:
        TrainConfig(msad=OptimConfig())  # type: ignore[arg-type]
    assert info.value.field == "msad"


def test_the_bundled_models_flat_settings_load_into_their_groups():
    """The bundled model's record holds each stage's settings as written before the grouping
    (flat names, and without the settings added since): they load into the groups, and the
    settings added since take their defaults."""
    stages = json.loads(BUNDLED_CONFIG.read_text())["training"]
    stage1, stage2 = stages["stage1"]["settings"], stages["stage2"]["settings"]
    assert "lr" in stage1 and "optim" not in stage1  # really the flat format
    config = TrainConfig.from_dict(stage1, source="stage1")
    assert config.steps == 600 and config.checkpoint_every == 50
    assert config.optim.lr == 0.000125 and config.optim.warmup_steps == 50 and config.optim.weight_decay == 0.04
    assert config.dino.teacher_momentum == 0.99 and config.dino.out_dim == 4096 and config.dino.cross_sensor is False
    assert config.contrast.weight == 1.0 and config.msad.alpha == 0.1 and config.msad.share_view is True
    assert config.crops.color_jitter == 0.1 and config.crops.grey_p == 0.0 and config.crops.global_scale == (0.4, 1.0)
    assert config.crops.n_global == 2 and config.crops.n_local == 4
    assert config.ibot.weight == 0.0 and config.anchor.weight == 0.0 and config.crops.native is False  # added since
    dotted = config.dotted()
    assert all(dotted[FLAT_NAMES[name]] == (tuple(v) if isinstance(v, list) else v) for name, v in stage1.items())
    assert TrainConfig.from_dict(stage2).msad.alpha == 1.0 and TrainConfig.from_dict(stage2).optim.lr == 0.0002


def test_from_dict_takes_nested_dotted_and_flat_keys_and_refuses_one_setting_twice():
    config = TrainConfig.from_dict({"optim": {"lr": 0.01}, "msad.alpha": 2, "grey_p": 0.5, "steps": 3})
    assert (config.optim.lr, config.msad.alpha, config.crops.grey_p, config.steps) == (0.01, 2.0, 0.5, 3)
    with pytest.raises(ConfigError, match="optim.lr is given twice") as info:
        TrainConfig.from_dict({"optim": {"lr": 0.01}, "lr": 0.02})
    assert info.value.field == "optim.lr"
    with pytest.raises(ConfigError, match="expected a JSON object of optim settings") as info:
        TrainConfig.from_dict({"optim": 0.01})
    assert info.value.field == "optim"
    with pytest.raises(ConfigError, match=r"field 'crops.n_global': expected a whole number >= 1, got 0") as info:
        TrainConfig.from_dict({"crops": {"n_global": 0}}, source="run.json")
    assert info.value.field == "crops.n_global"


def test_a_config_from_before_precision_maps_amp_to_precision():
    assert TrainConfig.from_dict({"amp": True}).precision == "bf16"
    assert TrainConfig.from_dict({"amp": None}).precision == "auto"
    assert "amp" not in RESUMABLE_CHANGES and RESUMABLE_CHANGES <= set(TrainConfig.defaults())


def test_only_the_crop_scales_are_checked_as_area_fractions():
    assert TrainConfig(global_scale=(0.5, 1.0)).crops.global_scale == (0.5, 1.0)  # a whole image is an area fraction
    with pytest.raises(ConfigError) as info:
        TrainConfig(mask_ratio=(0.2, 1.0))  # but masking every patch leaves nothing to predict from
    assert info.value.field == "ibot.mask_ratio" and "area" not in str(info.value) and "patches" in str(info.value)
    with pytest.raises(ConfigError, match="area fractions") as info:
        TrainConfig(local_scale=(0.3, 0.2))
    assert info.value.field == "crops.local_scale"


@pytest.mark.parametrize(("settings", "sensors", "field", "shown"), [
    (dict(cross_sensor_dino=True), 2, "dino.cross_sensor", "dino.cross_sensor=True is a setting of adapt"),
    (dict(alpha=1.0), 1, "msad.alpha", "msad.alpha=1.0 acts between two sensors"),
    (dict(share_msad_view=False), 1, "msad.share_view", "msad.share_view=False acts between two sensors"),
    (dict(gap_weight=1.0), 1, "contrast.gap_weight", "Set it to 0.0, or pretrain a model with several sensors."),
    (dict(contrast_weight=1.0, global_crops=1), 1, "contrast.weight", "with crops.n_global=1 on a model with one sensor"),
])
def test_pretrain_refuses_a_setting_it_would_ignore(settings, sensors, field, shown):
    config = TrainConfig(**settings)
    with pytest.raises(ConfigError) as info:
        config.check_recipe("pretrain", sensors)
    assert info.value.field == field and "pretrain" in str(info.value) and shown in str(info.value)


def test_what_a_recipe_uses_or_leaves_at_its_default_is_accepted():
    TrainConfig().check_recipe("pretrain", 1)  # MSAD's default weight on one sensor: no choice made
    TrainConfig(alpha=0.0, contrast_weight=1.0).check_recipe("pretrain", 1)
    TrainConfig(alpha=1.0, gap_weight=1.0, contrast_weight=1.0, global_crops=1, anchor_weight=1.0).check_recipe("pretrain", 2)
    TrainConfig(cross_sensor_dino=True, gap_weight=1.0, global_crops=1, contrast_weight=1.0).check_recipe("adapt", 2)


def test_pretrain_refuses_the_cross_sensor_term_before_training(tmp_path):
    with pytest.raises(ConfigError, match="dino.cross_sensor=True is a setting of adapt") as info:
        pretrain(tiny_model(extra_sensors=("aerial",)), ToyPairs(4), TrainConfig(cross_sensor_dino=True),
                 out_dir=tmp_path / "run", device="cpu", progress=False)
    assert info.value.field == "dino.cross_sensor" and not (tmp_path / "run").exists()
