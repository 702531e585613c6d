"""Training checkpoints: one ``last.pt`` per run directory, replaced atomically, so a run killed
at any moment resumes from the last complete checkpoint."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ..serialization import atomic_write_bytes

__all__ = ["CHECKPOINT_NAME", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "last.pt"


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(run_dir) / CHECKPOINT_NAME
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint of ``run_dir``, or ``None`` if the run has none yet."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
