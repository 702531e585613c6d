"""Where a model's files come from: a local folder, a registry id (bundled in the package or pinned
on the Hub), or a Hub repo id. Downloads go through ``huggingface_hub`` (its cache, its
``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` handling); this module only decides which files to ask
for and which sha256 each must have. Building a model from the files is :mod:`.model`'s job."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    FileMetadataError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

try:  # the HTTP library huggingface_hub is built on: httpx2 from 2.0, httpx before
    import httpx2 as _http
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    import httpx as _http  # type: ignore[no-redef]

from .config import CONFIG_NAME, FileRecord, XStarsConfig
from .encoder import is_vit_arch
from .errors import (
    ChecksumError,
    ConfigError,
    HubServerError,
    InvalidOptionError,
    ManifestError,
    ModelNotFoundError,
    OfflineFilesMissingError,
)
from .io import read_json
from .io.network import network_limits
from .manifest import COMMIT_RE, REPO_ID, ModelEntry, get_model_entry, is_registered
from .serialization import read_verified

__all__ = ["NETWORK_ERRORS", "HubOptions", "ResolvedModel", "describe_network_failure", "resolve_model"]

# A Hub model named with an optional revision: ``org/name`` or ``org/name@v2``.
_REPO_REF = re.compile(rf"^(?P<repo>{REPO_ID})(@(?P<rev>[A-Za-z0-9._/-]+))?$")


@dataclass(frozen=True, kw_only=True)
class HubOptions:
    """How to fetch a model's files from the Hub, with ``huggingface_hub``'s names and meanings.

    Attributes:
        revision: branch, tag or commit of a Hub repo; ``None`` for ``main`` (or the commit a
            registry id is pinned to).
        cache_dir: Hub cache folder; ``None`` for huggingface_hub's (``HF_HUB_CACHE``).
        local_files_only: use only the local cache, never the network.
        token: Hub token, ``False`` for none, ``None`` for the stored one.
        force_download: download every file again, replacing the cached copies.
    """

    revision: str | None = None
    cache_dir: str | Path | None = None
    local_files_only: bool = False
    token: str | bool | None = None
    force_download: bool = False

    def __post_init__(self) -> None:
        if self.revision is not None and not isinstance(self.revision, str):
            raise InvalidOptionError(
                f"revision must be a branch, tag or commit id (a string), got {self.revision!r}.", field="revision"
            )


@dataclass(frozen=True)
class ResolvedModel:
    """A model's files on local disk with the records they must match.

    Attributes:
        config: the parsed, verified ``config.json``.
        paths: local path of every weight file, by file name.
        records: sha256/size each weight file must have.
        source: how the model was named (``registry:ID``, ``hub:REPO``, ``local:PATH``).
        revision: the Hub commit the files come from, when they come from the Hub.
        repair: what to do when a file fails its sha256 check, for this kind of source (pass
            it to :func:`~.serialization.read_verified`).
    """

    config: XStarsConfig
    paths: Mapping[str, Path]
    records: Mapping[str, FileRecord]
    source: str
    revision: str | None = None
    repair: str | None = None


def _hub_repair(name: str) -> str:
    # The cache path is a link to a blob named after the *expected* hash: deleting the link and
    # downloading again re-links the same bad blob. Only a forced download replaces the blob.
    return (
        f"Download it again, replacing the cached copy: `xstars download {name} --force-download` or "
        f"XStars.from_pretrained({name!r}, force_download=True) (deleting the cached path is not enough: "
        "it links to the same stored blob). If that fails the same way, the file on the Hub itself "
        "differs from the recorded sha256."
    )


_POSITIVE_INT_KWARGS = ("patch_size", "embed_dim", "depth", "num_heads")


def _check_arch(config: XStarsConfig, where: str) -> XStarsConfig:
    """Refuse a config whose trunk timm cannot build as an X-STARS ViT, naming the field, before
    any weights are read (timm would fail later with a TypeError from deep inside)."""
    arch = config.arch
    for known, kind in ((timm.is_model, "architecture"), (is_vit_arch, "VisionTransformer")):
        if not known(arch):
            raise ConfigError(
                f"{where}: field 'arch' {arch!r} is not a timm {kind}; X-STARS models use a timm ViT such as "
                "'vit_small_patch16_224'.",
                field="arch",
            )
    for key in _POSITIVE_INT_KWARGS:
        value = config.arch_kwargs.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(
                f"{where}: field 'arch_kwargs.{key}' must be a positive whole number, got {value!r}.",
                field=f"arch_kwargs.{key}",
            )
    size = config.arch_kwargs.get("img_size")
    sides = size if isinstance(size, list) and len(size) == 2 else [size]
    if size is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
        raise ConfigError(
            f"{where}: field 'arch_kwargs.img_size' must be a positive whole number (or two), got {size!r}.",
            field="arch_kwargs.img_size",
        )
    return config


def _from_folder(folder: Path) -> ResolvedModel:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelNotFoundError(f"{folder} is a folder but has no {CONFIG_NAME}; is it a saved X-STARS model?")
    config = _check_arch(XStarsConfig.from_file(config_path), str(config_path))
    paths = {name: folder / name for name in config.weight_files}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: config.json lists weight files {missing} that are not in the folder.")
    repair = f"Replace it with a good copy: save or download the model into {folder} again."
    return ResolvedModel(config, paths, {n: config.files[n] for n in paths}, f"local:{folder}", repair=repair)


NETWORK_ERRORS = (HfHubHTTPError, _http.HTTPError, FileMetadataError)
"""What the Hub client raises when the server or the network fails (after its own retries)."""


def describe_network_failure(err: BaseException) -> str:
    """What went wrong in a failed Hub request, in words: the HTTP status, a timeout, a refused or
    dropped connection."""
    if isinstance(err, HfHubHTTPError) and getattr(err, "response", None) is not None:
        return f"the server answered HTTP {err.response.status_code}"
    if isinstance(err, _http.TimeoutException):
        return f"the server did not answer in time ({type(err).__name__})"
    if isinstance(err, _http.ConnectError):
        return f"could not connect ({err})"
    if isinstance(err, _http.HTTPError):
        return f"the connection failed ({type(err).__name__}: {err})"
    return f"{type(err).__name__}: {err}"


class _HubFiles:
    """Downloads files of one repo at one revision, collecting those missing from an offline cache
    so the error can name all of them at once. A failing server stops at the first file."""

    def __init__(self, repo_id: str, revision: str | None, options: HubOptions) -> None:
        self.repo_id, self.revision = repo_id, revision
        self.options = options

    def download(self, filenames: Iterable[str], name: str) -> dict[str, Path]:
        """Local paths of ``filenames`` (of the model called ``name`` in messages)."""
        paths: dict[str, Path] = {}
        missing: list[str] = []
        for filename in filenames:
            path = self._get(filename)
            if path is None:
                missing.append(filename)
            else:
                paths[filename] = path
        if missing:
            raise OfflineFilesMissingError(
                f"Files {missing} of {name} (Hub repo {self.repo_id!r}, revision "
                f"{self.revision or 'main'}) are not in the local cache and downloading is off "
                "({local_files_only} or HF_HUB_OFFLINE=1). Download them once while online: "
                f"`xstars download {name}` or XStars.from_pretrained({name!r}).",
                field="local_files_only",
                settings={"local_files_only": True},
            )
        return paths

    def _get(self, filename: str) -> Path | None:
        """The file's local path; ``None`` when it is not cached and downloading is off."""
        options = self.options
        if not (options.local_files_only or constants.is_offline_mode() or self._cached_at_commit(filename)):
            self._wait_for_server(filename)
        try:
            path = Path(
                hf_hub_download(
                    self.repo_id, filename, revision=self.revision, cache_dir=options.cache_dir,
                    local_files_only=options.local_files_only, token=options.token,
                    force_download=options.force_download, library_name="xstars-models",
                )
            )
        except LocalEntryNotFoundError as err:
            cause = err.__cause__
            if options.local_files_only or constants.is_offline_mode() or isinstance(cause, OfflineModeIsEnabled):
                return None
            # The client reports a server that failed (5xx, timeout) as a file missing from the
            # cache; say what actually happened.
            raise self._server_error(filename, cause or err) from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(
                f"Hub repo {self.repo_id!r} not found (or private: pass token=...)."
            ) from None
        except RevisionNotFoundError:
            raise ModelNotFoundError(
                f"Hub repo {self.repo_id!r} has no revision {self.revision!r}.", field="revision"
            ) from None
        except EntryNotFoundError:
            raise ModelNotFoundError(
                f"Hub repo {self.repo_id!r} at revision {self.revision or 'main'} has no file {filename!r}; "
                "is it an X-STARS model?"
            ) from None
        except NETWORK_ERRORS as err:
            raise self._server_error(filename, err) from None
        except ValueError as err:
            # force_download=True turns every failed metadata request into this ValueError.
            if isinstance(err.__cause__, NETWORK_ERRORS):
                raise self._server_error(filename, err.__cause__) from None
            raise
        if not COMMIT_RE.match(self.revision or "") and COMMIT_RE.match(path.parent.name):
            # Pin the rest of the files to the commit the first one came from, so a push that lands
            # between two downloads (of ``main`` or any branch) cannot mix files of two commits.
            self.revision = path.parent.name
        return path

    def _cached_at_commit(self, filename: str) -> bool:
        """Whether the Hub client will serve ``filename`` from the cache without a request (a
        commit revision whose file is cached)."""
        if self.options.force_download or not COMMIT_RE.match(self.revision or ""):
            return False
        return isinstance(try_to_load_from_cache(self.repo_id, filename, self.options.cache_dir, self.revision), str)

    def _wait_for_server(self, filename: str) -> None:
        """Ask for ``filename``'s metadata within the package's network limits
        (:mod:`xstars_models.io.network`) before the Hub client downloads it.

        Why: the client retries a metadata request that timed out six more times with its own
        60 s limit, which no setting shortens, so a stalled server held a run for about 6.5
        minutes. Here a server that does not answer ends the run after the limits; any answer,
        even an error, is left to the client, which reports it as before.

        Raises:
            HubServerError: every attempt timed out; the message names the URL and the limits.
        """
        limits = network_limits()
        url = hf_hub_url(self.repo_id, filename, revision=self.revision)
        for _ in limits.attempts():
            try:
                get_hf_file_metadata(url, token=self.options.token, timeout=limits.timeout_s, library_name="xstars-models")
                return
            except _http.TimeoutException:
                continue
            except Exception:  # an answer or a refused connection: the client's own handling reports it
                return
        attempts = f"{limits.retries + 1} attempt" + ("s" if limits.retries else "")
        raise self._server_error(filename, None, f"{url} did not answer in time ({attempts}; {limits.describe()})")

    def _server_error(self, filename: str, err: BaseException | None, detail: str | None = None) -> HubServerError:
        cause = detail if err is None else describe_network_failure(err)
        return HubServerError(
            f"Downloading {filename!r} of Hub repo {self.repo_id!r} (revision {self.revision or 'main'}) from "
            f"{constants.ENDPOINT} failed: {cause}. Nothing was loaded and no further "
            "file was requested; files already downloaded stay in the cache. This is the server or the "
            "network, not your cache or settings: try again later."
        )


