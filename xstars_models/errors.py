"""Exceptions users can catch by kind. Each message names the file, sensor or key at fault and
what to do about it.

Every error the package raises on purpose for bad input, bad files or an unusable environment
derives from :class:`XStarsError` *and* from the builtin that says what went wrong, so
``except XStarsError`` catches all of them and ``except ValueError`` keeps catching the ones that
are bad values. The ``xstars`` command prints these as one-line messages; anything else is a bug
and keeps its traceback. Warnings point at the user's line, however deep in the package they are
raised: pass :func:`user_stacklevel` as ``stacklevel``.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "BackendUnavailableError",
    "CheckpointFormatError",
    "ChecksumError",
    "HubServerError",
    "ManifestError",
    "MissingExtraError",
    "ModelNotFoundError",
    "OfflineFilesMissingError",
    "PushIncompleteError",
    "SensorMismatchError",
    "StateDictMismatchError",
    "XStarsError",
    "user_stacklevel",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Modules whose frames only forward a call (context-manager and no_grad/inference_mode decorators);
# a warning pointing into them would tell the user nothing.
_FORWARDING_MODULES = frozenset({"contextlib", "functools", "torch.utils._contextlib"})


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function point at the first
    line outside the package (and outside the wrappers that only forward calls): the user's code,
    whichever public function and however many internal calls led there."""
    frame = sys._getframe(1)  # the function about to warn
    level = 1
    while frame.f_back is not None and (
        os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR)
        or frame.f_globals.get("__name__") in _FORWARDING_MODULES
    ):
        frame = frame.f_back
        level += 1
    return level


class XStarsError(Exception):
    """Base of every error the package raises deliberately; its message says what to do."""


class BackendUnavailableError(XStarsError, RuntimeError):
    """This installation of torch lacks a kernel or backend a requested option needs."""


class CheckpointFormatError(XStarsError, ValueError):
    """A file is not an official X-STARS training checkpoint, is unreadable, or holds Python
    objects that safe (``weights_only``) loading refuses."""


class ChecksumError(XStarsError, RuntimeError):
    """A file's sha256 or size differs from the one recorded in the manifest or config."""


class HubServerError(XStarsError, ConnectionError):
    """The Hub (``HF_ENDPOINT``) failed to serve a request: an HTTP error status after the client's
    retries, a timeout or a dropped connection. Says which file and what the server did."""


class ManifestError(XStarsError, ValueError):
    """A weights manifest (or one entry of it) is malformed."""


class MissingExtraError(XStarsError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class ModelNotFoundError(XStarsError, ValueError):
    """An id is neither a registered model, a local folder, nor a Hub repo id."""


class OfflineFilesMissingError(XStarsError, FileNotFoundError):
    """Files needed to load a model are not in the local cache and downloading is not allowed."""


class PushIncompleteError(XStarsError, RuntimeError):
    """A push committed to the Hub but a later step (writing the manifest entry) failed; the
    message names the commit that landed."""


class SensorMismatchError(XStarsError, ValueError):
    """A data set's images are not named as the model's sensors."""


class StateDictMismatchError(XStarsError, RuntimeError):
    """Weights do not match the architecture: missing, unexpected or mis-shaped tensors."""
