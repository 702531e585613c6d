"""Exceptions users can catch by kind. Each message names the file, sensor or key at fault and
what to do about it.

Every error the package raises on purpose for bad input, bad files or an unusable environment
derives from :class:`XStarsError` *and* from the builtin that says what went wrong, so
``except XStarsError`` catches all of them and ``except ValueError`` keeps catching the ones that
are bad values. Each carries ``field``: the argument, option or key at fault, as the API names it
(``"tile"``, ``"msad.alpha"``), or ``None`` when no single one is; callers and tests branch
on the type and the field, never on the message. The ``xstars`` command prints these as one-line
messages naming the flag that sets the field; anything else is a bug and keeps its traceback.

Warnings point at the user's line, however deep in the package they are raised: pass
:func:`user_stacklevel` as ``stacklevel``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "BackendUnavailableError",
    "CheckpointFormatError",
    "ChecksumError",
    "ConfigError",
    "HubServerError",
    "InputReadError",
    "InvalidInputError",
    "InvalidOptionError",
    "InvalidTypeError",
    "ManifestError",
    "MissingExtraError",
    "ModelNotFoundError",
    "NetworkTimeoutError",
    "OfflineFilesMissingError",
    "OutputLockedError",
    "OutputWriteError",
    "PushIncompleteError",
    "SensorMismatchError",
    "StateDictMismatchError",
    "UnknownOptionError",
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
    """Base of every error the package raises deliberately; its message says what to do.

    Args:
        message: what is wrong, with the value at fault and the fix. Where it names a setting
            the user can pass (the fix, or the cause), it writes ``{name}`` and gives the value in
            ``settings``: the API shows ``name=value``, the ``xstars`` command its own flag.
        field: the argument, option or config key at fault, by its API name (dotted inside a
            configuration: ``"msad.alpha"``); ``None`` when no single one is.
        settings: the values of the settings the message names, by keyword.
    """

    def __init__(self, message: str = "", *, field: str | None = None, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.settings = dict(settings or {})

    def __str__(self) -> str:
        return self.describe(api_setting)

    def describe(self, setting: Callable[[str, Any], str]) -> str:
        """The message with each setting it names written by ``setting(name, value)``."""
        text = str(self.args[0]) if self.args else ""
        # Only the placeholders of the named settings are filled: the rest of the message (paths,
        # reprs) may hold braces of its own.
        for name, value in self.settings.items():
            text = text.replace("{" + name + "}", setting(name, value))
        return text

    def __reduce__(self) -> tuple:
        # Pickled across processes (Dask workers, DataLoader workers) with the field kept: the
        # default reduction would rebuild the error from its message alone.
        return (type(self), self.args, {"field": self.field, "settings": self.settings})


def api_setting(name: str, value: Any) -> str:
    """How a message names a setting for the Python API: as the keyword argument, ``resume=False``."""
    return f"{name}={value!r}"


class InvalidOptionError(XStarsError, ValueError):
    """An argument or option has a value the function does not accept (``field``: its name)."""


class InvalidInputError(XStarsError, ValueError):
    """Imagery, an array, a file's contents or a data set cannot be used as given (``field``: the
    argument that carried it, e.g. ``"images"``, ``"source"``, ``"pairs"``)."""


class ConfigError(XStarsError, ValueError):
    """A configuration (``config.json``, a training config, a sensor spec) is malformed or
    inconsistent, or a setting does not apply to the chosen recipe (``field``: the dotted key)."""


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


class InvalidTypeError(XStarsError, TypeError):
    """An argument is of a type the function does not take, e.g. a string where a list of names
    belongs (``field``: its name)."""


class UnknownOptionError(InvalidOptionError, TypeError):
    """A keyword argument the function does not take (``field``: that keyword); the message lists
    the ones it does. Also a ``TypeError``, what Python raises for an unexpected keyword."""


class NetworkTimeoutError(XStarsError, TimeoutError):
    """A server did not answer within the package's network limits (``field``: the input or
    setting whose URL it was); the message names the URL, the limit and the environment variable
    that raises it (:mod:`xstars_models.io.network`)."""


class OutputLockedError(XStarsError, OSError):
    """Another process is writing the same output: its lock file (``<output>.lock``) is held. The
    message names that process (pid, host, start time in UTC); ``field``: the argument that gives
    the output (:mod:`xstars_models.io.lock`)."""


class InputReadError(XStarsError, OSError):
    """Reading an input failed part-way: a truncated or damaged file, a server that closed the
    connection early. The message names the input and the rows that could not be read, with the
    reader's own message (GDAL's "Read failed" names neither); ``field``: the argument that
    carried the input."""


class OutputWriteError(XStarsError, OSError):
    """Writing an output failed: a full disk, a quota, a file size limit, a read-only folder. The
    message names the cause and the file; ``errno`` is the operating system's error number when it
    is known (``errno.ENOSPC``: no space left), ``filename`` the file being written; ``field``: the
    argument that gives the output."""

    def __init__(
        self, message: str = "", *, errno: int | None = None, filename: str | None = None, field: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, field=field, settings=settings)
        self.errno = errno
        self.filename = filename

    def __reduce__(self) -> tuple:
        return (type(self), self.args, {"field": self.field, "settings": self.settings, "errno": self.errno,
                                        "filename": self.filename})
