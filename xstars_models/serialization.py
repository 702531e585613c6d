"""Weight files on disk: sha256 verification, atomic writes, and strict loading with a readable
diff. Every read goes through :func:`read_verified`, which hashes the very bytes it returns."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .config import FileRecord
from .errors import ChecksumError, InvalidInputError, StateDictMismatchError

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "file_record",
    "load_state_dict_strict",
    "read_verified",
    "read_verified_safetensors",
    "sha256_bytes",
    "write_safetensors",
]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Bytes read at a time when hashing a file: feature maps and official checkpoints may be larger
# than memory.
_HASH_CHUNK = 16 << 20


def file_record(path: str | Path) -> FileRecord:
    """The sha256 and size in bytes of the file at ``path``, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(digest.hexdigest(), size)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Replace ``path`` in one step with a file written under another name: yields a new, empty
    temporary file beside it (``.NAME.<random>.tmp``) for the caller to fill by name (a library
    that writes files itself, such as GDAL); when the block ends the file is flushed to disk
    (fsync) and renamed onto ``path``, so readers see the old file or the whole new one, never a
    partial one. On any error, the temporary file is removed and ``path`` left as it was.

    The file gets the permissions a plain ``open(path, "wb")`` would give it (0o666 less the
    umask); a writer that replaces the temporary file rather than writing into it decides its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_beside(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # rb+: Windows fsyncs only files open for writing
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace ``path`` in one step when the block ends without
    an error (see :func:`atomic_path`); for writers that stream into an open file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle
        handle.flush()


def atomic_write_bytes(path: str | Path, data: bytes) -> FileRecord:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place, so readers see
    the old file or the whole new one, never a partial one (:func:`atomic_path`).

    The file gets the permissions a plain ``open(path, "wb")`` would give it (0o666 less the
    umask). A failed write (a full disk, a file size limit) removes the temporary file, leaves
    ``path`` as it was and raises an ``OSError`` that names ``path``."""
    path = Path(path)
    try:
        with atomic_open(path) as handle:
            handle.write(data)
    except OSError as err:
        # The OS error names the temporary file, or nothing (ENOSPC), not the file the caller asked for.
        message = f"{path}: {err.strerror or err}; nothing was written (a previous version, if any, is unchanged)"
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
    return FileRecord(sha256_bytes(data), len(data))


def _create_beside(path: Path) -> tuple[Path, int]:
    """A new, empty ``.NAME.<random>.tmp`` beside ``path`` and its open descriptor. Created with
    mode 0o666 so the kernel applies the umask (``tempfile.mkstemp`` forces 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:  # 48 random bits: a clash is a leftover of a killed writer at most
            continue


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> FileRecord:
    """Save tensors (moved to CPU, made contiguous) atomically; returns the file's record. The
    same tensors and metadata always give the same bytes (see :func:`_sorted_header`)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", **(metadata or {})}
    data = save_safetensors_bytes(cpu, metadata=metadata)
    # With the one "format" key the library's bytes are already reproducible, and they must stay
    # as they are: adapters.trunk_sha256 recomputes them to match published model.safetensors files.
    return atomic_write_bytes(path, _sorted_header(data) if len(metadata) > 1 else data)


def _sorted_header(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys sorted.

    Why by hand: safetensors writes the metadata from a hash map, so with more than one metadata
    key two saves of the same tensors differed in bytes and sha256 (an adapter file of two
    identically seeded runs did), and the library has no option to sort them. The format allows
    it: an 8-byte little-endian header length, the header as JSON padded with spaces to a multiple
    of 8 bytes, then the tensor data, whose offsets count from the end of the header."""
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + length :]


def read_verified(path: str | Path, expected: FileRecord, name: str | None = None, repair: str | None = None) -> bytes:
    """The bytes of ``path`` after checking them against ``expected``. ``repair`` is the advice
    the error gives for this file's source (see ``ResolvedModel.repair``).

    Raises:
        ChecksumError: naming the file, the expected and actual sha256 and sizes.
    """
    path = Path(path)
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != expected.sha256 or len(data) != expected.size:
        truncated = " (truncated)" if len(data) < expected.size else ""
        raise ChecksumError(
            f"{name or path.name} at {path} is corrupted{truncated}: sha256 {actual} "
            f"({len(data)} bytes), expected sha256 {expected.sha256} ({expected.size} bytes). "
            "Nothing was loaded. " + (repair or "Replace the file with a good copy.")
        )
    return data


def read_verified_safetensors(
    path: str | Path,
    expected: FileRecord,
    map_location: str | torch.device = "cpu",
    name: str | None = None,
    repair: str | None = None,
) -> dict[str, torch.Tensor]:
    data = read_verified(path, expected, name, repair)
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as err:  # the recorded sha256 is of a file that was never valid
        raise InvalidInputError(
            f"{name or Path(path).name} at {path} is not a readable safetensors file ({err}).", field="path"
        ) from None
    return {k: v.to(map_location) for k, v in tensors.items()}


def state_dict_mismatch(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], given_label: str = "file"
) -> list[str]:
    """Report lines listing the keys of ``given`` missing from, unexpected by, or shaped unlike
    ``expected`` (at most 20 of each); empty when the two match."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mis_shaped = sorted(
        f"{key}: {given_label} {tuple(given[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(given)
        if given[key].shape != expected[key].shape
    )
    lines = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mis_shaped)):
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"  {title} ({len(keys)}):")
            lines.extend(f"    {k}" for k in shown)
    return lines


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a readable error listing missing,
    unexpected and mis-shaped keys before anything is copied."""
    report = state_dict_mismatch(module.state_dict(), state_dict)
    if report:
        lines = [f"Weights of {what} do not match the architecture:", *report]
        lines.append("Check that config.json's arch and arch_kwargs match the weights.")
        raise StateDictMismatchError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)
