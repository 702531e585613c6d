"""Training checkpoints: one ``last.pt`` per run directory, replaced atomically, so a run killed
at any moment resumes from the last complete checkpoint; what resuming may and may not change."""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import XStarsError
from ..serialization import atomic_write_bytes
from .config import TrainConfig, dotted_settings

__all__ = [
    "CHECKPOINT_NAME",
    "RESUMABLE_CHANGES",
    "CheckpointExistsError",
    "CheckpointUnreadableError",
    "ResumeMismatchError",
    "check_resume_config",
    "checkpoint_path",
    "load_checkpoint",
    "remove_partial_saves",
    "save_checkpoint",
    "unsafe_objects",
]

CHECKPOINT_NAME = "last.pt"

# Settings a resumed run may change: how far it goes (``steps``, never below the checkpoint's
# step), how it computes (``precision``), how it loads data and how often it saves. Every other
# setting shapes what the weights become, so changing it mid-run would make the result belong to
# neither setting while the model's record names only one.
RESUMABLE_CHANGES = frozenset({"steps", "precision", "num_workers", "checkpoint_every"})

_REQUIRED_KEYS = ("step", "modules", "optimizer", "rng", "config")


class CheckpointUnreadableError(XStarsError, ValueError):
    """A run's ``last.pt`` cannot be read back (truncated, corrupt, not a training checkpoint, or
    holding Python objects that safe loading refuses: code, which is never run)."""


class ResumeMismatchError(XStarsError, ValueError):
    """A run's ``last.pt`` was written with other settings or for another model than the ones
    given to resume it."""


class CheckpointExistsError(XStarsError, FileExistsError):
    """A run folder already holds a checkpoint and the run was not asked to resume it."""


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``run_dir/last.pt`` through a temporary file renamed into place."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = checkpoint_path(run_dir)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def remove_partial_saves(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint saves that never finished (a process killed
    between writing and renaming leaves one, as large as a checkpoint). Returns what was deleted.
    Only safe while no other process trains in ``run_dir``."""
    leftovers = sorted(Path(run_dir).glob(f".{CHECKPOINT_NAME}.*.tmp"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _unreadable(path: Path, reason: str) -> CheckpointUnreadableError:
    return CheckpointUnreadableError(
        f"Cannot resume from {path}: {reason}. Checkpoints are replaced atomically, so it was damaged "
        "after it was written (a copy cut short, a full disk, another program). Restore it from a "
        "backup, or delete it to start the run again from step 0 (or train with resume off in a new folder)."
    )


def _holds_code(path: Path, unsafe: list[str]) -> CheckpointUnreadableError:
    return CheckpointUnreadableError(
        f"Cannot resume from {path}: refused to load it because it holds code: the Python objects {unsafe}, "
        "which safe loading (torch.load(weights_only=True)) does not allow besides tensors and plain containers; "
        "nothing in it was run. A checkpoint written by training holds no such object, so this file was "
        "replaced or made by something else: do not load it with weights_only=False. Delete it to start the "
        "run again from step 0, or train in a new folder."
    )


# The opcodes that push a string a STACK_GLOBAL may take as its module or name.
_STRING_OPCODES = frozenset(
    {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)


def unsafe_objects(path: Path) -> list[str]:
    """The Python objects (``module.name``) in the pickle of the checkpoint at ``path`` that safe
    loading refuses, found by reading the pickle's opcodes, never by running it; empty when there
    are none or the file cannot be read that far (truncated, not a pickle)."""
    try:
        if zipfile.is_zipfile(path):  # the format of torch.save: torch lists them itself
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with path.open("rb") as handle:
            found = _pickle_globals(handle)
    except (ValueError, RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError):
        return []
    # A file in the format before zip (or a bare pickle): compared with what torch itself compares
    # a zip checkpoint's objects with (its allowlist has no public accessor).
    allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    allowed |= set(torch._weights_only_unpickler._get_user_allowed_globals())
    return sorted({name for name in found if name not in allowed})


def _pickle_globals(handle: io.BufferedReader) -> list[str]:
    """The objects (``module.name``) the first pickle in ``handle`` refers to: the arguments of
    its GLOBAL and INST opcodes, and for STACK_GLOBAL the last two strings pushed (written out or
    fetched from the memo) before it."""
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    memoized = 0  # MEMOIZE stores under the count of objects memoized so far
    top: str | None = None  # the string on top of the stack, when the last opcode left one there
    for opcode, arg, _ in pickletools.genops(handle):
        name, left = opcode.name, None
        slot = arg if isinstance(arg, int) else -1  # the memo index of GET and PUT opcodes
        if name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif name in _STRING_OPCODES or (name in ("BINGET", "LONG_BINGET", "GET") and slot in memo):
            left = str(arg) if name in _STRING_OPCODES else memo[slot]
            strings.append(left)
        elif name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):  # the stack is unchanged
            if top is not None:
                memo[memoized if name == "MEMOIZE" else slot] = top
            memoized += name == "MEMOIZE"
            left = top
        top = left
    return names


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint of ``run_dir``, or ``None`` if the run has none yet.

    Raises:
        CheckpointUnreadableError: ``last.pt`` exists but is not a readable training checkpoint:
            truncated or corrupt, or holding code (Python objects besides tensors and plain
            containers, refused by ``torch.load(weights_only=True)`` and never run; the message
            names them).
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):  # the disk or the machine, not the file's contents
        raise
    # torch.load reports a cut or scrambled file with many types: the zip reader's RuntimeError,
    # the unpickler's errors, EOFError or IndexError in the format before zip. Safe loading refuses
    # objects with an UnpicklingError too (reworded between torch releases), so the pickle's own
    # opcodes tell code from damage.
    except Exception as err:
        unsafe = unsafe_objects(path) if isinstance(err, pickle.UnpicklingError) else []
        if unsafe:
            raise _holds_code(path, unsafe) from None
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _unreadable(path, f"it is truncated or corrupt ({first_line})") from err
    if not isinstance(state, dict) or not all(key in state for key in _REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise _unreadable(path, f"it is not a training checkpoint (needs keys {list(_REQUIRED_KEYS)}, found {found})")
    return state


_ABSENT = object()


def _comparable(value: Any) -> Any:
    # A config that went through JSON has lists where the dataclass has tuples.
    return tuple(_comparable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _shown(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(_comparable(value))


def check_resume_config(saved: Mapping[str, Any], current: TrainConfig, step: int, path: Path) -> None:
    """Refuse to resume a checkpoint at ``step``, written with settings ``saved`` (as
    :meth:`TrainConfig.to_dict` writes them, or flat as before the settings were grouped), with
    settings ``current`` that differ in more than :data:`RESUMABLE_CHANGES` or stop before
    ``step``. A setting added after the checkpoint was written compares as its default (what the
    run used).

    Raises:
        ResumeMismatchError: listing every differing setting by its dotted name, both values.
    """
    before = {**TrainConfig.defaults(), **dotted_settings(saved)}
    now = current.dotted()
    problems = []
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name, _ABSENT), now.get(name, _ABSENT)
        if name not in RESUMABLE_CHANGES and _comparable(old) != _comparable(new):
            problems.append(f"  {name}: {_shown(old)} in the checkpoint, {_shown(new)} now")
    if current.steps < step:
        problems.append(f"  steps={current.steps} is below the checkpoint's step {step}")
    if problems:
        raise ResumeMismatchError(
            "\n".join([
                f"Cannot resume from {path} (step {step}): it was written with other training settings:",
                *problems,
                "Resume with the checkpoint's settings, or start a new run in another folder. Only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume (steps only upward).",
            ])
        )
