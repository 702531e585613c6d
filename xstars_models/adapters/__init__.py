"""Sensor adapters: what continual pretraining adds to a base model, saved as one small file
(:mod:`.file` describes and reads the format).

An adapter holds the new sensor's input stem and, in ``"lora"`` mode, the LoRA updates of the
trunk; it names the base it was trained on (id and revision, as the base was loaded) and the
sha256 of that base's trunk weights, so that it only ever loads onto that very base.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors_bytes

from ..config import FileRecord
from ..errors import InvalidInputError, InvalidOptionError, InvalidTypeError
from ..lora import apply_lora, base_state_dict, load_lora_state_dict, lora_config, lora_state_dict
from ..model import ModelT, XStarsBase
from ..serialization import load_state_dict_strict, sha256_bytes, write_safetensors
from .file import (
    ADAPTER_FORMAT,
    ADAPTER_MODES,
    LORA_PREFIX,
    STEM_PREFIX,
    AdapterInfo,
    read_adapter,
    read_adapter_info,
    tensors_sha256,
)

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_MODES",
    "AdapterInfo",
    "load_adapter",
    "read_adapter_info",
    "save_adapter",
    "trunk_sha256",
]

_REPO_AT_REF = re.compile(r"^[^/@]+/[^/@]+@[^@]+$")


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
    tensors = {STEM_PREFIX + k: v for k, v in model.stems[sensor].state_dict().items()}
    if mode == "lora":
        tensors.update({LORA_PREFIX + k: v for k, v in lora_state_dict(model.trunk).items()})
    info = AdapterInfo(
        base_model=base_model,
        base_revision=base_revision,
        base_weights_sha256=trunk_sha256(model),
        sensor=sensor,
        spec=stem.spec,
        patch_size=stem.patch_size,
        mode=mode,
        lora=lora if mode == "lora" else None,
        tensors_sha256=tensors_sha256(tensors),
    )
    return write_safetensors(path, tensors, info.to_metadata())


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
    info, tensors, file_sha256 = read_adapter(path, expected_sha256)
    stem_tensors = {k[len(STEM_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STEM_PREFIX)}
    lora_tensors = {k[len(LORA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    stray = sorted(k for k in tensors if not k.startswith((STEM_PREFIX, LORA_PREFIX)))
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
