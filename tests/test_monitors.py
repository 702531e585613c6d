"""Collapse monitors: logged on every run, a collapsed run is reported, a healthy-looking one is
not; the anti-collapse losses (KoLeo, InfoNCE), the sensor-gap term and the cross-sensor DINO term
compute what they say."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import rasterio
import torch
from torch.utils.data import Dataset

from factories import tiny_model
from xstars_models.errors import InvalidInputError
from xstars_models.losses import DINOLoss, info_nce, koleo, sensor_gap
from xstars_models.samples import sample_path
from xstars_models.training import TrainConfig, pretrain
from xstars_models.training.monitors import CollapseWarning, cls_spread, collapse_verdict, effective_rank


class RealCrops(Dataset):
    """64 px crops of the bundled real Sentinel-2 samples (two 256 px scenes, 32 crops)."""

    def __init__(self) -> None:
        crops = []
        for name in ("sentinel2_rgb_coast", "sentinel2_rgb_inland"):
            with rasterio.open(sample_path(name)) as src:
                image = torch.from_numpy(src.read().astype(np.float32))
            crops += [image[:, r : r + 64, c : c + 64] for r in range(0, 256, 64) for c in range(0, 256, 64)]
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> dict:
        return {"images": {"sentinel2_rgb": self.crops[i]}}


def config(**overrides) -> TrainConfig:
    settings = dict(
        steps=4, batch_size=8, lr=1e-3, warmup_steps=1, dino_out_dim=64, local_crops=2, checkpoint_every=4,
        monitor_every=2, monitor_images=16, teacher_momentum=0.9, precision="fp32",
    )
    return TrainConfig(**{**settings, **overrides})


def run(tmp_path, **overrides):
    model = tiny_model(extra_sensors=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = pretrain(model, RealCrops(), config(**overrides), out_dir=tmp_path, device="cpu", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return trained, lines, [w for w in caught if issubclass(w.category, CollapseWarning)]


def test_short_run_on_real_imagery_logs_every_monitor(tmp_path):
    trained, lines, _ = run(tmp_path, contrast_weight=0.5, koleo_weight=0.1)
    ln_k = math.log(64)
    for line in lines:
        assert 0 < line["teacher_entropy"] <= ln_k + 1e-4
        assert 0 < line["teacher_marginal_entropy"] <= ln_k + 1e-4
        assert line["cls_spread"] >= 0
        assert line["contrast"] > 0 and "koleo" in line
    # The effective rank of the fixed batch: at the first step, every monitor_every steps, the last.
    assert [line["step"] for line in lines if "rank" in line] == [1, 2, 4]
    assert all(1 <= line["rank"] <= 16 for line in lines if "rank" in line)
    monitors = trained.training_record["monitors"]
    assert monitors["ln_k"] == pytest.approx(ln_k)
    assert monitors["rank"] == lines[-1]["rank"] and monitors["teacher_entropy"] == lines[-1]["teacher_entropy"]


def test_a_recipe_forced_to_collapse_is_reported(tmp_path):
    # A teacher as soft as the student at temperature 100 is uniform: DINO's "centring wins" collapse.
    trained, lines, caught = run(tmp_path, teacher_temp=100.0, warmup_teacher_temp=100.0, student_temp=100.0)
    assert lines[-1]["teacher_entropy"] > 0.99 * math.log(64)
    monitors = trained.training_record["monitors"]
    assert monitors["collapsed"] is True
    assert any("teacher is uniform" in reason for reason in monitors["reasons"])
    assert len(caught) == 1 and "COLLAPSED" in str(caught[0].message)


def test_the_verdict_passes_healthy_monitors_and_flags_each_collapse():
    ln_k = math.log(4096)
    healthy = {"teacher_entropy": 0.6 * ln_k, "teacher_marginal_entropy": 0.9 * ln_k, "cls_spread": 0.4, "rank": 40.0}
    assert collapse_verdict(healthy, ln_k)["collapsed"] is False
    for key, value in {"teacher_entropy": 0.99 * ln_k, "teacher_marginal_entropy": 0.05 * ln_k, "cls_spread": 0.01, "rank": 1.5}.items():
        verdict = collapse_verdict({**healthy, key: value}, ln_k)
        assert verdict["collapsed"] is True and len(verdict["reasons"]) == 1, key


def test_effective_rank_and_spread_measure_what_they_name():
    generator = torch.Generator().manual_seed(0)
    spread_out = torch.randn(512, 32, generator=generator)
    line = torch.randn(512, 1, generator=generator) * torch.randn(1, 32, generator=generator)
    assert effective_rank(spread_out) > 28  # close to D = 32 for isotropic Gaussian rows
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-4)
    assert cls_spread(spread_out) == pytest.approx(1.0, abs=0.1)
    assert cls_spread(torch.ones(8, 32) + 1e-9 * spread_out[:8]) < 1e-6
    assert math.isnan(effective_rank(torch.full((4, 4), float("nan"))))


def test_koleo_is_minus_the_mean_log_nearest_neighbour_distance():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    # Nearest neighbours on the unit circle: 0<->3 (distance sqrt(0.16 + 0.64)), 1<->3 (sqrt(0.36 +
    # 0.04)), 2<->1 (sqrt(2)).
    expected = -np.mean(np.log([math.sqrt(0.8), math.sqrt(0.4), math.sqrt(2.0), math.sqrt(0.4)]))
    assert float(koleo(points * 3.0)) == pytest.approx(expected, abs=1e-6)  # scale-free: rows are normalised
    with pytest.raises(InvalidInputError, match="B >= 2") as info:
        koleo(points[:1])
    assert info.value.field == "x"


def test_info_nce_matches_the_closed_form():
    batch = 4
    a = torch.eye(batch, 8)
    # Cosine 1 with one's own row, 0 with the others: CE = -log(e^10 / (e^10 + 3)) each way.
    expected = -math.log(math.exp(10) / (math.exp(10) + batch - 1))
    assert float(info_nce(a, a.clone(), temperature=0.1)) == pytest.approx(expected, rel=1e-3)  # float32
    with pytest.raises(InvalidInputError, match="one shape") as info:
        info_nce(a, a[:2])
    assert info.value.field == "b"


def test_cross_sensor_dino_term_compares_the_same_index():
    """With ``skip_same_view=False`` one teacher view and one student view give one term:
    the cross-entropy between teacher row b and student row b (two sensors' views of footprint b)."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    loss = DINOLoss(5, n_global=1, student_temp=0.1, teacher_temp=0.04, skip_same_view=False)
    p_t = (teacher / 0.04).softmax(-1)
    expected = -(p_t * (student / 0.1).log_softmax(-1)).sum(-1).mean()
    assert float(loss(student, teacher, 0)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(RuntimeError):  # DINO's own rule leaves no pair to compare
        DINOLoss(5, n_global=1)(student, teacher, 0)


def test_xstars_adapt_says_when_the_run_collapsed(tmp_path, capsys):
    from factories import HOMONIM_AERIAL, HOMONIM_S2, require_shared_data
    from xstars_models.cli import main

    require_shared_data()
    base = tiny_model(extra_sensors=()).save_pretrained(tmp_path / "base")
    config = tmp_path / "collapse.json"
    config.write_text(json.dumps({"teacher_temp": 100.0, "warmup_teacher_temp": 100.0, "student_temp": 100.0}))
    argv = [
        "adapt", str(base), "--sensor", "aerial_rgb", "--gsd", "5", "--name", "aerial",
        "--new", *map(str, HOMONIM_AERIAL), "--old", str(HOMONIM_S2), "--old-bands", "1", "2", "3",
        "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--device", "cpu", "--config", str(config),
        "--steps", "2", "--batch-size", "4", "--dino-out-dim", "64", "--local-crops", "2", "--warmup-steps", "1",
    ]
    with pytest.warns(CollapseWarning):
        assert main(argv) == 0
    err = capsys.readouterr().err
    assert "COLLAPSED: teacher entropy" in err and "is not a useful encoder" in err
    from xstars_models import XStars
    from xstars_models.publish.card import model_card

    saved = XStars.from_pretrained(tmp_path / "out")
    assert saved.training_record["monitors"]["collapsed"] is True
    card = model_card(saved.config, "org/collapsed")
    assert "| training |" in card and "COLLAPSED: teacher entropy" in card


def test_model_card_shows_each_stage_monitors():
    from xstars_models.publish.card import model_card

    model = tiny_model(extra_sensors=())
    healthy = collapse_verdict({"teacher_entropy": 3.0, "cls_spread": 0.5, "rank": 20.0}, math.log(4096))
    model.training_record = {"stage1": {"monitors": healthy}, "stage2": {"monitors": {**healthy, "rank": 1.2}}}
    model.training_record["stage2"]["monitors"] = collapse_verdict(model.training_record["stage2"]["monitors"], math.log(4096))
    card = model_card(model.config, "org/name")
    assert "| stage1 | 3.000 / 8.318 | 0.500 | 20.0 | no collapse |" in card
    assert "| stage2 | 3.000 / 8.318 | 0.500 | 1.2 | COLLAPSED: effective rank 1.20" in card


def test_data_named_for_other_sensors_is_a_typed_error(tmp_path):
    from xstars_models.errors import SensorMismatchError, XStarsError

    class Renamed(RealCrops):
        def __getitem__(self, i: int) -> dict:
            return {"images": {"sentinel2": self.crops[i]}}

    with pytest.raises(SensorMismatchError, match=r"has images for \['sentinel2'\] but the recipe needs \['sentinel2_rgb'\]") as err:
        pretrain(tiny_model(extra_sensors=()), Renamed(), config(), out_dir=tmp_path, device="cpu", progress=False)
    assert isinstance(err.value, XStarsError) and isinstance(err.value, ValueError)


def test_a_finished_run_resumed_reports_its_last_monitors(tmp_path):
    """Resuming a run at its last step runs nothing; its record still carries the final scalars
    and the verdict from metrics.jsonl (train_default resumes a finished stage 1 this way)."""
    first, lines, _ = run(tmp_path, contrast_weight=0.5)
    again = pretrain(tiny_model(extra_sensors=()), RealCrops(), config(contrast_weight=0.5), out_dir=tmp_path, resume=True, device="cpu", progress=False)
    expected = {k: v for k, v in lines[-1].items() if k != "time_s"}
    assert again.training_record["final"] == expected and again.training_record["resumed_from"] == 4
    assert again.training_record["monitors"] == first.training_record["monitors"]


def test_pretrain_contrasts_sensors_and_adapt_runs_cross_sensor_dino(tmp_path):
    """Two-sensor pretraining adds a CLS InfoNCE between the sensors (also with one global view,
    where there is no view pair); adapt's cross-sensor DINO term has its own centre, which moves."""
    from toy_data import ToyPairs
    from xstars_models import get_sensor
    from xstars_models.training import adapt

    settings = dict(batch_size=4, local_crops=1, contrast_weight=1.0, alpha=0.0, monitor_images=4)
    two = tiny_model(extra_sensors=("aerial",))
    pretrain(two, ToyPairs(8), config(**settings, global_crops=1), out_dir=tmp_path / "p", device="cpu", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < line["contrast"] < math.log(4) + 1.0 for line in lines)

    base = tiny_model(extra_sensors=())
    aerial = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    adapt(base, aerial, ToyPairs(8), mode="full", config=config(**settings, cross_sensor_dino=True), out_dir=tmp_path / "a", device="cpu", progress=False)
    from xstars_models.training.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "a")["modules"]
    assert state["dino.cross.center"].abs().sum() > 0 and not torch.allclose(state["dino.cross.center"], state["dino.aerial.center"])


def test_sensor_gap_is_the_distance_between_the_means_of_the_unit_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # unit rows (1, 0), (0, 1): mean (0.5, 0.5)
    b = torch.tensor([[2.0, 0.0], [5.0, 0.0]])  # unit rows both (1, 0)
    assert float(sensor_gap(a, b)) == pytest.approx(0.25 + 0.25)
    assert float(sensor_gap(a, a * 7.0)) == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert float(sensor_gap(b, -b)) == pytest.approx(4.0)  # the largest gap: opposite directions
    with pytest.raises(InvalidInputError, match="one shape") as info:
        sensor_gap(a, b[:1])
    assert info.value.field == "b"


def test_gap_term_is_logged_and_weighted_in_pretrain_and_adapt(tmp_path):
    """With gap_weight > 0 both recipes log the gap between the sensors' embeddings and add it to
    the loss with its weight; with 0 there is no such term."""
    from toy_data import ToyPairs
    from xstars_models import get_sensor
    from xstars_models.training import adapt

    settings = dict(batch_size=4, local_crops=1, contrast_weight=0.5, alpha=0.0, monitor_images=4, global_crops=1)
    pretrain(tiny_model(extra_sensors=("aerial",)), ToyPairs(8), config(**settings, gap_weight=3.0), out_dir=tmp_path / "p", device="cpu", progress=False)
    aerial = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    adapt(tiny_model(extra_sensors=()), aerial, ToyPairs(8), mode="full", config=config(**settings, gap_weight=3.0), out_dir=tmp_path / "a", device="cpu", progress=False)
    adapt(tiny_model(extra_sensors=()), aerial, ToyPairs(8), mode="full", config=config(**settings), out_dir=tmp_path / "none", device="cpu", progress=False)
    for run_dir in ("p", "a"):
        lines = [json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            assert 0 < line["gap"] <= 8.0  # two gaps (CLS, mean token) of at most 4 each
            assert line["loss"] == pytest.approx(line["dino"] + 0.5 * line["contrast"] + 3.0 * line["gap"], rel=1e-4)
    assert all("gap" not in json.loads(line) for line in (tmp_path / "none" / "metrics.jsonl").read_text().splitlines())
