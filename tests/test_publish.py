"""push_to_hub through the unmodified huggingface_hub client against the loopback Hub server."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid

import pytest
import timm
import torch
from huggingface_hub import hf_hub_download

from factories import TINY, rgb_images, tiny_model
from fault_fixtures import fast_client, faults  # noqa: F401 (fixtures)
from hub_server import Fault
from xstars_models import XStars, get_model_entry
from xstars_models import manifest as manifest_module
from xstars_models.cli import main
from xstars_models.errors import InvalidOptionError, ManifestError, PushIncompleteError
from xstars_models.manifest import MANIFEST_ENV


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.setattr(manifest_module, "_registered", {})


def new_repo() -> str:
    return f"org/pushed-{uuid.uuid4().hex[:8]}"


def test_push_then_load_is_byte_identical(tmp_path, hub_server, hf_cache):
    model = tiny_model()
    repo_id = new_repo()
    commit = model.push_to_hub(repo_id)
    assert commit == hub_server.head(repo_id)
    local = model.save_pretrained(tmp_path / "local")
    remote = hub_server.files(repo_id, commit)
    assert set(remote) >= {"config.json", "model.safetensors", "stem-aerial.safetensors", "README.md"}
    for name in ("config.json", "model.safetensors", "stem-aerial.safetensors", "stem-sentinel2.safetensors"):
        assert remote[name] == (local / name).read_bytes()
    commits = [r for r in hub_server.requests if r[0] == "POST" and "/commit/" in r[1]]
    assert len(commits) == 1  # everything in one commit
    loaded = XStars.from_pretrained(f"{repo_id}@{commit}")
    x = rgb_images(1, 128)
    assert torch.equal(loaded.embed(x, "aerial", output="map"), model.embed(x, "aerial", output="map"))


def test_model_card_metadata(hub_server, hf_cache):
    model = tiny_model()
    model.lineage = {"base_model": "org/base-model", "base_revision": "a" * 40}
    model.metrics = {"retrieval_r1": 0.5}
    repo_id = new_repo()
    commit = model.push_to_hub(repo_id, license="cc-by-4.0")
    card = hub_server.files(repo_id, commit)["README.md"].decode()
    front = card.split("---")[1]
    assert "library_name: xstars-models" in front and "pipeline_tag: image-feature-extraction" in front
    assert 'license: "cc-by-4.0"' in front and 'base_model: "org/base-model"' in front
    assert "| `aerial` | red (0.620), green (0.540), blue (0.460) | 5 m | 16 px = 80 m |" in card
    assert "retrieval_r1" in card and "a" * 40 in card and "arXiv:2405.09922" in card
    assert f'XStars.from_pretrained("{repo_id}")' in card


def test_repush_of_unchanged_weights_makes_no_commit(hub_server, hf_cache):
    model = tiny_model()
    repo_id = new_repo()
    first = model.push_to_hub(repo_id)
    hub_server.clear_log()
    assert model.push_to_hub(repo_id) == first
    assert hub_server.head(repo_id) == first
    assert not [r for r in hub_server.requests if "/commit/" in r[1] or r[0] == "PUT"]


def test_rejected_token_is_clear_leaves_nothing_and_is_never_shown(hub_server, hf_cache, caplog):
    secret = "hf_not_a_valid_token_123456"
    repo_id = new_repo()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PermissionError, match="rejected the token") as err:
        tiny_model().push_to_hub(repo_id, token=secret)
    assert secret not in str(err.value) and secret not in caplog.text
    assert hub_server.head(repo_id) is None


def test_missing_token_is_clear(hub_server, hf_cache, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    repo_id = new_repo()
    with pytest.raises(PermissionError, match="needs a Hub token with write access, and none was found"):
        tiny_model().push_to_hub(repo_id)
    assert hub_server.head(repo_id) is None and hub_server.requests == []


def test_manifest_entry_makes_a_registry_id(tmp_path, hub_server, hf_cache, monkeypatch):
    model = tiny_model()
    repo_id = new_repo()
    manifest = tmp_path / "extra.json"
    commit = model.push_to_hub(repo_id, manifest_path=manifest, model_id="my-pushed-model")
    monkeypatch.setenv(MANIFEST_ENV, str(manifest))
    entry = get_model_entry("my-pushed-model")
    assert entry.revision == commit and entry.repo_id == repo_id
    assert set(entry.files) == {
        "config.json", "model.safetensors", "stem-aerial.safetensors", "stem-sentinel2.safetensors", "README.md",
        "stac-item.json",
    }
    card = hub_server.files(repo_id, commit)["README.md"]
    assert entry.files["README.md"].sha256 == hashlib.sha256(card).hexdigest()
    assert json.loads(manifest.read_text())["format_version"] == manifest_module.FORMAT_VERSION
    hub_server.clear_log()
    loaded = XStars.from_pretrained("my-pushed-model")
    assert torch.equal(loaded.embed(rgb_images(1), "sentinel2_rgb"), model.embed(rgb_images(1), "sentinel2_rgb"))
    assert json.loads(manifest.read_text())["models"]["my-pushed-model"]["source"]["revision"] == commit


def test_a_card_edited_on_the_hub_is_kept_unless_asked(tmp_path, hub_server, hf_cache):
    model = tiny_model()
    repo_id = new_repo()
    first = model.push_to_hub(repo_id)
    generated = hub_server.files(repo_id, first)["README.md"]
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "README.md").write_bytes(generated + b"\n## Notes from the owners\n")
    hub_server.seed_repo(repo_id, edited)  # the owners edit the card on the Hub

    manifest = tmp_path / "m.json"
    commit = model.push_to_hub(repo_id, manifest_path=manifest, model_id="kept-card")
    card = hub_server.files(repo_id, commit)["README.md"]
    assert card == (edited / "README.md").read_bytes()
    entry = json.loads(manifest.read_text())["models"]["kept-card"]
    assert entry["files"]["README.md"]["sha256"] == hashlib.sha256(card).hexdigest()  # the card on the Hub

    commit = model.push_to_hub(repo_id, overwrite_card=True)
    assert hub_server.files(repo_id, commit)["README.md"] == generated


def test_pushed_trunk_loads_in_plain_timm(hub_server, hf_cache):
    model = tiny_model()
    repo_id = new_repo()
    commit = model.push_to_hub(repo_id)
    weights = hf_hub_download(repo_id, "model.safetensors", revision=commit)
    plain = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, num_classes=0, dynamic_img_size=True,
        pretrained_cfg_overlay=dict(file=weights), **TINY,
    )
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.trunk.state_dict()[key])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(model_id="Not A Valid Id"), ManifestError, r"'Not A Valid Id': ids use lowercase letters"),
        (dict(manifest_path="garbage"), ManifestError, r"garbage\.json: not valid JSON"),
        (dict(repo_id="no-namespace"), InvalidOptionError, r"Hub repo id 'no-namespace' is not 'org/name'"),
        (dict(repo_id="org/name@v2"), InvalidOptionError, r"is not 'org/name' .*pass revision='v2' for a branch"),
        (dict(revision="a" * 40), InvalidOptionError, r"must be a branch name"),
    ],
)
def test_push_checks_everything_before_uploading(tmp_path, hub_server, hf_cache, kwargs, error, message):
    field = "revision" if "revision" in kwargs else "repo_id"  # for the argument errors
    repo_id = kwargs.pop("repo_id", new_repo())
    manifest = tmp_path / "models.json"
    if kwargs.get("manifest_path") == "garbage":
        manifest = tmp_path / "garbage.json"
        manifest.write_text("{not json")
        kwargs.pop("manifest_path")
    with pytest.raises(error, match=message) as info:
        tiny_model().push_to_hub(repo_id, manifest_path=manifest, **kwargs)
    if error is InvalidOptionError:  # the manifest's own errors are tested with the manifest
        assert info.value.field == field
    assert hub_server.requests == []  # not even the repo was created


def test_cli_push_with_a_bad_model_id_commits_nothing(tmp_path, hub_server, hf_cache, capsys):
    folder = tiny_model().save_pretrained(tmp_path / "model")
    repo_id = new_repo()
    argv = ["push", str(folder), repo_id, "--manifest", str(tmp_path / "m.json"), "--model-id", "Bad_ID"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars push: error:") and "'Bad_ID'" in err and err.count("\n") == 1
    assert hub_server.head(repo_id) is None and not (tmp_path / "m.json").exists()


def test_failure_after_the_commit_names_the_commit_that_landed(tmp_path, hub_server, hf_cache, monkeypatch, capsys):
    from xstars_models.publish import push as publish

    folder = tiny_model().save_pretrained(tmp_path / "model")
    repo_id = new_repo()

    def disk_full(path, data):
        raise OSError(28, f"{path}: No space left on device")

    monkeypatch.setattr(publish, "atomic_write_bytes", disk_full)
    with pytest.raises(PushIncompleteError) as err:
        XStars.from_pretrained(folder).push_to_hub(repo_id, manifest_path=tmp_path / "m.json")
    commit = hub_server.head(repo_id)
    assert commit is not None and f"Pushed {repo_id}@{commit}, but writing its entry" in str(err.value)
    assert "No space left on device" in str(err.value)
    assert main(["push", str(folder), repo_id, "--manifest", str(tmp_path / "m.json")]) == 2
    assert f"{repo_id}@{commit}" in capsys.readouterr().err  # unchanged files: the same commit, named again


def test_server_failure_during_push_is_one_line(tmp_path, faults, hf_cache, fast_client, capsys):
    folder = tiny_model().save_pretrained(tmp_path / "model")
    repo_id = new_repo()
    faults.inject(Fault("/api/models/*/commit/*", status=500))
    assert main(["push", str(folder), repo_id]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xstars push: error: Pushing to {repo_id!r}") and "HTTP 500" in err
    assert err.count("\n") == 1 and "Nothing was committed" in err
    assert faults.files(repo_id) == {".gitattributes": faults.files(repo_id)[".gitattributes"]}


def test_manifest_entry_for_a_bundled_folder(tmp_path):
    """scripts/bundle_default.py builds the bundled model's entry with the same function as a push."""
    from xstars_models.publish import manifest_entry

    model = tiny_model()
    folder = model.save_pretrained(tmp_path / "model")
    (folder / "README.md").write_text("card", encoding="utf-8")
    entry = manifest_entry(model, None, None, folder, "cc-by-4.0", bundled="weights/tiny", description="tiny")
    assert entry["source"] == {"bundled": "weights/tiny"} and entry["description"] == "tiny"
    assert set(entry["files"]) == {p.name for p in folder.iterdir()} and entry["license"] == "cc-by-4.0"
    with pytest.raises(InvalidOptionError, match="either repo_id and revision") as info:
        manifest_entry(model, "org/name", "0" * 40, folder, bundled="weights/tiny")
    assert info.value.field == "bundled"
    with pytest.raises(InvalidOptionError, match="either repo_id and revision") as info:
        manifest_entry(model, None, None, folder)
    assert info.value.field == "bundled"
