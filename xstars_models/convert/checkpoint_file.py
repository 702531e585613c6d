"""Reading an official X-STARS training checkpoint safely: ``torch.load(weights_only=True)`` with
``argparse.Namespace`` allowed, the refused Python objects named, the networks' state dicts and
the run's arguments checked, and the backbone's tensors under timm's names."""

from __future__ import annotations

import argparse
import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError

__all__ = ["args_of", "backbone_state", "load_checkpoint", "network_state", "unsafe_globals"]

logger = logging.getLogger(__name__)

def load_checkpoint(path: Path) -> dict[str, Any]:
    # mmap keeps the optimizer state and heads, which are thrown away, out of memory; it needs the
    # zip format torch.save has written since PyTorch 1.6, older files are read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, MemoryError):
        raise
    except pickle.UnpicklingError:
        # torch raises this type for every refusal of safe loading and rewords the message between
        # releases, so the objects at fault are found by disassembling the pickle, not by parsing text.
        unsafe = unsafe_globals(path)
        if unsafe:
            raise CheckpointFormatError(
                f"{path}: refused to load: it contains the Python objects {unsafe}, which safe loading "
                "(torch.load(weights_only=True)) does not allow besides tensors, plain containers and "
                "argparse.Namespace; nothing in it was run. An official X-STARS checkpoint holds no such object.",
                field="checkpoint",
            ) from None
        raise CheckpointFormatError(
            f"{path}: safe loading (torch.load(weights_only=True)) refused it (pickle.UnpicklingError); nothing "
            "in it was run. The file is damaged, is not a torch.save file, or holds Python objects besides "
            "tensors, plain containers and argparse.Namespace.",
            field="checkpoint",
        ) from None
    except Exception as err:  # torch reports a damaged or foreign file with many exception types
        raise CheckpointFormatError(
            f"{path} is not a readable torch.save file ({type(err).__name__}: {err}).", field="checkpoint"
        ) from err
    if not isinstance(loaded, dict):
        raise CheckpointFormatError(
            f"{path} holds a {type(loaded).__name__}, not the dict of an official X-STARS checkpoint "
            "('student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss').",
            field="checkpoint",
        )
    return loaded


def unsafe_globals(path: Path) -> list[str]:
    """The Python objects (``module.name``) the checkpoint's pickle refers to that safe loading
    refuses; empty when there are none or the file cannot be disassembled (damaged, pre-1.6
    format)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError, KeyError, OSError, pickle.UnpicklingError):  # damaged, or pre-1.6 format
        return []


def network_state(loaded: dict[str, Any], key: str, path: Path) -> Mapping[str, torch.Tensor]:
    if key not in loaded:
        found = sorted(map(str, loaded))
        shown = found[:12] + ([f"... ({len(found)} keys)"] if len(found) > 12 else [])
        if "student" not in loaded and "teacher" not in loaded:
            raise CheckpointFormatError(
                f"{path} is not an official X-STARS training checkpoint: it has no 'student' or "
                f"'teacher' entry; its top-level keys are {shown}.",
                field="checkpoint",
            )
        other = "student" if key == "teacher" else "teacher"
        raise CheckpointFormatError(
            f"{path} has no {key!r} network (keys {shown}); try {{key}}.", field="key", settings={"key": other}
        )
    state = loaded[key]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointFormatError(
            f"{path}: {key!r} should be a non-empty state dict (names -> tensors), got "
            f"{type(state).__name__}{' (empty)' if isinstance(state, Mapping) else ''}.",
            field="checkpoint",
        )
    bad = [f"{k!r}: {type(v).__name__}" for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointFormatError(
            f"{path}: {key!r} should map names to tensors; found {bad[:5]}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + ".",
            field="checkpoint",
        )
    return state


def backbone_state(state: Mapping[str, torch.Tensor], key: str, path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors under timm's names: ``module.`` (DDP) and ``backbone.`` (DINO's
    multi-crop wrapper) stripped, the DINO projection head (``head.*``) dropped. Anything else is
    kept as is, so that the strict load reports it as unexpected."""
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    dropped = 0
    for original, tensor in state.items():
        name = original.removeprefix("module.")
        if name.startswith("head."):
            dropped += 1
            continue
        name = name.removeprefix("backbone.")
        if name in out:
            raise CheckpointFormatError(
                f"{path}: {key!r} has both {sources[name]!r} and {original!r}, which are the same "
                f"backbone tensor {name!r} once prefixes are stripped.",
                field="checkpoint",
            )
        out[name] = tensor
        sources[name] = original
    if not out:
        raise CheckpointFormatError(
            f"{path}: {key!r} has no backbone tensors, only {dropped} DINO head tensors.", field="checkpoint"
        )
    logger.debug("%s: %d backbone tensors, %d DINO head tensors dropped.", path.name, len(out), dropped)
    return out


def args_of(loaded: dict[str, Any], path: Path) -> dict[str, Any]:
    args = loaded.get("args")
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    raise CheckpointFormatError(
        f"{path}: 'args' should be the run's argparse.Namespace, got {type(args).__name__}.",
        field="checkpoint",
    )
