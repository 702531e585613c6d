"""The real huggingface_hub client against the local Hub server (tests/hub_server.py): downloads,
cache and offline behaviour, uploads through the LFS basic transfer, and the server's checks."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import HubServer, git_blob_sha1

# huggingface_hub 2.4 hands the LFS PUT body to httpx2 as `data=`; keep that out of `-W error` runs.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

CONFIG = json.dumps({"arch": "vit_tiny", "bands": 13}).encode()
WEIGHTS = os.urandom(64 * 1024)  # LFS by extension
_repo_ids = itertools.count()


def _make_folder(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_bytes(CONFIG)
    (root / "model.safetensors").write_bytes(WEIGHTS)
    return root


@pytest.fixture()
def seeded(hub_server: HubServer, tmp_path: Path) -> tuple[str, str]:
    """A fresh public repo holding config.json (regular) and model.safetensors (LFS): (repo_id, commit)."""
    repo_id = f"xstars/seeded-{next(_repo_ids)}"
    commit = hub_server.seed_repo(repo_id, _make_folder(tmp_path / "seed"))
    hub_server.clear_log()
    return repo_id, commit


def test_download_regular_and_lfs_files(seeded, hf_cache, hub_server):
    repo_id, commit = seeded
    config = Path(hf_hub_download(repo_id, "config.json"))
    weights = Path(hf_hub_download(repo_id, "model.safetensors"))
    assert config.read_bytes() == CONFIG and weights.read_bytes() == WEIGHTS
    assert config.is_relative_to(hf_cache) and weights.parent.name == commit
    # The client keys its blob cache by ETag: git sha1 for regular files, sha256 (X-Linked-Etag) for LFS.
    blobs = {p.name for p in (hf_cache / f"models--{repo_id.replace('/', '--')}" / "blobs").iterdir()}
    assert blobs == {git_blob_sha1(CONFIG), hashlib.sha256(WEIGHTS).hexdigest()}
    assert ("GET", f"/{repo_id}/resolve/main/model.safetensors") in hub_server.requests


def test_pinned_commit_download_is_served_from_cache_without_requests(seeded, hf_cache, hub_server):
    repo_id, commit = seeded
    first = hf_hub_download(repo_id, "model.safetensors", revision=commit)
    hub_server.clear_log()
    assert hf_hub_download(repo_id, "model.safetensors", revision=commit) == first
    assert hub_server.requests == []


def test_offline_mode_uses_filled_cache_with_zero_requests(seeded, hf_cache, hub_server, request):
    repo_id, _ = seeded
    expected = hf_hub_download(repo_id, "config.json")
    request.getfixturevalue("hf_offline")
    hub_server.clear_log()
    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == CONFIG
    assert hf_hub_download(repo_id, "config.json") == expected
    assert hub_server.requests == []


def test_offline_missing_file_raises_local_entry_not_found(seeded, hf_cache, hub_server, hf_offline):
    repo_id, _ = seeded
    with pytest.raises(LocalEntryNotFoundError) as excinfo:
        hf_hub_download(repo_id, "model.safetensors")
    assert isinstance(excinfo.value.__cause__, OfflineModeIsEnabled)
    assert hub_server.requests == []


def test_remote_errors_map_to_client_exceptions(seeded, hf_cache):
    repo_id, _ = seeded
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("xstars/no-such-repo", "config.json")
    # The EntryNotFound answer carries X-Repo-Commit, so the miss is cached.
    assert any((hf_cache / f"models--{repo_id.replace('/', '--')}" / ".no_exist").rglob("missing.json"))


def test_snapshot_download(seeded, hf_cache, hub_server):
    repo_id, commit = seeded
    folder = Path(snapshot_download(repo_id))
    assert folder.name == commit
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert ("GET", f"/api/models/{repo_id}/revision/main") in hub_server.requests
    assert ("GET", f"/api/models/{repo_id}/tree/{commit}") in hub_server.requests


def test_private_repo_needs_a_valid_token(hub_server, hf_cache, tmp_path):
    hub_server.seed_repo("xstars/private", _make_folder(tmp_path / "p"), private=True)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("xstars/private", "config.json", token=False)
    assert Path(hf_hub_download("xstars/private", "config.json")).read_bytes() == CONFIG  # HF_TOKEN


def test_upload_folder_round_trip_and_unchanged_reupload(hub_server, hf_cache, tmp_path):
    api = HfApi()
    url = api.create_repo("xstars/uploaded", exist_ok=True)
    assert api.create_repo("xstars/uploaded", exist_ok=True) == url  # 409 answered with the url
    info = api.upload_folder(repo_id="xstars/uploaded", folder_path=_make_folder(tmp_path / "up"))
    assert hub_server.head("xstars/uploaded") == info.oid
    assert any(m == "PUT" for m, _ in hub_server.requests)  # the safetensors went through the LFS transfer
    assert Path(hf_hub_download("xstars/uploaded", "model.safetensors")).read_bytes() == WEIGHTS
    assert Path(hf_hub_download("xstars/uploaded", "config.json", revision=info.oid)).read_bytes() == CONFIG
    tree = {f.path: f for f in api.list_repo_tree("xstars/uploaded", recursive=True)}
    assert tree["model.safetensors"].lfs is not None and tree["config.json"].lfs is None

    # Unchanged files: preupload reports their current oid, the client drops them and makes no commit.
    hub_server.clear_log()
    again = api.upload_folder(repo_id="xstars/uploaded", folder_path=tmp_path / "up")
    assert again.oid == info.oid == hub_server.head("xstars/uploaded")
    assert not any(path.endswith("/commit/main") or m == "PUT" for m, path in hub_server.requests)


def test_create_commit_round_trip(hub_server, hf_cache):
    api = HfApi()
    api.create_repo("xstars/committed")
    info = api.create_commit(
        "xstars/committed",
        operations=[
            CommitOperationAdd("weights/model.safetensors", WEIGHTS),
            CommitOperationAdd("config.json", CONFIG),
        ],
        commit_message="add weights",
    )
    assert hub_server.files("xstars/committed", info.oid)["weights/model.safetensors"] == WEIGHTS
    folder = Path(snapshot_download("xstars/committed", revision=info.oid))
    assert (folder / "weights" / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "config.json").read_bytes() == CONFIG

    deleted = api.create_commit(
        "xstars/committed", operations=[CommitOperationDelete("weights/")], commit_message="drop weights"
    )
    assert set(hub_server.files("xstars/committed")) == {".gitattributes", "config.json"}
    assert "weights/model.safetensors" in hub_server.files("xstars/committed", info.oid)  # old commit unchanged
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("xstars/committed", "weights/model.safetensors", revision=deleted.oid)


def test_write_with_wrong_token_is_rejected_and_changes_nothing(seeded, hub_server, hf_cache):
    repo_id, commit = seeded
    for token in ("hf_wrong", False):  # a bad token, and no token at all
        with pytest.raises(HfHubHTTPError) as excinfo:
            HfApi(token=token).create_commit(
                repo_id, operations=[CommitOperationAdd("new.json", b"{}")], commit_message="nope"
            )
        assert excinfo.value.response.status_code == 401
        assert not isinstance(excinfo.value, RepositoryNotFoundError)
    assert hub_server.head(repo_id) == commit and "new.json" not in hub_server.files(repo_id)


def test_stale_parent_commit_is_rejected(seeded, hub_server):
    repo_id, old = seeded
    api = HfApi()
    new = api.create_commit(repo_id, operations=[CommitOperationAdd("a.json", b"1")], commit_message="a").oid
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(
            repo_id, operations=[CommitOperationAdd("b.json", b"2")], commit_message="b", parent_commit=old
        )
    assert excinfo.value.response.status_code == 412
    assert hub_server.head(repo_id) == new


def _raw(hub_server: HubServer, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    """A request the client would never send, to exercise the server's own checks."""
    headers = {"Authorization": "Bearer hf_test_token", "Content-Type": "application/json"}
    req = urllib.request.Request(hub_server.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_lfs_content_must_match_its_oid_and_be_uploaded_before_commit(seeded, hub_server):
    repo_id, commit = seeded
    oid = hashlib.sha256(b"fresh weights").hexdigest()
    batch = {"operation": "upload", "objects": [{"oid": oid, "size": 13}]}
    batch_path = f"/{repo_id}.git/info/lfs/objects/batch"
    status, body = _raw(hub_server, "POST", batch_path, json.dumps(batch).encode())
    assert status == 200
    upload_path = json.loads(body)["objects"][0]["actions"]["upload"]["href"].removeprefix(hub_server.url)
    assert _raw(hub_server, "PUT", upload_path, b"stale weights")[0] == 400  # same size, wrong sha256

    lines = [{"key": "header", "value": {"summary": "sneaky"}},
             {"key": "lfsFile", "value": {"path": "x.safetensors", "algo": "sha256", "oid": oid, "size": 13}}]
    ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, body = _raw(hub_server, "POST", f"/api/models/{repo_id}/commit/main", ndjson)
    assert status == 422 and b"never uploaded" in body
    assert hub_server.head(repo_id) == commit
