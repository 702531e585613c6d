"""Where computation runs: a device named by the user (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
``"mps"``, ``"auto"`` or a :class:`torch.device`) is checked once, before any work, so that a device this
machine lacks is one line naming the value and what to use instead, never torch's traceback from
deep inside the first ``.to(device)``."""

from __future__ import annotations

import torch

from .errors import InvalidOptionError, InvalidTypeError

__all__ = ["DEVICE_AUTO", "DEVICE_TYPES", "check_device"]

# The kinds of device the package computes on.
DEVICE_TYPES = ("cpu", "cuda", "mps")
# The GPU when there is one, as PyTorch users expect: the CLI's default. Resolved by the process
# that computes, so the workers of a cluster whose driver has no GPU still use theirs.
DEVICE_AUTO = "auto"


def check_device(device: str | torch.device | int, field: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device`, after checking that this machine can compute on it.

    Args:
        device: ``"cpu"``, ``"cuda"`` (the current CUDA device), ``"cuda:N"`` (the N-th, from 0),
            ``"mps"`` (Apple-silicon GPU), ``"auto"`` (``"cuda"`` when this machine has a CUDA
            GPU, else ``"cpu"``), a :class:`torch.device` of those, or an int N (torch's shorthand
            for ``"cuda:N"``).
        field: the argument that carried it, by its API name (named in the error).

    Raises:
        InvalidTypeError: ``device`` is neither a string, a :class:`torch.device` nor an int.
        InvalidOptionError: a string torch cannot parse, a device type the package does not
            compute on (``meta`` holds no data; ``xpu``, ``hip``...), or a device that is not
            available here: no CUDA device (no driver, or a torch without CUDA), an index past the
            last CUDA device, no MPS. ``field`` is ``field``; the message names the value and what
            to pass instead.
    """
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise InvalidTypeError(
            f"{field} must be a string such as 'cpu' or 'cuda:0', or a torch.device; got {type(device).__name__}.",
            field=field,
        )
    if device == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # As the user wrote it: a torch.device by its string ("cuda:1"), not its repr.
    settings: dict[str, object] = {field: str(device) if isinstance(device, torch.device) else device}
    name = "{" + field + "}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):  # torch's words for a string it cannot parse
        raise InvalidOptionError(
            f"{name} is not a device: use 'cpu', 'cuda', 'cuda:N' (N: a GPU's index from 0), 'mps' or 'auto'.",
            field=field, settings=settings,
        ) from None
    if parsed.type == "meta":
        raise InvalidOptionError(
            f"{name}: meta tensors have shapes but no data, so nothing can be computed on them; use 'cpu' "
            "or a GPU ('cuda', 'mps').",
            field=field, settings=settings,
        )
    if parsed.type not in DEVICE_TYPES:
        raise InvalidOptionError(
            f"{name}: xstars_models computes on 'cpu', 'cuda[:N]' or 'mps', not on {parsed.type!r} devices.",
            field=field, settings=settings,
        )
    if parsed.type == "cuda":
        _check_cuda(parsed, name, field, settings)
    elif parsed.type == "mps" and not (torch.backends.mps.is_available() and parsed.index in (None, 0)):
        why = (
            "this machine has one MPS device, mps:0"
            if torch.backends.mps.is_available()
            else "MPS (the Apple-silicon GPU) is not available on this machine (torch.backends.mps.is_available() is False)"
        )
        raise InvalidOptionError(f"{name}: {why}; use 'cpu' instead.", field=field, settings=settings)
    return parsed


def _check_cuda(device: torch.device, name: str, field: str, settings: dict[str, object]) -> None:
    if not torch.cuda.is_available():
        why = (
            "this torch was built without CUDA (torch.version.cuda is None)"
            if torch.version.cuda is None
            else "no CUDA device is available on this machine (torch.cuda.is_available() is False: no GPU, or no driver)"
        )
        raise InvalidOptionError(f"{name}: {why}; use 'cpu' instead.", field=field, settings=settings)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InvalidOptionError(
            f"{name}: this machine has {count} CUDA device{'s' if count > 1 else ''} (cuda:0"
            + (f" to cuda:{count - 1}" if count > 1 else "")
            + "); use one of them or 'cpu'.",
            field=field, settings=settings,
        )
