"""Publishing a model to a Hugging Face Hub repo in one commit, and turning the result into a
registry entry (repo, 40-hex commit, sha256 of every file)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from .card import CITATION, model_card
from .config import CONFIG_NAME, XStarsConfig
from .manifest import load_manifest
from .serialization import atomic_write_bytes

if TYPE_CHECKING:
    from .model import XStars

__all__ = ["manifest_entry", "push_to_hub", "write_manifest_entry"]


def manifest_entry(model: XStars, repo_id: str, revision: str, folder: str | Path, license: str = "mit") -> dict[str, Any]:
    """The registry entry for files in ``folder`` published as ``repo_id`` at commit ``revision``."""
    files = {
        p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name in {CONFIG_NAME, *model.config.weight_files}
    }
    return {
        "arch": model.arch,
        "sensors": list(model.sensors),
        "source": {"repo_id": repo_id, "revision": revision},
        "files": files,
        "license": license,
        "citation": CITATION,
        "description": f"Published from xstars-models to {repo_id}.",
    }


def write_manifest_entry(path: str | Path, model_id: str, entry: dict[str, Any]) -> None:
    """Add or replace ``model_id`` in the manifest file ``path`` (created if absent), atomically,
    after checking the result parses. Point ``XSTARS_MANIFEST`` at the file to use it."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"format_version": 1, "models": {}}
    data["models"][model_id] = entry
    text = json.dumps(data, indent=2) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / "manifest.json"
        check.write_text(text)
        load_manifest(check)
    atomic_write_bytes(path, text.encode())


def push_to_hub(
    model: XStars,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload X-STARS model",
    token: str | None = None,
    license: str = "mit",
    description: str = "",
    manifest_path: str | Path | None = None,
    model_id: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``config.json``, the weight files and a generated
    ``README.md`` model card in ONE commit; returns the commit id.

    Uploading unchanged files makes no new commit (the current commit id is returned). With
    ``manifest_path``, the registry entry (repo, commit, sha256 per file) is written to that
    manifest under ``model_id`` (default: the repo name).

    Raises:
        PermissionError: no token, or the Hub rejected it; the token never appears in the message.
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="xstars-push-") as tmp:
        folder = model.save_pretrained(Path(tmp) / "model")
        card = model_card(XStarsConfig.from_file(folder / CONFIG_NAME), repo_id, license=license, description=description)
        (folder / "README.md").write_text(card, encoding="utf-8")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
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
            raise
        commit = info.oid
        if manifest_path is not None:
            entry = manifest_entry(model, repo_id, commit, folder, license)
            write_manifest_entry(manifest_path, model_id or repo_id.split("/")[-1].lower(), entry)
    return commit
