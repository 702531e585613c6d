"""from_pretrained through the real huggingface_hub client against the loopback Hub server:
Hub repo ids, registry ids pinned to a commit, zero-request cached loads, offline behaviour, and
sha256 checks of downloaded files."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from factories import registry_entry, rgb_images, tiny_model
from xstars_models import ChecksumError, ModelNotFoundError, OfflineFilesMissingError, XStars, register_model
from xstars_models import manifest as manifest_module
from xstars_models.errors import InvalidOptionError
from xstars_models.hub import HubOptions, resolve_model


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.setattr(manifest_module, "_registered", {})


def downloads(hub_server):
    return [r for r in hub_server.requests if "/resolve/" in r[1] or r[1].startswith("/api/models")]


def test_hub_repo_round_trip(published, hf_cache, hub_server):
    model, _, repo_id, commit = published
    loaded = XStars.from_pretrained(repo_id)
    x = rgb_images(2, 128)
    assert torch.equal(loaded.embed(x, "aerial", output="map"), model.embed(x, "aerial", output="map"))
    assert loaded.revision == commit
    assert downloads(hub_server), "the client never talked to the server"


def test_pinned_revision_cached_makes_no_request(published, hf_cache, hub_server):
    _, _, repo_id, commit = published
    XStars.from_pretrained(f"{repo_id}@{commit}")
    hub_server.clear_log()
    XStars.from_pretrained(repo_id, revision=commit)
    assert hub_server.requests == []


def test_registry_id_downloads_then_loads_with_zero_requests(published, hf_cache, hub_server):
    model, folder, repo_id, commit = published
    register_model("tiny-test", registry_entry(folder, repo_id, commit))
    first = XStars.from_pretrained("tiny-test")
    assert downloads(hub_server)
    hub_server.clear_log()
    second = XStars.from_pretrained("tiny-test")
    assert hub_server.requests == []
    x = rgb_images(1)
    assert torch.equal(first.embed(x, "sentinel2_rgb"), second.embed(x, "sentinel2_rgb"))
    assert torch.equal(second.embed(x, "sentinel2_rgb"), model.embed(x, "sentinel2_rgb"))


def test_offline_load_from_cache(published, hf_cache, hub_server, monkeypatch):
    _, folder, repo_id, commit = published
    register_model("tiny-offline", registry_entry(folder, repo_id, commit))
    XStars.from_pretrained("tiny-offline")
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_server.clear_log()
    XStars.from_pretrained("tiny-offline")
    XStars.from_pretrained(repo_id, revision=commit, local_files_only=True)
    assert hub_server.requests == []


def test_missing_files_offline_are_named(published, hf_cache, hub_server, hf_offline):
    _, folder, repo_id, commit = published
    register_model("tiny-missing", registry_entry(folder, repo_id, commit))
    with pytest.raises(OfflineFilesMissingError) as err:
        XStars.from_pretrained("tiny-missing")
    message = str(err.value)
    for name in ("config.json", "model.safetensors", "stem-aerial.safetensors"):
        assert name in message
    assert "xstars download tiny-missing" in message
    assert hub_server.requests == []


def test_local_files_only_without_cache(published, hf_cache, hub_server):
    _, _, repo_id, commit = published
    with pytest.raises(OfflineFilesMissingError, match=r"\['config.json'\]") as info:
        XStars.from_pretrained(repo_id, revision=commit, local_files_only=True)
    assert info.value.field == "local_files_only"
    assert hub_server.requests == []


def test_downloaded_file_that_differs_from_the_manifest_is_rejected(tmp_path, hf_cache, hub_server):
    folder = tiny_model().save_pretrained(tmp_path / "m")
    repo_id = f"org/served-bad-{uuid.uuid4().hex[:8]}"
    entry = registry_entry(folder, repo_id, "0" * 40)
    stem = folder / "stem-aerial.safetensors"
    data = bytearray(stem.read_bytes())
    data[100] ^= 0xFF
    stem.write_bytes(bytes(data))
    entry["source"]["revision"] = hub_server.seed_repo(repo_id, folder)
    register_model("tiny-served-bad", entry)
    expected = entry["files"]["stem-aerial.safetensors"]["sha256"]
    with pytest.raises(ChecksumError, match=rf"stem-aerial.safetensors .*expected sha256 {expected}"):
        XStars.from_pretrained("tiny-served-bad")


def test_manifest_and_config_disagreeing_is_rejected(published, hf_cache):
    _, folder, repo_id, commit = published
    entry = registry_entry(folder, repo_id, commit)
    entry["files"]["stem-aerial.safetensors"]["sha256"] = "0" * 64
    register_model("tiny-tampered", entry)
    message = r"config.json records stem-aerial.safetensors as sha256 [0-9a-f]{64} but the manifest"
    with pytest.raises(ChecksumError, match=message):
        XStars.from_pretrained("tiny-tampered")


def test_corrupted_repo_file_is_rejected(tmp_path, hf_cache, hub_server):
    folder = tiny_model().save_pretrained(tmp_path / "m")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # corrupt the weights after config.json recorded their hash
    (folder / "model.safetensors").write_bytes(bytes(data))
    repo_id = f"org/corrupt-{uuid.uuid4().hex[:8]}"
    hub_server.seed_repo(repo_id, folder)
    with pytest.raises(ChecksumError, match="model.safetensors .*corrupted"):
        XStars.from_pretrained(repo_id)


def test_unknown_repo_and_revision(hf_cache, hub_server, published):
    _, _, repo_id, _ = published
    with pytest.raises(ModelNotFoundError, match="Hub repo 'org/does-not-exist' not found"):
        XStars.from_pretrained("org/does-not-exist")
    with pytest.raises(ModelNotFoundError, match="has no revision 'v9'") as info:
        XStars.from_pretrained(repo_id, revision="v9")
    assert info.value.field == "revision"
    with pytest.raises(InvalidOptionError, match=r"Two revisions given for .*: 'main' in the name and revision='v2'\.") as info:
        XStars.from_pretrained(f"{repo_id}@main", revision="v2")
    assert info.value.field == "revision"


def test_registry_ids_are_pinned(published, hf_cache):
    _, folder, repo_id, commit = published
    entry = registry_entry(folder, repo_id, commit)
    config = json.loads((folder / "config.json").read_text())
    assert entry["files"]["model.safetensors"] == config["files"]["model.safetensors"]
    register_model("tiny-pinned", entry)
    message = rf"pinned to revision {commit}; to load revision='main', name the Hub repo instead: {repo_id}@main"
    with pytest.raises(InvalidOptionError, match=message) as info:
        XStars.from_pretrained("tiny-pinned", revision="main")
    assert info.value.field == "revision"


def test_hub_options_are_keyword_only_frozen_and_checked(published, hf_cache, hub_server):
    _, _, repo_id, commit = published
    with pytest.raises(TypeError):
        HubOptions(commit)  # keyword-only: a positional revision cannot land in another setting
    options = HubOptions(revision=commit, local_files_only=True)
    with pytest.raises(AttributeError):
        options.revision = "main"  # frozen: built once in from_pretrained, passed down unchanged
    with pytest.raises(InvalidOptionError, match="revision must be a branch, tag or commit id") as info:
        HubOptions(revision=3)
    assert info.value.field == "revision"
    XStars.from_pretrained(repo_id, revision=commit)  # fills the cache
    hub_server.clear_log()
    resolved = resolve_model(repo_id, options)
    assert resolved.revision == commit and resolved.source == f"hub:{repo_id}"
    assert hub_server.requests == []
