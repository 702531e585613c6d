"""The model registry: ``weights_manifest.json`` (shipped in the wheel), any extra manifests named
by the ``XSTARS_MANIFEST`` environment variable, and models registered at run time.

Each entry pins where the files come from (a Hub repo at a 40-hex commit, or a folder bundled in
the package) and the sha256 and size of every file, so a download can be verified before use.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import CONFIG_NAME, FileRecord, parse_file_records
from .errors import ManifestError, ModelNotFoundError
from .io import read_json

__all__ = [
    "COMMIT_RE",
    "MANIFEST_ENV",
    "MANIFEST_NAME",
    "REPO_ID",
    "REPO_ID_RE",
    "ModelEntry",
    "get_model_entry",
    "list_models",
    "load_manifest",
    "register_model",
]

MANIFEST_NAME = "weights_manifest.json"
MANIFEST_ENV = "XSTARS_MANIFEST"
FORMAT_VERSION = 1
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# The Hub's repo ids and commit ids, for every module that checks one (hub, publish).
REPO_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
"""A Hub repo id, ``org/name``, as a regular-expression fragment (no anchors)."""
REPO_ID_RE = re.compile(rf"^{REPO_ID}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        model_id: registry id (``xstars-s2-aerial``).
        arch: timm architecture of the trunk.
        sensors: sensor names the model has stems for, primary first.
        files: sha256 and size of every file, ``config.json`` included.
        repo_id, revision: Hub repo and 40-hex commit, for downloadable models.
        bundled: folder inside the installed package, for models shipped in the wheel.
        license, citation, description: shown by ``xstars info`` and model cards.
    """

    model_id: str
    arch: str
    sensors: tuple[str, ...]
    files: Mapping[str, FileRecord]
    repo_id: str | None = None
    revision: str | None = None
    bundled: str | None = None
    license: str = ""
    citation: str = ""
    description: str = ""
    origin: str = field(default="", compare=False)

    @property
    def bundled_path(self) -> Path | None:
        return None if self.bundled is None else _PACKAGE_DIR / self.bundled

    def to_dict(self) -> dict[str, Any]:
        source = (
            {"bundled": self.bundled}
            if self.bundled is not None
            else {"repo_id": self.repo_id, "revision": self.revision}
        )
        return {
            "arch": self.arch,
            "sensors": list(self.sensors),
            "source": source,
            "files": {name: record.to_dict() for name, record in self.files.items()},
            "license": self.license,
            "citation": self.citation,
            "description": self.description,
        }


def _parse_entry(model_id: str, data: Any, origin: str) -> ModelEntry:
    """One manifest entry, validated; an error's field is the entry's key at fault, dotted
    (``"source.revision"``, ``"files.config.json.sha256"``), or ``"model_id"`` for the id."""

    def fail(message: str, field: str) -> ManifestError:
        return ManifestError(f"{origin}: model {model_id!r}: {message}", field=field)

    if not _ID.match(model_id):
        raise fail("ids use lowercase letters, digits, '.', '_' and '-' (e.g. 'xstars-s2-aerial').", "model_id")
    if not isinstance(data, dict):
        raise fail(f"entry must be an object, got {type(data).__name__}.", "model_id")
    unknown = sorted(set(data) - {"arch", "sensors", "source", "files", "license", "citation", "description"})
    if unknown:
        raise fail(f"unknown fields {unknown}.", unknown[0])
    if not isinstance(data.get("arch"), str) or not data["arch"]:
        raise fail("'arch' must name a timm architecture.", "arch")
    sensors = data.get("sensors")
    if not isinstance(sensors, list) or not sensors or not all(isinstance(s, str) for s in sensors):
        raise fail("'sensors' must be a non-empty list of sensor names.", "sensors")
    source = data.get("source")
    if not isinstance(source, dict) or set(source) not in ({"bundled"}, {"repo_id", "revision"}):
        raise fail("'source' must be {'bundled': path} or {'repo_id': 'org/name', 'revision': '<40 hex>'}.", "source")
    if "repo_id" in source:
        if not isinstance(source["repo_id"], str) or not REPO_ID_RE.match(source["repo_id"]):
            raise fail(f"repo_id {source['repo_id']!r} is not 'org/name'.", "source.repo_id")
        if not isinstance(source["revision"], str) or not COMMIT_RE.match(source["revision"]):
            raise fail(
                f"revision {source['revision']!r} must be a full 40-hex commit id, not a branch or "
                "tag, so that the files cannot change under the recorded sha256.",
                "source.revision",
            )
    elif not isinstance(source["bundled"], str) or Path(source["bundled"]).is_absolute() or ".." in Path(source["bundled"]).parts:
        raise fail(f"bundled path {source['bundled']!r} must be relative to the package folder.", "source.bundled")
    files = data.get("files")
    if not isinstance(files, dict) or CONFIG_NAME not in files:
        raise fail(f"'files' must list every file with sha256 and size, {CONFIG_NAME!r} included.", "files")
    return ModelEntry(
        model_id=model_id,
        arch=data["arch"],
        sensors=tuple(sensors),
        files=parse_file_records(files, f"{origin}: model {model_id!r}", ManifestError),
        repo_id=source.get("repo_id"),
        revision=source.get("revision"),
        bundled=source.get("bundled"),
        license=str(data.get("license", "")),
        citation=str(data.get("citation", "")),
        description=str(data.get("description", "")),
        origin=origin,
    )


