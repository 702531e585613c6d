"""``xstars info`` shows metrics as aligned tables, and ``--json`` gives everything as JSON."""

from __future__ import annotations

import json

import pytest

from factories import tiny_model
from xstars_models.cli import main

METRICS = {
    "retrieval_r1": 0.5,
    "retrieval": {"pairs": 27, "rows": {"model (patch)": {"a->b r@1": 0.962962, "b->a r@1": 0.1111}, "pixels 8x8": {"a->b r@1": 1.0, "b->a r@1": 0.96}}},
    "landcover": [
        {"name": "model (cls)", "dims": 192, "knn acc": 0.8641509},
        {"name": "majority class", "dims": 0, "knn acc": 0.309},
    ],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = tiny_model()
    model.metrics = METRICS
    return model.save_pretrained(tmp_path_factory.mktemp("info") / "model")


def test_info_prints_metrics_as_aligned_tables(folder, capsys):
    assert main(["info", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("metrics: {") for line in lines), "raw JSON line"
    start = lines.index("  landcover:")
    header, rule, first, second = lines[start + 1 : start + 5]
    assert header.split() == ["name", "dims", "knn", "acc"] and set(rule.replace(" ", "")) == {"-"}
    assert first.split() == ["model", "(cls)", "192", "0.8642"] and second.split() == ["majority", "class", "0", "0.3090"]
    # Numbers right-aligned under their header: every column ends where its header ends.
    for label in ("dims", "knn acc"):
        end = header.index(label) + len(label)
        assert first[end - 1] != " " and second[end - 1] != " " and first[end:end + 1] in ("", " ")
    rows = lines.index("    rows:")
    table = lines[rows + 1 : rows + 5]
    assert table[2].split() == ["model", "(patch)", "0.9630", "0.1111"]
    assert len({len(line) for line in (table[0], table[2], table[3])}) == 1
    assert "    pairs: 27" in lines
    scalars = lines.index("metrics:")
    assert lines[scalars + 1].split() == ["metric", "value"] and lines[scalars + 3].split() == ["retrieval_r1", "0.5000"]


def test_info_json_is_the_whole_record(folder, capsys):
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metrics"] == METRICS
    assert info["sensors"]["aerial"]["patch_size"] == 16 and info["sensors"]["aerial"]["spec"]["gsd_m"] == 5.0
    assert (info["arch"], info["embed_dim"], info["depth"]) == ("vit_tiny_patch16_224", 32, 2)


def test_info_names_the_whitening(tmp_path, capsys):
    from toy_data import ToyPairs
    from xstars_models.training import fit_global_whitening

    model = tiny_model(extra_sensors=("aerial",))
    model.whitening = fit_global_whitening(model, ToyPairs(6), fit_on="six toy pairs", progress=False)
    folder = model.save_pretrained(tmp_path / "m")
    assert main(["info", str(folder)]) == 0
    assert "whitening (embed --whiten): cls, mean of sentinel2_rgb, aerial, shrinkage 0.01, fit on six toy pairs" in capsys.readouterr().out
    assert main(["info", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["whitening"]["fit_on"] == "six toy pairs"
