"""Sensor adapters: what continual pretraining adds to a base model, saved as one small file.

An adapter holds the new sensor's input stem and, in ``"lora"`` mode, the LoRA updates of the
trunk; it names the base it was trained on (id and revision, as the base was loaded) and the
sha256 of that base's trunk weights, so that it only ever loads onto that very base.

File format (``xstars-adapter/1``): one safetensors file. Tensors: ``stem.<key>`` (the sensor's
patch embedding) and ``lora.<layer>.lora_A|lora_B``. Metadata (all strings; JSON for the
structured fields):

- ``format``: ``xstars-adapter/1``;
- ``base_model``: registry id, Hub repo id or folder the base was loaded from;
- ``base_revision``: JSON, the base's Hub commit (40 hex) or ``null``;
- ``base_weights_sha256``: sha256 of the base's ``model.safetensors`` (see :func:`trunk_sha256`);
- ``sensor``: the name the model knows the new sensor by;
- ``sensor_spec``: JSON, the sensor's full :class:`~.sensors.SensorSpec`;
- ``patch_size``: JSON int, pixels per token side of the new stem;
- ``mode``: ``stem`` or ``lora``;
- ``lora``: JSON ``{"rank", "alpha", "targets"}``, or ``null`` in ``stem`` mode;
- ``tensors_sha256``: sha256 of the tensors (names, dtypes, shapes, bytes), so that a damaged file
  is detected even when the caller has no sha256 for the file.
"""

from __future__ import annotations

import copy
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
from safetensors.torch import save as save_safetensors_bytes

from .config import FileRecord
from .errors import ChecksumError, ConfigError, InvalidInputError, InvalidOptionError, InvalidTypeError
from .lora import apply_lora, base_state_dict, load_lora_state_dict, lora_config, lora_state_dict
from .model import ModelT, XStarsBase
from .sensors import SensorSpec
from .serialization import load_state_dict_strict, sha256_bytes, write_safetensors

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_MODES",
    "AdapterInfo",
    "load_adapter",
    "read_adapter_info",
    "save_adapter",
    "trunk_sha256",
]

ADAPTER_FORMAT = "xstars-adapter/1"
ADAPTER_MODES = ("stem", "lora")
_STEM, _LORA = "stem.", "lora."
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_AT_REF = re.compile(r"^[^/@]+/[^/@]+@[^@]+$")


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


