"""The model registry: manifest validation, extra manifests, register_model, close matches, and
that the wheel ships the manifest."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xstars_models import ManifestError, ModelNotFoundError, XStars, get_model_entry, list_models, register_model
from xstars_models import manifest as manifest_module
from xstars_models.manifest import MANIFEST_ENV, load_manifest, packaged_manifest_path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHA = "a" * 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def entry(**overrides):
    base = {
        "arch": "vit_tiny_patch16_224",
        "sensors": ["sentinel2_rgb", "aerial"],
        "source": {"repo_id": "org/model", "revision": COMMIT},
        "files": {"config.json": {"sha256": SHA, "size": 10}, "model.safetensors": {"sha256": SHA, "size": 20}},
        "license": "MIT",
    }
    base.update(overrides)
    return base


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.setattr(manifest_module, "_registered", {})
    monkeypatch.delenv(MANIFEST_ENV, raising=False)


def write_manifest(path: Path, models: dict) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": models}))
    return path


def test_packaged_manifest_is_valid_and_listed():
    entries = load_manifest(packaged_manifest_path())
    assert list_models() == {mid: e.sensors for mid, e in sorted(entries.items())}


def test_extra_manifest_from_environment(tmp_path, monkeypatch):
    extra = write_manifest(tmp_path / "extra.json", {"my-model": entry()})
    monkeypatch.setenv(MANIFEST_ENV, str(extra))
    assert list_models()["my-model"] == ("sentinel2_rgb", "aerial")
    assert list_models(sensor="aerial")["my-model"] == ("sentinel2_rgb", "aerial")
    assert all("aerial" in sensors for sensors in list_models(sensor="aerial").values())
    assert list_models(sensor="landsat8") == {}
    found = get_model_entry("my-model")
    assert found.repo_id == "org/model" and found.revision == COMMIT and found.origin == str(extra)


def test_register_model_and_conflicts():
    registered = register_model("my-model", entry())
    assert get_model_entry("my-model") == registered
    register_model("my-model", entry())  # same entry again is fine
    with pytest.raises(ManifestError, match=r"already registered \(from register_model\(\)\); pass overwrite=True\.") as info:
        register_model("my-model", entry(license="CC-BY-4.0"))
    assert info.value.field == "model_id"
    assert register_model("my-model", entry(license="CC-BY-4.0"), overwrite=True).license == "CC-BY-4.0"
    assert register_model("other", registered).arch == "vit_tiny_patch16_224"


@pytest.mark.parametrize(
    "bad, field, message",
    [
        ({"source": {"repo_id": "org/model", "revision": "main"}}, "source.revision", r"revision 'main' must be a full 40-hex commit"),
        ({"source": {"repo_id": "no-slash", "revision": COMMIT}}, "source.repo_id", r"repo_id 'no-slash' is not 'org/name'"),
        ({"source": {"bundled": "../outside"}}, "source.bundled", r"must be relative to the package folder"),
        ({"source": {}}, "source", r"'source' must be"),
        ({"files": {"model.safetensors": {"sha256": SHA, "size": 1}}}, "files", r"'config.json' included"),
        ({"files": {"config.json": {"sha256": "xyz", "size": 1}}}, "files.config.json.sha256", r"file 'config.json': sha256 must be 64"),
        ({"files": {"config.json": {"sha256": SHA, "size": -1}}}, "files.config.json.size", r"size must be a non-negative"),
        ({"files": {"config.json": {"sha256": SHA}}}, "files.config.json.size", r"file 'config.json': no 'size' recorded"),
        ({"files": {"config.json": [SHA, 1]}}, "files.config.json", r"file 'config.json': expected \{'sha256'"),
        ({"sensors": []}, "sensors", r"'sensors' must be a non-empty list"),
        ({"arch": ""}, "arch", r"'arch' must name"),
        ({"weights": "x"}, "weights", r"unknown fields \['weights'\]"),
    ],
)
def test_malformed_entries_name_the_field(tmp_path, bad, field, message):
    path = write_manifest(tmp_path / "m.json", {"my-model": entry(**bad)})
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(path)
    assert err.value.field == field
    assert str(path) in str(err.value) and "'my-model'" in str(err.value)


def test_malformed_manifest_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(ManifestError, match=r"Manifest .*bad\.json: not valid JSON"):
        load_manifest(bad_json)
    (tmp_path / "v2.json").write_text(json.dumps({"format_version": 2, "models": {}}))
    with pytest.raises(ManifestError, match="format_version 1") as info:
        load_manifest(tmp_path / "v2.json")
    assert info.value.field == "format_version"
    with pytest.raises(ManifestError, match=r"absent\.json does not exist"):
        load_manifest(tmp_path / "absent.json")
    with pytest.raises(ManifestError, match="ids use lowercase") as info:
        load_manifest(write_manifest(tmp_path / "id.json", {"My Model": entry()}))
    assert info.value.field == "model_id"


def test_conflicting_extra_manifest_is_an_error(tmp_path, monkeypatch):
    a = write_manifest(tmp_path / "a.json", {"my-model": entry()})
    b = write_manifest(tmp_path / "b.json", {"my-model": entry(license="other")})
    monkeypatch.setenv(MANIFEST_ENV, f"{a}:{b}")
    with pytest.raises(ManifestError, match="redefines model 'my-model'") as info:
        list_models()
    assert info.value.field == "model_id"


def test_unknown_id_lists_close_matches():
    register_model("xstars-s2-aerial-test", entry())
    with pytest.raises(ModelNotFoundError, match=r"Unknown model 'xstars-s2-aerail-test'\. Did you mean \['xstars-s2-aerial-test'"):
        XStars.from_pretrained("xstars-s2-aerail-test")


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        XStars.from_pretrained(tmp_path)


def test_wheel_ships_the_manifest_weights_and_samples(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("xstars_models-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = json.loads(archive.read("xstars_models/weights_manifest.json"))
        names = set(archive.namelist())
        for model_id, model in shipped["models"].items():
            bundled = model["source"].get("bundled")
            if bundled is not None:
                for file_name, record in model["files"].items():
                    assert len(archive.read(f"xstars_models/{bundled}/{file_name}")) == record["size"], (model_id, file_name)
    assert shipped == json.loads((REPO_ROOT / "weights_manifest.json").read_text())
    assert "xstars-s2-aerial" in shipped["models"]
    assert {"xstars_models/samples/sentinel2_rgb_coast.tif", "xstars_models/samples/SOURCES.md"} <= names
