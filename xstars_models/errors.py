"""Exceptions users can catch by kind. Each message names the file, sensor or key at fault and
what to do about it."""

from __future__ import annotations

__all__ = [
    "CheckpointFormatError",
    "ChecksumError",
    "HubServerError",
    "ManifestError",
    "ModelNotFoundError",
    "OfflineFilesMissingError",
    "PushIncompleteError",
    "StateDictMismatchError",
]


class CheckpointFormatError(ValueError):
    """A file is not an official X-STARS training checkpoint, is unreadable, or holds Python
    objects that safe (``weights_only``) loading refuses."""


class ChecksumError(RuntimeError):
    """A file's sha256 or size differs from the one recorded in the manifest or config."""


class HubServerError(ConnectionError):
    """The Hub (``HF_ENDPOINT``) failed to serve a request: an HTTP error status after the client's
    retries, a timeout or a dropped connection. Says which file and what the server did."""


class ManifestError(ValueError):
    """A weights manifest (or one entry of it) is malformed."""


class ModelNotFoundError(ValueError):
    """An id is neither a registered model, a local folder, nor a Hub repo id."""


class OfflineFilesMissingError(FileNotFoundError):
    """Files needed to load a model are not in the local cache and downloading is not allowed."""


class PushIncompleteError(RuntimeError):
    """A push committed to the Hub but a later step (writing the manifest entry) failed; the
    message names the commit that landed."""


class StateDictMismatchError(RuntimeError):
    """Weights do not match the architecture: missing, unexpected or mis-shaped tensors."""