def _from_registry(entry: ModelEntry, options: HubOptions) -> ResolvedModel:
    revision = options.revision
    if revision is not None and revision != entry.revision:
        raise InvalidOptionError(
            f"Registry model {entry.model_id!r} is pinned to revision {entry.revision or 'bundled'}; "
            f"to load {{revision}}, name the Hub repo instead: {entry.repo_id or 'org/name'}@{revision}.",
            field="revision",
            settings={"revision": revision},
        )
    if entry.bundled_path is not None:
        folder = entry.bundled_path
        repair = "The installation is damaged: reinstall xstars-models."
        paths = {name: folder / name for name in entry.files}
        absent = [name for name, path in paths.items() if not path.is_file()]
        if absent:
            raise FileNotFoundError(
                f"Bundled model {entry.model_id!r}: files {absent} are missing from {folder}; "
                "the installation is incomplete, reinstall xstars-models."
            )
    else:
        assert entry.repo_id is not None  # an entry without a bundled folder names its repo (_parse_entry)
        paths = _HubFiles(entry.repo_id, entry.revision, options).download(entry.files, entry.model_id)
        repair = _hub_repair(entry.model_id)
    where = f"{entry.model_id}/{CONFIG_NAME}"
    verified = read_verified(paths[CONFIG_NAME], entry.files[CONFIG_NAME], where, repair)
    config = _check_arch(XStarsConfig.from_dict(read_json(where, verified), source=where), where)
    _check_entry_matches_config(entry, config, where)
    for name in config.weight_files:
        if name not in entry.files:
            raise ManifestError(
                f"{entry.origin}: model {entry.model_id!r} lists no sha256 for {name!r}.", field=f"files.{name}"
            )
        if config.files[name] != entry.files[name]:
            raise ChecksumError(
                f"{entry.model_id}: config.json records {name} as sha256 {config.files[name].sha256} "
                f"but the manifest ({entry.origin}) says {entry.files[name].sha256}."
            )
    weights = {name: paths[name] for name in config.weight_files}
    return ResolvedModel(
        config, weights, {n: entry.files[n] for n in weights}, f"registry:{entry.model_id}", entry.revision, repair
    )