def trunk_sha256(model: XStarsBase) -> str:
    """sha256 of the model's trunk weights serialized exactly as :meth:`XStars.save_pretrained`
    writes ``model.safetensors`` (LoRA updates left out, base weights under timm's keys).

    For a base saved by this package this equals the sha256 recorded for ``model.safetensors`` in
    its ``config.json``; hashing the weights in memory (rather than trusting that record) also
    catches a base that was changed after it was loaded.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in base_state_dict(model.trunk).items()}
    # Must stay byte-identical to serialization.write_safetensors (metadata {"format": "pt"} only).
    return sha256_bytes(save_safetensors_bytes(tensors, metadata={"format": "pt"}))


def _tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _base_reference(model: XStarsBase) -> tuple[str, str | None]:
    """Where the base comes from: ``lineage`` (set by ``adapt()``) or, for a model a sensor was
    added to by hand, the id the model itself was loaded from."""
    if model.lineage.get("base_model"):
        name, revision = str(model.lineage["base_model"]), model.lineage.get("base_revision")
    elif model.name_or_path:
        name, revision = model.name_or_path, model.revision
    else:
        raise InvalidInputError(
            "The model does not say which base it was adapted from (no lineage['base_model'] and no "
            "name_or_path): load the base with XStars.from_pretrained() before adapting it, or set "
            "model.lineage = {'base_model': ..., 'base_revision': ...}.",
            field="model",
        )
    if revision and _REPO_AT_REF.match(name) and not Path(name).expanduser().exists():
        # A base loaded as "org/name@main" records the commit as its revision, and from_pretrained
        # refuses two different revisions: the commit is what pins the weights, so keep only it.
        name = name.rpartition("@")[0]
    return name, revision


def save_adapter(model: XStarsBase, sensor: str, path: str | Path, mode: str | None = None) -> FileRecord:
    """Save ``sensor``'s stem (and in ``"lora"`` mode the trunk's LoRA updates) as an adapter file.

    Args:
        model: the adapted model (e.g. from ``adapt(..., mode="stem"|"lora")``). Its trunk's base
            weights must be those of the base it names.
        sensor: the new sensor (not the primary one, whose stem belongs to the trunk).
        path: the ``.safetensors`` file to write (atomically).
        mode: ``"stem"`` or ``"lora"``; default: ``model.lineage["adapt_mode"]``, else ``"lora"``
            when LoRA layers are applied and ``"stem"`` otherwise.

    Returns:
        The written file's sha256 and size (give the sha256 to :func:`load_adapter` to check it).

    Raises:
        InvalidOptionError: ``mode="full"`` (a fully fine-tuned trunk is a new model: use
            ``save_pretrained``), LoRA layers in ``"stem"`` mode or none in ``"lora"`` mode
            (``field="mode"``), the primary or an unknown ``sensor``.
        InvalidInputError: a model that does not name its base (``field="model"``).
    """
    lora = lora_config(model.trunk)
    mode = mode or model.lineage.get("adapt_mode") or ("lora" if lora else "stem")
    if mode == "full":
        raise InvalidOptionError(
            "A full fine-tune changes the whole trunk, so it cannot be stored as an adapter of its "
            "base: save it with model.save_pretrained(folder) (after merge_lora() if LoRA is applied).",
            field="mode",
        )
    if mode not in ADAPTER_MODES:
        raise InvalidOptionError(
            f"mode must be one of {ADAPTER_MODES} (or 'full' via save_pretrained), got {mode!r}.", field="mode"
        )
    stem = model.check_sensor(sensor)
    if sensor == model.primary_sensor:
        raise InvalidOptionError(
            f"{sensor!r} is the model's primary sensor, whose stem is part of the trunk; an adapter "
            "holds a stem added on top of the base.",
            field="sensor",
        )
    if mode == "lora" and lora is None:
        raise InvalidOptionError(
            "{mode} but the model's trunk has no LoRA layers (see xstars_models.lora.apply_lora).",
            field="mode",
            settings={"mode": mode},
        )
    if mode == "stem" and lora is not None:
        raise InvalidOptionError(
            "The model's trunk has LoRA layers, which a 'stem' adapter would leave out: save with {mode}.",
            field="mode",
            settings={"mode": "lora"},
        )
    base_model, base_revision = _base_reference(model)
    tensors = {_STEM + k: v for k, v in model.stems[sensor].state_dict().items()}
    if mode == "lora":
        tensors.update({_LORA + k: v for k, v in lora_state_dict(model.trunk).items()})
    info = AdapterInfo(
        base_model=base_model,
        base_revision=base_revision,
        base_weights_sha256=trunk_sha256(model),
        sensor=sensor,
        spec=stem.spec,
        patch_size=stem.patch_size,
        mode=mode,
        lora=lora if mode == "lora" else None,
        tensors_sha256=_tensors_sha256(tensors),
    )
    return write_safetensors(path, tensors, info.to_metadata())


def _safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
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


def _read(path: Path, expected_sha256: str | None) -> tuple[AdapterInfo, dict[str, torch.Tensor], str]:
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise ChecksumError(
            f"Adapter {path} is corrupted or not the expected file: sha256 {actual} ({len(data)} bytes), "
            f"expected {expected_sha256}. Nothing was loaded."
        )
    info = AdapterInfo.from_metadata(_safetensors_metadata(data, str(path)), str(path))
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as err:
        raise ChecksumError(f"Adapter {path} is damaged: its tensors cannot be read ({err}).") from None
    stored = _tensors_sha256(tensors)
    if stored != info.tensors_sha256:
        raise ChecksumError(
            f"Adapter {path} is corrupted: its tensors hash to {stored}, but the file records "
            f"{info.tensors_sha256}. Nothing was loaded."
        )
    return info, tensors, actual


def read_adapter_info(path: str | Path, expected_sha256: str | None = None) -> AdapterInfo:
    """An adapter's metadata, after checking the file (see :func:`load_adapter` for the errors)."""
    return _read(Path(path), expected_sha256)[0]


