"""The adapter file: what :func:`~xstars_models.adapters.save_adapter` writes and
:func:`~xstars_models.adapters.load_adapter` reads, checked before any tensor is used.

File format (``xstars-adapter/1``): one safetensors file. Tensors: ``stem.<key>`` (the sensor's
patch embedding) and ``lora.<layer>.lora_A|lora_B``. Metadata (all strings; JSON for the
structured fields):

- ``format``: ``xstars-adapter/1``;
- ``base_model``: registry id, Hub repo id or folder the base was loaded from;
- ``base_revision``: JSON, the base's Hub commit (40 hex) or ``null``;
- ``base_weights_sha256``: sha256 of the base's ``model.safetensors`` (see :func:`~xstars_models.adapters.trunk_sha256`);
- ``sensor``: the name the model knows the new sensor by;
- ``sensor_spec``: JSON, the sensor's full :class:`~.sensors.SensorSpec`;
- ``patch_size``: JSON int, pixels per token side of the new stem;
- ``mode``: ``stem`` or ``lora``;
- ``lora``: JSON ``{"rank", "alpha", "targets"}``, or ``null`` in ``stem`` mode;
- ``tensors_sha256``: sha256 of the tensors (names, dtypes, shapes, bytes), so that a damaged file
  is detected even when the caller has no sha256 for the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from ..errors import ChecksumError, ConfigError, InvalidInputError
from ..sensors import SensorSpec
from ..serialization import sha256_bytes

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_MODES",
    "LORA_PREFIX",
    "STEM_PREFIX",
    "AdapterInfo",
    "read_adapter",
    "read_adapter_info",
    "safetensors_metadata",
    "tensors_sha256",
]

ADAPTER_FORMAT = "xstars-adapter/1"
ADAPTER_MODES = ("stem", "lora")
STEM_PREFIX, LORA_PREFIX = "stem.", "lora."
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter's metadata: which base it belongs to and how to rebuild it on that base."""

    base_model: str
    base_revision: str | None
    base_weights_sha256: str
    sensor: str
    spec: SensorSpec
    patch_size: int
    mode: str
    lora: dict[str, Any] | None
    tensors_sha256: str

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": ADAPTER_FORMAT,
            "base_model": self.base_model,
            "base_revision": json.dumps(self.base_revision),
            "base_weights_sha256": self.base_weights_sha256,
            "sensor": self.sensor,
            "sensor_spec": json.dumps(self.spec.to_dict()),
            "patch_size": json.dumps(self.patch_size),
            "mode": self.mode,
            "lora": json.dumps(self.lora),
            "tensors_sha256": self.tensors_sha256,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str) -> AdapterInfo:
        """Parse and validate.

        Raises:
            InvalidInputError: not an adapter, or one of another format version (``field="path"``).
            ConfigError: a missing or malformed metadata entry (``field`` its key, dotted inside
                ``sensor_spec``).
        """
        fmt = metadata.get("format")
        if fmt != ADAPTER_FORMAT:
            if isinstance(fmt, str) and fmt.startswith("xstars-adapter/"):
                raise InvalidInputError(
                    f"{source}: adapter format {fmt!r} is not supported (this xstars-models reads "
                    f"{ADAPTER_FORMAT!r}); upgrade xstars-models.",
                    field="path",
                )
            raise InvalidInputError(
                f"{source} is not an X-STARS adapter: its safetensors metadata 'format' is {fmt!r}, "
                f"not {ADAPTER_FORMAT!r}. Full models are folders loaded with XStars.from_pretrained().",
                field="path",
            )

        def get(key: str, as_json: bool = False) -> Any:
            if key not in metadata:
                raise ConfigError(f"{source}: adapter metadata has no {key!r}.", field=key)
            if not as_json:
                return metadata[key]
            try:
                return json.loads(metadata[key])
            except json.JSONDecodeError as err:
                raise ConfigError(f"{source}: adapter metadata {key!r} is not valid JSON ({err}).", field=key) from None

        revision = get("base_revision", as_json=True)
        if revision is not None and not isinstance(revision, str):
            raise ConfigError(f"{source}: base_revision must be a string or null, got {revision!r}.", field="base_revision")
        for key in ("base_weights_sha256", "tensors_sha256"):
            if not _SHA256.match(get(key)):
                raise ConfigError(f"{source}: {key} must be 64 lowercase hex characters, got {get(key)!r}.", field=key)
        try:
            spec = SensorSpec.from_dict(get("sensor_spec", as_json=True))
        except (TypeError, ValueError, KeyError) as err:  # ConfigError names the key inside the spec
            inner = getattr(err, "field", None)
            raise ConfigError(f"{source}: sensor_spec: {err}", field="sensor_spec" + (f".{inner}" if inner else "")) from None
        patch_size = get("patch_size", as_json=True)
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ConfigError(f"{source}: patch_size must be a positive integer, got {patch_size!r}.", field="patch_size")
        mode = get("mode")
        if mode not in ADAPTER_MODES:
            raise ConfigError(f"{source}: mode must be one of {ADAPTER_MODES}, got {mode!r}.", field="mode")
        lora = get("lora", as_json=True)
        if mode == "lora":
            if not isinstance(lora, dict) or set(lora) != {"rank", "alpha", "targets"}:
                raise ConfigError(f"{source}: 'lora' must hold rank, alpha and targets in lora mode, got {lora!r}.", field="lora")
        elif lora is not None:
            raise ConfigError(f"{source}: a {mode!r} adapter must have lora = null, got {lora!r}.", field="lora")
        return cls(
            base_model=get("base_model"),
            base_revision=revision,
            base_weights_sha256=get("base_weights_sha256"),
            sensor=get("sensor"),
            spec=spec,
            patch_size=patch_size,
            mode=mode,
            lora=lora,
            tensors_sha256=get("tensors_sha256"),
        )


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes, read from the header (8-byte little-endian
    length, then JSON) so that the bytes already hashed are the ones parsed."""
    not_safetensors = InvalidInputError(f"{source} is not an X-STARS adapter: not a valid safetensors file.", field="path")
    if len(data) < 8:
        raise not_safetensors
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise not_safetensors
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise not_safetensors
    return metadata


def read_adapter(path: Path, expected_sha256: str | None) -> tuple[AdapterInfo, dict[str, torch.Tensor], str]:
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise ChecksumError(
            f"Adapter {path} is corrupted or not the expected file: sha256 {actual} ({len(data)} bytes), "
            f"expected {expected_sha256}. Nothing was loaded."
        )
    info = AdapterInfo.from_metadata(safetensors_metadata(data, str(path)), str(path))
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as err:
        raise ChecksumError(f"Adapter {path} is damaged: its tensors cannot be read ({err}).") from None
    stored = tensors_sha256(tensors)
    if stored != info.tensors_sha256:
        raise ChecksumError(
            f"Adapter {path} is corrupted: its tensors hash to {stored}, but the file records "
            f"{info.tensors_sha256}. Nothing was loaded."
        )
    return info, tensors, actual


def read_adapter_info(path: str | Path, expected_sha256: str | None = None) -> AdapterInfo:
    """An adapter's metadata, after checking the file (see :func:`~xstars_models.adapters.load_adapter`
    for the errors)."""
    return read_adapter(Path(path), expected_sha256)[0]


