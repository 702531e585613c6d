"""Loading from a Hub that fails: error statuses, stalls, dropped connections, flipped bytes and a
push landing mid-download, injected into the loopback server (tests/hub_server.py), through the
real huggingface_hub client, from the API and from the CLI."""

from __future__ import annotations


import pytest
import torch

from factories import registry_entry, rgb_images, tiny_model
from fault_fixtures import fast_client, faults  # noqa: F401 (fixtures)
from hub_server import Fault
from xstars_models import ChecksumError, XStars, register_model
from xstars_models import manifest as manifest_module
from xstars_models.cli import main
from xstars_models.errors import HubServerError


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.setattr(manifest_module, "_registered", {})


def requested(hub_server, name):
    return [r for r in hub_server.requests if r[1].endswith("/" + name)]


def test_server_error_is_reported_as_such_and_stops_at_the_first_file(published, hf_cache, faults, fast_client):
    _, _, repo_id, _ = published
    faults.inject(Fault(f"/{repo_id}/resolve/*/model.safetensors", status=500))
    with pytest.raises(HubServerError) as err:
        XStars.from_pretrained(repo_id)
    message = str(err.value)
    assert "'model.safetensors'" in message and "HTTP 500" in message and repo_id in message
    assert "local_files_only" not in message and "HF_HUB_OFFLINE" not in message
    assert not requested(faults, "stem-aerial.safetensors") and not requested(faults, "stem-sentinel2.safetensors")
    assert fast_client, "the client's own retries ran"


def test_server_error_on_a_registry_model_from_the_cli(published, hf_cache, faults, fast_client, capsys):
    _, folder, repo_id, commit = published
    register_model("faulty-500", registry_entry(folder, repo_id, commit))
    faults.inject(Fault(f"/{repo_id}/resolve/*", status=503))
    assert main(["download", "faulty-500"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars download: error: Downloading 'config.json' of Hub repo") and "HTTP 503" in err
    assert err.count("\n") == 1
    assert len({path for _, path in faults.requests}) == 1  # only config.json was ever asked for


@pytest.mark.parametrize("fault", [Fault("/*/resolve/*", stall_s=3), Fault("/*/resolve/*", drop=True)],
                         ids=["timeout", "dropped-connection"])
def test_timeouts_and_dropped_connections_are_one_line_errors(published, hf_cache, faults, fast_client, fault, capsys):
    _, _, repo_id, _ = published
    faults.inject(fault)
    with pytest.raises(HubServerError, match=r"'config.json' of Hub repo .*(did not answer in time|connection failed)"):
        XStars.from_pretrained(repo_id)
    assert main(["info", repo_id]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars info: error: Downloading 'config.json'") and err.count("\n") == 1


def test_failure_while_downloading_the_body_is_a_server_error(published, hf_cache, faults, fast_client):
    _, _, repo_id, _ = published
    faults.inject(Fault(f"/{repo_id}/resolve/*/model.safetensors", method="GET", status=500))
    with pytest.raises(HubServerError, match=r"'model.safetensors' .*HTTP 500"):
        XStars.from_pretrained(repo_id)


def test_branch_is_pinned_to_one_commit_for_the_whole_download(published, hf_cache, faults, tmp_path):
    model, _, repo_id, first = published
    other = tiny_model(seed=1).save_pretrained(tmp_path / "other")
    # A push lands right after config.json was served: the weight files on main now belong to another commit.
    faults.inject(Fault(f"/{repo_id}/resolve/main/config.json", method="GET", times=1,
                        after=lambda: faults.seed_repo(repo_id, other)))
    loaded = XStars.from_pretrained(f"{repo_id}@main")
    assert faults.head(repo_id) != first and loaded.revision == first
    x = rgb_images(1)
    assert torch.equal(loaded.embed(x, "sentinel2_rgb"), model.embed(x, "sentinel2_rgb"))


def test_corrupted_cache_blob_is_repaired_by_the_fix_the_error_names(published, hf_cache, faults, capsys):
    model, folder, repo_id, commit = published
    register_model("faulty-blob", registry_entry(folder, repo_id, commit))
    # Bytes flipped in transit end up in the cache blob.
    faults.inject(Fault(f"/{repo_id}/resolve/*/model.safetensors", method="GET", flip_byte=200, times=1))
    with pytest.raises(ChecksumError) as err:
        XStars.from_pretrained("faulty-blob")
    message = str(err.value)
    assert "xstars download faulty-blob --force-download" in message and "force_download=True" in message
    # What users tried before: deleting the cached path and downloading again; it re-links the bad blob.
    cached = next(hf_cache.rglob("snapshots/*/model.safetensors"))
    cached.unlink()
    assert main(["download", "faulty-blob"]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert main(["download", "faulty-blob", "--force-download"]) == 0
    assert "downloaded and verified" in capsys.readouterr().out
    x = rgb_images(1)
    assert torch.equal(XStars.from_pretrained("faulty-blob").embed(x, "sentinel2_rgb"), model.embed(x, "sentinel2_rgb"))


def test_force_download_keyword_of_a_hub_repo(published, hf_cache, faults):
    model, _, repo_id, _ = published
    faults.inject(Fault(f"/{repo_id}/resolve/*/stem-aerial.safetensors", method="GET", flip_byte=0, times=1))
    with pytest.raises(ChecksumError, match=rf"force_download=True"):
        XStars.from_pretrained(repo_id)
    x = rgb_images(1, 128)
    loaded = XStars.from_pretrained(repo_id, force_download=True)
    assert torch.equal(loaded.embed(x, "aerial"), model.embed(x, "aerial"))
