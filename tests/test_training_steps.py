"""One step of each recipe, run alone on a tiny model: the loss is finite, and an optimiser step
on it moves exactly the parameters the recipe trains (the student, the loss heads), never the
EMA teacher, a frozen reference or what the adapt mode freezes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import default_collate

from factories import tiny_model
from toy_data import ToyPairs
from xstars_models import get_sensor
from xstars_models.errors import InvalidOptionError
from xstars_models.training import TrainConfig
from xstars_models.training.steps import AdaptStep, PretrainStep, RecipeStep

CONFIG = dict(batch_size=4, dino_out_dim=64, local_crops=2, contrast_weight=0.5, alpha=1.0, precision="fp32")
CPU = torch.device("cpu")


def one_step(recipe: RecipeStep, pairs: ToyPairs) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """The loss and scalars of ``recipe``'s step 0 on the first 4 pairs, and every tensor of its
    modules after one SGD step on that loss (``before`` taken by the caller)."""
    views = recipe.views(pairs)
    batch = default_collate([views[i, 0] for i in range(4)])
    loss, scalars = recipe.step(batch, 0)
    trained = [p for p in recipe.modules.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, scalars, {k: v.detach().clone() for k, v in recipe.modules.state_dict().items()}


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> list[bool]:
    return [not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix) and before[k].is_floating_point()]


def test_pretrain_step_trains_the_student_and_the_msad_heads_not_the_teacher():
    torch.manual_seed(0)
    recipe = PretrainStep(tiny_model(extra_sensors=("aerial",)), TrainConfig(**CONFIG, anchor_weight=1.0), CPU)
    before = {k: v.detach().clone() for k, v in recipe.modules.state_dict().items()}
    anchor = {k: v.clone() for k, v in recipe.anchor.state_dict().items()}
    loss, scalars, after = one_step(recipe, ToyPairs(4))
    assert math.isfinite(float(loss.detach())) and scalars["dino"] > 0 and scalars["msad"] > 0 and scalars["contrast"] > 0
    assert "anchor" in scalars and set(scalars) >= {"teacher_entropy", "cls_spread"}
    assert any(moved(before, after, "student.encoder.trunk.blocks"))
    assert any(moved(before, after, "student.encoder.stems.aerial")) and any(moved(before, after, "student.head.mlp"))
    assert all(moved(before, after, "msad.sensor_heads.aerial.proj")) and any(moved(before, after, "msad.shared"))
    assert not any(moved(before, after, "teacher.")), "the teacher follows by EMA, never by gradient"
    # The DINO head's prototypes stay unit vectors: their weight-norm magnitude is frozen.
    assert not any(moved(before, after, "student.head.last_layer.parametrizations.weight.original0"))
    assert all(torch.equal(v, anchor[k]) for k, v in recipe.anchor.state_dict().items())


def test_adapt_step_in_stem_mode_trains_the_new_stem_against_a_frozen_reference():
    torch.manual_seed(0)
    base = tiny_model(extra_sensors=())
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    config = TrainConfig(**CONFIG, cross_sensor_dino=True, gap_weight=1.0, share_msad_view=False)
    recipe = AdaptStep(base, new, None, "stem", config, CPU)
    assert (recipe.old, recipe.pair_forward) == ("sentinel2_rgb", True)
    before = {k: v.detach().clone() for k, v in recipe.modules.state_dict().items()}
    loss, scalars, after = one_step(recipe, ToyPairs(4))
    assert math.isfinite(float(loss.detach())) and scalars["msad"] > 0 and scalars["gap"] >= 0 and scalars["contrast"] > 0
    assert all(moved(before, after, "student.encoder.stems.aerial"))
    assert not any(moved(before, after, "student.encoder.trunk")), "stem mode freezes the trunk"
    assert not any(moved(before, after, "student.encoder.stems.sentinel2_rgb")), "the old sensor's stem never trains"
    assert any(moved(before, after, "msad.sensor_heads.sentinel2_rgb")) and any(moved(before, after, "student.head"))
    assert not any(moved(before, after, "teacher."))
    assert all(moved(before, after, "dino.")), "each DINO centre (new sensor, across sensors) follows its teacher outputs"
    assert all(torch.equal(v, base_state[k]) for k, v in recipe.frozen.state_dict().items())
    assert all(torch.equal(v, base_state[k]) for k, v in base.state_dict().items()), "the base model was modified"


def test_adapt_step_refuses_a_mode_and_a_sensor_name_it_cannot_train():
    new = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    with pytest.raises(InvalidOptionError, match="mode must be one of") as info:
        AdaptStep(tiny_model(extra_sensors=()), new, None, "trunk", TrainConfig(), CPU)
    assert info.value.field == "mode"
    with pytest.raises(InvalidOptionError, match="already has a sensor named 'sentinel2_rgb'") as info:
        AdaptStep(tiny_model(extra_sensors=()), get_sensor("sentinel2_rgb"), None, "stem", TrainConfig(), CPU)
    assert info.value.field == "new_sensor"