def load_adapter(
    path: str | Path,
    base: ModelT | None = None,
    expected_sha256: str | None = None,
    *,
    model_class: type[ModelT] = XStarsBase,  # type: ignore[assignment]  # the default's own class
    **from_pretrained_kwargs: Any,
) -> ModelT:
    """The base model with the adapter's sensor stem (and LoRA updates) added.

    Args:
        path: the adapter ``.safetensors`` file.
        base: the base model; default: ``XStars.from_pretrained(base_model, revision=base_revision,
            **from_pretrained_kwargs)`` as recorded in the adapter. A given base is not modified:
            the adapter is added to a copy.
        model_class: the class to load the base as when ``base`` is not given
            (``XStars.load_adapter`` passes its own).
        expected_sha256: the adapter file's sha256, when known (e.g. from :func:`save_adapter`'s
            record or a manifest).
        from_pretrained_kwargs: ``cache_dir``, ``local_files_only``, ``token``, ``map_location``...
            for loading the base.

    Returns:
        The model, with ``lineage`` naming the base and the adapter.

    Raises:
        ChecksumError: the file's sha256 differs from ``expected_sha256``, or its tensors from the
            hash the file records.
        InvalidInputError: not an adapter file (``field="path"``); a base whose trunk weights are
            not those the adapter was trained on (both sha256 named) or that already has LoRA
            layers (``field="base"``).
        ConfigError: malformed adapter metadata (``field`` its key).
        InvalidOptionError: a base that already has the adapter's sensor (``field="name"``).
        InvalidTypeError: ``from_pretrained_kwargs`` together with a ``base``.
        StateDictMismatchError: adapter tensors that do not fit the base's architecture.
    """
    path = Path(path)
    info, tensors, file_sha256 = _read(path, expected_sha256)
    stem_tensors = {k[len(_STEM) :]: v for k, v in tensors.items() if k.startswith(_STEM)}
    lora_tensors = {k[len(_LORA) :]: v for k, v in tensors.items() if k.startswith(_LORA)}
    stray = sorted(k for k in tensors if not k.startswith((_STEM, _LORA)))
    if stray or (lora_tensors and info.mode != "lora"):
        stray = stray or sorted(lora_tensors)
        raise InvalidInputError(f"{path}: tensors {stray} do not belong in a {info.mode!r} adapter.", field="path")
    if base is None:
        model = model_class.from_pretrained(info.base_model, revision=info.base_revision, **from_pretrained_kwargs)
    else:
        if from_pretrained_kwargs:
            # Python's own refusal of a keyword is a TypeError; this one says why.
            raise InvalidTypeError(
                f"{sorted(from_pretrained_kwargs)} only apply when the base is loaded here (base=None).",
                field=sorted(from_pretrained_kwargs)[0],
            )
        model = copy.deepcopy(base)
    if lora_config(model.trunk) is not None:
        raise InvalidInputError(
            "The base's trunk already has LoRA layers (from another adapter?); adapters are trained "
            "on the plain base: load this one onto the base itself.",
            field="base",
        )
    actual = trunk_sha256(model)
    if actual != info.base_weights_sha256:
        raise InvalidInputError(
            f"Adapter {path} was trained on base {info.base_model!r} (revision {info.base_revision or 'none'}) "
            f"with trunk weights sha256 {info.base_weights_sha256}, but the base given has trunk weights "
            f"sha256 {actual}. Load it onto that base (cast back to its dtype if it was cast).",
            field="base",
        )
    model.add_sensor(info.spec, patch_size=info.patch_size, name=info.sensor)
    load_state_dict_strict(model.stems[info.sensor], stem_tensors, f"adapter {path} (stem of {info.sensor!r})")
    if info.lora is not None:
        apply_lora(model.trunk, rank=info.lora["rank"], alpha=info.lora["alpha"], targets=info.lora["targets"])
        load_lora_state_dict(model.trunk, lora_tensors)
        # The base's whitening was fit on the trunk LoRA now changes (in stem mode it still holds
        # for the base's sensors, and the adapter's sensor has none).
        model.whitening = None
    model.lineage = {
        "base_model": info.base_model,
        "base_revision": info.base_revision,
        "base_weights_sha256": info.base_weights_sha256,
        "adapt_mode": info.mode,
        "adapter": {"path": str(path), "sha256": file_sha256, "sensor": info.sensor},
    }
    return model
