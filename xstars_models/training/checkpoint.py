"""Training checkpoints: one ``last.pt`` per run directory, replaced atomically, so a run killed
at any moment resumes from the last complete checkpoint; what resuming may and may not change."""

from __future__ import annotations

import io
import pickle
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
]

CHECKPOINT_NAME = "last.pt"

# Settings a resumed run may change: how far it goes (``steps``, never below the checkpoint's
# step), how it computes (``precision``), how it loads data and how often it saves. Every other
# setting shapes what the weights become, so changing it mid-run would make the result belong to
# neither setting while the model's record names only one.
RESUMABLE_CHANGES = frozenset({"steps", "precision", "num_workers", "checkpoint_every"})

_REQUIRED_KEYS = ("step", "modules", "optimizer", "rng", "config")


class CheckpointUnreadableError(XStarsError, ValueError):
    """A run's ``last.pt`` cannot be read back (truncated, corrupt, or not a training checkpoint)."""


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


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint of ``run_dir``, or ``None`` if the run has none yet.

    Raises:
        CheckpointUnreadableError: ``last.pt`` exists but is not a readable training checkpoint.
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # What torch.load raises for a cut or scrambled file: the zip reader's RuntimeError, the
    # unpickler's errors, or EOF in the legacy format.
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
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
