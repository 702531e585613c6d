"""Publishing a model to a Hugging Face Hub repo in one commit, and turning the result into a
registry entry (repo, 40-hex commit, sha256 of every file)."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalTokenNotFoundError

from ..config import CONFIG_NAME, XStarsConfig
from ..errors import HubServerError, InvalidOptionError, ManifestError, PushIncompleteError
from ..hub import NETWORK_ERRORS, describe_network_failure
from ..io import read_json
from ..manifest import COMMIT_RE, FORMAT_VERSION, REPO_ID_RE, load_manifest
from ..serialization import atomic_write_bytes
from ..stac_item import STAC_ITEM_NAME, write_stac_item
from .card import CITATION, model_card

if TYPE_CHECKING:
    from ..model import XStarsBase

__all__ = ["manifest_entry", "push_to_hub", "write_manifest_entry"]

_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
CARD_NAME = "README.md"


def manifest_entry(
    model: XStarsBase,
    repo_id: str | None,
    revision: str | None,
    folder: str | Path,
    license: str = "mit",
    *,
    bundled: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """The registry entry for files in ``folder``: published as ``repo_id`` at commit
    ``revision``, or shipped inside the package at ``bundled`` (a path below ``xstars_models/``;
    then ``repo_id`` and ``revision`` are ``None``). Lists ``config.json``, the weight files, and
    the model card (``README.md``) and STAC item (``stac-item.json``) when there are, each with
    its sha256 and size in bytes.

    Raises:
        InvalidOptionError: both or neither of a Hub repo and ``bundled`` (``field="bundled"``).
    """
    if (bundled is None) == (repo_id is None or revision is None):
        raise InvalidOptionError(
            "manifest_entry needs either repo_id and revision (a Hub repo) or bundled (a package folder).",
            field="bundled",
        )
    files = {
        p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name in {CONFIG_NAME, CARD_NAME, STAC_ITEM_NAME, *model.config.weight_files}
    }
    return {
        "arch": model.arch,
        "sensors": list(model.sensors),
        "source": {"bundled": bundled} if bundled is not None else {"repo_id": repo_id, "revision": revision},
        "files": files,
        "license": license,
        "citation": CITATION,
        "description": description or f"Published from xstars-models to {repo_id}.",
    }


def write_manifest_entry(path: str | Path, model_id: str, entry: dict[str, Any]) -> None:
    """Add or replace ``model_id`` in the manifest file ``path`` (created if absent), atomically,
    after checking the result parses. Point ``XSTARS_MANIFEST`` at the file to use it."""
    atomic_write_bytes(path, _manifest_with(Path(path), model_id, entry).encode())


def _manifest_with(path: Path, model_id: str, entry: dict[str, Any]) -> str:
    """The text of manifest ``path`` with ``model_id`` added or replaced, checked to parse."""
    if path.exists():
        load_manifest(path)  # a malformed manifest is reported as such, naming the file
        data = read_json(path, error=ManifestError, where=f"Manifest {path}")
    else:
        data = {"format_version": FORMAT_VERSION, "models": {}}
    data["models"][model_id] = entry
    text = json.dumps(data, indent=2) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / "manifest.json"
        check.write_text(text, encoding="utf-8")
        load_manifest(check)
    return text


def _check_push_arguments(repo_id: str, revision: str | None, token: str | bool | None) -> None:
    if not isinstance(repo_id, str) or not REPO_ID_RE.match(repo_id):
        # "org/name@v2": the part after "@" is the branch the user meant.
        branch = repo_id.partition("@")[2] if isinstance(repo_id, str) else ""
        raise InvalidOptionError(
            f"Hub repo id {repo_id!r} is not 'org/name' (letters, digits, '.', '_', '-'; no revision: "
            "pass {revision} for a branch).",
            field="repo_id",
            settings={"revision": branch or "main"},
        )
    if revision is not None and (not _BRANCH.match(revision) or COMMIT_RE.match(revision)):
        raise InvalidOptionError(
            f"revision {revision!r} must be a branch name to commit to (e.g. 'main' or 'v2').", field="revision"
        )
    if token is False or (token is None and get_token() is None):
        raise PermissionError(
            f"Pushing to {repo_id!r} needs a Hub token with write access, and none was found: pass token=..., "
            "set HF_TOKEN, or run `hf auth login`. Nothing was uploaded."
        )


def push_to_hub(
    model: XStarsBase,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload X-STARS model",
    token: str | None = None,
    license: str = "mit",
    description: str = "",
    manifest_path: str | Path | None = None,
    model_id: str | None = None,
    overwrite_card: bool = False,
) -> str:
    """Create ``repo_id`` if needed and upload ``config.json``, the weight files, a generated
    ``README.md`` model card and the STAC item (``stac-item.json``, MLM extension, with
    ``license``) in ONE commit; returns the commit id.

    A ``README.md`` already in the repo at ``revision`` (a card its owners edited on the Hub) is
    kept unless ``overwrite_card=True``; the generated card is only uploaded where there is none.

    Uploading unchanged files makes no new commit (the current commit id is returned). With
    ``manifest_path``, the registry entry (repo, commit, sha256 per file) is written to that
    manifest under ``model_id`` (default: the repo name). Every argument, the manifest and its
    entry are checked before anything is uploaded.

    Raises:
        InvalidOptionError, ManifestError: a bad repo id, branch, licence, model id or manifest; nothing uploaded.
        PermissionError: no token, or the Hub rejected it; the token never appears in the message.
        HubServerError: the Hub failed (HTTP error status, timeout, dropped connection).
        PushIncompleteError: the commit landed but writing the manifest failed; names the commit.
    """
    _check_push_arguments(repo_id, revision, token)
    model_id = model_id or repo_id.split("/")[-1].lower()
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="xstars-push-") as tmp:
        folder = model.save_pretrained(Path(tmp) / "model")
        config = XStarsConfig.from_file(folder / CONFIG_NAME)
        card = model_card(config, repo_id, license=license, description=description)
        (folder / CARD_NAME).write_text(card, encoding="utf-8")
        # The item save_pretrained wrote, again with the licence and the repo's name.
        write_stac_item(folder, config, license=license, item_id=repo_id.split("/")[-1], title=repo_id, description=description)
        if manifest_path is not None:
            # The entry with a stand-in commit id: a bad model id or manifest fails here, not after the commit.
            _manifest_with(Path(manifest_path), model_id, manifest_entry(model, repo_id, "0" * 40, folder, license))
            parent = Path(manifest_path).parent
            if parent.exists() and not parent.is_dir():
                raise InvalidOptionError(f"manifest_path {manifest_path}: {parent} is not a folder.", field="manifest_path")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            if not overwrite_card:
                _keep_hub_card(api, repo_id, revision, folder)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message
            )
        except LocalTokenNotFoundError:
            raise PermissionError(
                f"Pushing to {repo_id!r} needs a Hub token with write access: pass token=..., set HF_TOKEN, "
                "or run `hf auth login`."
            ) from None
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status in (401, 403):
                raise PermissionError(
                    f"The Hub rejected the token for {repo_id!r} (HTTP {status}); nothing was committed. "
                    "Check that the token has write access to this namespace."
                ) from None
            raise _push_failed(repo_id, err) from None
        except NETWORK_ERRORS as err:
            raise _push_failed(repo_id, err) from None
        commit = info.oid
        if manifest_path is not None:
            try:
                write_manifest_entry(manifest_path, model_id, manifest_entry(model, repo_id, commit, folder, license))
            except (OSError, ValueError) as err:
                raise PushIncompleteError(
                    f"Pushed {repo_id}@{commit}, but writing its entry {model_id!r} into the manifest "
                    f"{manifest_path} failed: {err}. The commit is on the Hub; add the entry once the "
                    f"problem is fixed: write_manifest_entry(path, {model_id!r}, manifest_entry(model, "
                    f"{repo_id!r}, {commit!r}, folder))."
                ) from err
    return commit


def _keep_hub_card(api: HfApi, repo_id: str, revision: str | None, folder: Path) -> None:
    """Put the repo's own ``README.md`` (at ``revision``) in ``folder`` in place of the generated
    one, so the commit leaves it as it is and the manifest entry hashes the card that is on the Hub."""
    try:
        path = api.hf_hub_download(repo_id, CARD_NAME, revision=revision, local_dir=folder.parent / "hub-card")
    except EntryNotFoundError:
        return  # no card yet: the generated one goes up
    (folder / CARD_NAME).write_bytes(Path(path).read_bytes())


def _push_failed(repo_id: str, err: BaseException) -> HubServerError:
    return HubServerError(
        f"Pushing to {repo_id!r} at {constants.ENDPOINT} failed: {describe_network_failure(err)}. Nothing "
        "was committed (a commit is all or nothing); try again later."
    )