def load_manifest(path: str | Path) -> dict[str, ModelEntry]:
    """Read and validate one manifest file."""
    path = Path(path)
    try:
        data = read_json(path, error=ManifestError, where=f"Manifest {path}")
    except FileNotFoundError:
        raise ManifestError(f"Manifest {path} does not exist.") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"Manifest {path}: expected an object with format_version {FORMAT_VERSION}, got "
            f"{data.get('format_version') if isinstance(data, dict) else type(data).__name__!r}.",
            field="format_version",
        )
    if set(data) != {"format_version", "models"} or not isinstance(data["models"], dict):
        raise ManifestError(f"Manifest {path}: expected exactly the keys 'format_version' and 'models'.", field="models")
    return {mid: _parse_entry(mid, entry, str(path)) for mid, entry in data["models"].items()}


def packaged_manifest_path() -> Path:
    """The manifest shipped with the package: inside it in a wheel, at the repository root in a
    source checkout (an editable install)."""
    for candidate in (_PACKAGE_DIR / MANIFEST_NAME, _PACKAGE_DIR.parent / MANIFEST_NAME):
        if candidate.is_file():
            return candidate
    raise ManifestError(
        f"The package's {MANIFEST_NAME} is missing (looked in {_PACKAGE_DIR} and its parent); "
        "reinstall xstars-models."
    )


_registered: dict[str, ModelEntry] = {}
# The entries of the manifest files, and the key they were read under (see _files_key).
_file_cache: tuple[tuple, dict[str, ModelEntry]] | None = None


def _manifest_paths() -> list[Path]:
    extras = filter(None, os.environ.get(MANIFEST_ENV, "").split(os.pathsep))
    return [packaged_manifest_path(), *map(Path, extras)]


def _files_key(paths: list[Path]) -> tuple:
    """What identifies the manifests' contents without reading them: each path with its inode,
    size, modification and change times in ns (an edit or an atomic replace changes them)."""
    key: list[tuple] = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            key.append((str(path), None))  # load_manifest will name the missing file
        else:
            key.append((str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(key)


def _file_entries() -> dict[str, ModelEntry]:
    """The entries of the packaged manifest and of those ``XSTARS_MANIFEST`` names, parsed once
    and parsed again only when that variable or one of the files changes."""
    global _file_cache
    paths = _manifest_paths()
    key = _files_key(paths)
    if _file_cache is not None and _file_cache[0] == key:
        return _file_cache[1]
    entries = dict(load_manifest(paths[0]))
    for extra in paths[1:]:
        for model_id, entry in load_manifest(extra).items():
            if model_id in entries and entries[model_id] != entry:
                raise ManifestError(
                    f"{extra} redefines model {model_id!r} from {entries[model_id].origin}; choose another id.",
                    field="model_id",
                )
            entries[model_id] = entry
    _file_cache = (key, entries)
    return entries


def _all_entries() -> dict[str, ModelEntry]:
    # Models registered at run time are laid over the files' entries on every look-up, so
    # register_model() takes effect at once without re-reading any file.
    return {**_file_entries(), **_registered}


def register_model(model_id: str, entry: Mapping[str, Any] | ModelEntry, overwrite: bool = False) -> ModelEntry:
    """Add a model to the registry for this process.

    ``entry`` is a :class:`ModelEntry` or a manifest entry dict (as
    :func:`xstars_models.publish.manifest_entry` builds it, or as ``push_to_hub(...,
    manifest_path=...)`` writes it into a manifest file). To make it permanent, put the entry in a
    manifest file and point ``XSTARS_MANIFEST`` at it.
    """
    parsed = _parse_entry(model_id, entry.to_dict() if isinstance(entry, ModelEntry) else dict(entry), "register_model()")
    existing = _all_entries().get(model_id)
    if existing is not None and existing != parsed and not overwrite:
        raise ManifestError(
            f"Model {model_id!r} is already registered (from {existing.origin}); pass {{overwrite}}.",
            field="model_id",
            settings={"overwrite": True},
        )
    _registered[model_id] = parsed
    return parsed


def get_model_entry(model_id: str) -> ModelEntry:
    """The registry entry of ``model_id``; the error lists close matches."""
    entries = _all_entries()
    if model_id in entries:
        return entries[model_id]
    close = difflib.get_close_matches(model_id, list(entries), n=3, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    raise ModelNotFoundError(
        f"Unknown model {model_id!r}.{hint} Registered models: {sorted(entries) or 'none'}. "
        "A Hub repo is given as 'org/name', a local model as a path to its folder."
    )


def is_registered(model_id: str) -> bool:
    return model_id in _all_entries()


def list_models(sensor: str | None = None) -> dict[str, tuple[str, ...]]:
    """Registered model ids with the sensors each has stems for; only those with ``sensor`` if
    given."""
    return {
        mid: entry.sensors
        for mid, entry in sorted(_all_entries().items())
        if sensor is None or sensor in entry.sensors
    }