def _check_entry_matches_config(entry: ModelEntry, config: XStarsConfig, where: str) -> None:
    """The manifest's ``arch`` and ``sensors`` (shown by ``xstars list``/``info`` before anything
    is downloaded) must describe the model its config.json builds."""
    if entry.arch != config.arch or list(entry.sensors) != list(config.sensors):
        raise ManifestError(
            f"{entry.origin}: model {entry.model_id!r} is listed with arch {entry.arch!r} and sensors "
            f"{list(entry.sensors)}, but its {where} has arch {config.arch!r} and sensors "
            f"{list(config.sensors)}. Correct the manifest entry (publish.manifest_entry writes it from the model).",
            field="arch" if entry.arch != config.arch else "sensors",
        )


def _from_hub(repo_id: str, revision: str | None, options: HubOptions) -> ResolvedModel:
    hub = _HubFiles(repo_id, revision, options)
    name = repo_id if revision is None else f"{repo_id}@{revision}"
    config_path = hub.download([CONFIG_NAME], name)[CONFIG_NAME]
    config = _check_arch(XStarsConfig.from_file(config_path), f"{name}/{CONFIG_NAME}")
    paths = hub.download(config.weight_files, name)
    return ResolvedModel(
        config, paths, {n: config.files[n] for n in paths}, f"hub:{repo_id}", hub.revision, _hub_repair(name)
    )


def resolve_model(name_or_path: str | Path, options: HubOptions | None = None) -> ResolvedModel:
    """Find (downloading if needed and allowed) the files of a model.

    ``name_or_path`` is tried as, in order: an existing local folder, a registry id, a Hub repo id
    ``org/name`` or ``org/name@revision``. ``options`` say how to download (default: ``main``,
    the default cache, network allowed). The weight files are *not* read here; the records they
    must match travel with the paths.
    """
    options = options or HubOptions()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _from_folder(path)
    name = str(name_or_path)
    match = _REPO_REF.match(name)
    if is_registered(name) or match is None:
        # A name that is neither a registry id nor a Hub repo id: get_model_entry raises
        # ModelNotFoundError with close matches.
        return _from_registry(get_model_entry(name), options)
    repo_id, ref = match["repo"], match["rev"]
    revision = options.revision
    if ref is not None and revision is not None and ref != revision:
        raise InvalidOptionError(
            f"Two revisions given for {repo_id!r}: {ref!r} in the name and {{revision}}.",
            field="revision",
            settings={"revision": revision},
        )
    return _from_hub(repo_id, ref or revision, options)
