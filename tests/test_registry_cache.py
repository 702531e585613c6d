"""The registry reads its manifest files once and again only when ``XSTARS_MANIFEST`` or a file
changes; register_model takes effect at once; a registry entry whose arch or sensors disagree
with the model's config.json is refused, naming both."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from factories import registry_entry, tiny_model
from xstars_models import ManifestError, XStars, get_model_entry, list_models, register_model
from xstars_models import manifest as manifest_module
from xstars_models.manifest import MANIFEST_ENV

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def entry(arch: str = "vit_tiny_patch16_224") -> dict:
    return {
        "arch": arch,
        "sensors": ["sentinel2_rgb"],
        "source": {"repo_id": "org/model", "revision": COMMIT},
        "files": {"config.json": {"sha256": "a" * 64, "size": 10}},
    }


def write_manifest(path: Path, models: dict) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": models}))
    return path


@pytest.fixture()
def reads(monkeypatch) -> list[str]:
    """A clean registry whose manifest reads are recorded, one path per read."""
    monkeypatch.setattr(manifest_module, "_registered", {})
    monkeypatch.setattr(manifest_module, "_file_cache", None)
    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    seen: list[str] = []
    original = manifest_module.load_manifest

    def counting(path):
        seen.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(manifest_module, "load_manifest", counting)
    return seen


def test_manifests_are_parsed_once(tmp_path, monkeypatch, reads):
    extra = write_manifest(tmp_path / "extra.json", {"my-model": entry()})
    monkeypatch.setenv(MANIFEST_ENV, str(extra))
    for _ in range(3):
        assert "my-model" in list_models()
        assert get_model_entry("my-model").arch == "vit_tiny_patch16_224"
        assert manifest_module.is_registered("my-model")
    assert reads == ["weights_manifest.json", "extra.json"]


def test_a_changed_environment_variable_is_read_again(tmp_path, monkeypatch, reads):
    first = write_manifest(tmp_path / "first.json", {"first-model": entry()})
    second = write_manifest(tmp_path / "second.json", {"second-model": entry()})
    monkeypatch.setenv(MANIFEST_ENV, str(first))
    assert "first-model" in list_models()
    monkeypatch.setenv(MANIFEST_ENV, str(second))
    assert "second-model" in list_models() and "first-model" not in list_models()
    monkeypatch.delenv(MANIFEST_ENV)
    assert "second-model" not in list_models()
    assert reads == ["weights_manifest.json", "first.json", "weights_manifest.json", "second.json", "weights_manifest.json"]


def test_an_edited_manifest_file_is_read_again(tmp_path, monkeypatch, reads):
    path = write_manifest(tmp_path / "extra.json", {"my-model": entry()})
    monkeypatch.setenv(MANIFEST_ENV, str(path))
    assert get_model_entry("my-model").arch == "vit_tiny_patch16_224"
    stat = path.stat()
    # same size and the same modification time: only the content (and the change time) differs
    write_manifest(path, {"my-model": entry(arch="vit_tiny_patch16_384")})
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert get_model_entry("my-model").arch == "vit_tiny_patch16_384"
    # replaced atomically by another file (a new inode), again with the old size and times
    replacement = write_manifest(tmp_path / "new.json", {"my-model": entry(arch="vit_tiny_patch16_224")})
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)
    assert get_model_entry("my-model").arch == "vit_tiny_patch16_224"
    assert reads.count("extra.json") == 3


def test_a_manifest_that_disappears_is_an_error_not_a_stale_entry(tmp_path, monkeypatch, reads):
    path = write_manifest(tmp_path / "extra.json", {"my-model": entry()})
    monkeypatch.setenv(MANIFEST_ENV, str(path))
    assert "my-model" in list_models()
    path.unlink()
    with pytest.raises(ManifestError, match=r"extra.json does not exist"):
        list_models()


def test_register_model_takes_effect_without_reading_files_again(reads):
    assert "late-model" not in list_models()
    register_model("late-model", entry())
    assert get_model_entry("late-model").origin == "register_model()"
    assert "late-model" in list_models()
    assert reads == ["weights_manifest.json"]


@pytest.fixture()
def published(tmp_path, hub_server):
    """A registry entry for the tiny model committed to a fresh repo on the loopback Hub."""
    folder = tiny_model().save_pretrained(tmp_path / "model")
    repo_id = f"org/tiny-{uuid.uuid4().hex[:8]}"
    return registry_entry(folder, repo_id, hub_server.seed_repo(repo_id, folder))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"arch": "vit_small_patch16_224"},
         r"listed with arch 'vit_small_patch16_224' and sensors \['sentinel2_rgb', 'aerial', 'sentinel2'\], but its "
         r"bad-model/config.json has arch 'vit_tiny_patch16_224'"),
        ({"sensors": ["sentinel2_rgb", "sentinel2", "aerial"]},
         r"listed with arch 'vit_tiny_patch16_224' and sensors \['sentinel2_rgb', 'sentinel2', 'aerial'\], but its "
         r"bad-model/config.json has arch "
         r"'vit_tiny_patch16_224' and sensors \['sentinel2_rgb', 'aerial', 'sentinel2'\]"),
    ],
)
def test_entry_must_describe_its_config(published, hf_cache, reads, override, message):
    register_model("bad-model", {**published, **override})
    with pytest.raises(ManifestError, match=r"register_model\(\): model 'bad-model' is " + message) as info:
        XStars.from_pretrained("bad-model")
    assert info.value.field == next(iter(override))
    register_model("good-model", published)
    assert list(XStars.from_pretrained("good-model").sensors) == published["sensors"]
