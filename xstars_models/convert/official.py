"""Convert a checkpoint written by the official X-STARS training code into an :class:`XStars` model.

The official code (a DINO fork) saves its whole training state with ``torch.save``: ``student``
(keys ``module.backbone.*`` and ``module.head.*``, DDP-wrapped), ``teacher`` (``backbone.*`` and
``head.*``), ``optimizer``, ``epoch`` (epochs completed), ``args`` (the run's
``argparse.Namespace``), ``dino_loss`` and, with mixed precision, ``fp16_scaler``. Its ViT backbone
uses timm's parameter names, so once the ``module.``/``backbone.`` prefixes are gone the tensors
load strictly into a timm ``vit_{tiny,small,base,large}_patch{p}_224`` trunk.

    from xstars_models.convert import convert_official_checkpoint
    model = convert_official_checkpoint("checkpoint.pth", "xstars-spot-official")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import nn

from ..errors import CheckpointFormatError, InvalidOptionError, StateDictMismatchError
from ..sensors import SensorSpec, get_sensor
from ..serialization import file_record, load_state_dict_strict
from ..xstars import XStars
from .checkpoint_file import args_of, backbone_state, load_checkpoint, network_state

__all__ = ["OFFICIAL_ARCHS", "OFFICIAL_SENSORS", "convert_official_checkpoint"]

logger = logging.getLogger(__name__)

# ``--arch`` choices of the official code. All four build timm-compatible ViTs with LayerNorm eps
# 1e-6, exact GELU and a qkv bias, as timm's ``vit_*_patch*_224`` models do.
OFFICIAL_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")

# The official data set's sensor folder names (``args.sensors``, ``args.adapt_sensor``) and the
# built-in sensor each one is: MSC-France PNGs, 8-bit RGB.
OFFICIAL_SENSORS = {"SPOT": "spot67_rgb", "Sentinel": "sentinel2_rgb", "Landsat": "landsat8_rgb"}

_DINO_LAYERNORM_EPS = 1e-6
_OFFICIAL_IMG_SIZE = 224  # the official ViTs always build position embeddings for 224 px

# Arguments that describe the machine a run was on rather than how the weights were made, and that
# may hold local paths; they are left out of the provenance written into config.json.
_MACHINE_ARGS = frozenset(
    {"data_path", "output_dir", "dist_url", "local_rank", "gpu", "rank", "num_workers", "saveckp_freq"}
)


def convert_official_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    *,
    arch: str | None = None,
    sensor: str | SensorSpec | None = None,
    key: Literal["teacher", "student"] = "teacher",
    model_id: str | None = None,
) -> XStars:
    """An :class:`XStars` model from an official X-STARS ``checkpoint.pth``.

    The file is read with ``torch.load(weights_only=True)``, only ``argparse.Namespace`` (the
    run's ``args``) being allowed besides tensors and plain containers, so a file carrying
    any other pickled object is refused without running it. The chosen network's backbone is
    loaded strictly into a timm ViT trunk; the DINO head, optimizer state and loss centre are
    dropped.

    Args:
        checkpoint: the ``.pth`` file written by the official ``pretraining.py`` or
            ``continual_pretraining.py``.
        out_dir: if given, the converted model is written there with
            :meth:`XStars.save_pretrained` (``config.json`` + ``model.safetensors``).
        arch: an official ``--arch`` (``vit_small``...) or a timm model name, used as is.
            Default: ``args.arch`` of the checkpoint. Official names become
            ``vit_<size>_patch<args.patch_size>_224``.
        sensor: the sensor the trunk's patch embedding is for: a registered sensor name
            (``spot67_rgb``, ``sentinel2_rgb``, ``landsat8_rgb``...), an official name
            (``SPOT``, ``Sentinel``, ``Landsat``) or a :class:`SensorSpec` with red, green, blue
            8-bit bands. Default: ``args.adapt_sensor`` for continual pretraining, else the
            single entry of ``args.sensors``; a checkpoint pretrained on several sensors through
            one shared patch embedding needs it.
        key: ``"teacher"`` (the EMA network, what DINO evaluates and publishes) or
            ``"student"``.
        model_id: the id the converted model goes by (``model.name_or_path``), e.g. the registry
            id it will be published under; ``adapt()`` records it as the base model. Default:
            ``out_dir`` when given.

    Returns:
        The model in eval mode on the CPU. Its sensor normalisation is the checkpoint's
        ``args.mean`` / ``args.std`` (0-1 scale: 8-bit values / 255); ``lineage["converted_from"]``
        records the source file (name, sha256, size in bytes), the key and the epoch, and
        ``training_record["args"]`` the run's settings.

    Raises:
        CheckpointFormatError: not a readable official checkpoint, or unsafe content
            (``field="checkpoint"``; ``"key"`` when the other network is there).
        StateDictMismatchError: backbone tensors that do not fit the architecture (missing,
            unexpected and mis-shaped keys listed, named after prefix stripping).
        InvalidOptionError: unknown ``arch``, ``key`` or ``sensor``, one the checkpoint cannot
            tell, or a trunk that is not DINO's ViT (``field`` names the argument).
        FileNotFoundError: no file at ``checkpoint``.
    """
    if key not in ("teacher", "student"):
        raise InvalidOptionError(f"key must be 'teacher' or 'student', got {key!r}.", field="key")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")

    before = path.stat()
    digest = file_record(path).sha256  # streamed: official checkpoints reach gigabytes
    loaded = load_checkpoint(path)
    after = path.stat()
    # The hash is taken on one read and the tensors on another: make sure both saw the same file.
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise CheckpointFormatError(f"{path} changed while it was being converted; try again.", field="checkpoint")

    weights = backbone_state(network_state(loaded, key, path), key, path)
    args = args_of(loaded, path)
    timm_name, arch_kwargs = _resolve_arch(arch, args, weights, path)
    sensor_name, spec = _resolve_sensor(sensor, args, path)

    model = XStars.new(timm_name, {sensor_name: spec}, **arch_kwargs)
    _check_dino_trunk(model.trunk, timm_name)
    try:
        load_state_dict_strict(model.trunk, weights, f"{path.name} [{key!r} backbone]")
    except StateDictMismatchError as err:
        raise StateDictMismatchError(
            f"{err}\nKey names are shown after stripping 'module.' and 'backbone.'; the trunk was "
            f"built as timm {timm_name!r} with {arch_kwargs} from "
            f"{'arch=' + repr(arch) if arch else 'the checkpoint args'}. Pass arch= if that is wrong."
        ) from None

    epoch = loaded.get("epoch")
    model.lineage = {
        "converted_from": {
            "format": "official X-STARS training checkpoint (github.com/VMarsocci/X-STARS, DINO fork)",
            "file": path.name,
            "sha256": digest,
            "size": before.st_size,
            "key": key,
            "epoch": epoch if isinstance(epoch, int) else None,
        }
    }
    model.training_record = _training_record(args, epoch)
    model.name_or_path = model_id or (str(out_dir) if out_dir is not None else None)
    model.eval()
    logger.info(
        "Converted %s (%s network, epoch %s) to timm %s for sensor %r.", path, key, epoch, timm_name, sensor_name
    )
    if out_dir is not None:
        model.save_pretrained(out_dir)
        logger.info("Saved the converted model to %s.", out_dir)
    return model


def _resolve_arch(
    arch: str | None, args: Mapping[str, Any], weights: Mapping[str, torch.Tensor], path: Path
) -> tuple[str, dict[str, Any]]:
    """timm model name and ``create_model`` overrides for the checkpoint's backbone."""
    name = arch or args.get("arch")
    if arch and args.get("arch") not in (None, arch):
        logger.info("%s: building %r as asked, not the checkpoint's args.arch %r.", path.name, arch, args.get("arch"))
    choices = f"official names {list(OFFICIAL_ARCHS)} or a timm ViT name such as 'vit_small_patch16_224'"
    if not isinstance(name, str) or not name:
        raise InvalidOptionError(f"{path}: the checkpoint's args name no architecture; pass arch= ({choices}).", field="arch")
    kwargs: dict[str, Any] = {}
    patch: int | None
    default_img: int | None
    if name in OFFICIAL_ARCHS:
        given = args.get("patch_size")
        patch = given if isinstance(given, int) and given >= 1 else _weights_patch_size(weights)
        if patch is None:
            raise CheckpointFormatError(
                f"{path}: cannot tell the patch size (no args.patch_size, no patch_embed weights).", field="checkpoint"
            )
        timm_name = f"{name}_patch{patch}_224"
        if not timm.is_model(timm_name):
            # timm registers only the usual patch sizes; the others are the same model with
            # another patch_size.
            timm_name = f"{name}_patch16_224"
            kwargs["patch_size"] = patch
        default_img = _OFFICIAL_IMG_SIZE
    elif timm.is_model(name):
        timm_name = name
        patch = _weights_patch_size(weights)
        default_img = _name_img_size(name)
    else:
        raise InvalidOptionError(f"Unknown architecture {name!r}; use one of the {choices}.", field="arch")
    # The official ViTs size their position embeddings for 224 px whatever --inp_dim is, but
    # read the grid off the weights so that a checkpoint trained otherwise still loads strictly.
    grid = _weights_pos_grid(weights)
    if grid is not None and patch is not None and grid * patch != default_img:
        kwargs["img_size"] = grid * patch
    return timm_name, kwargs


def _weights_patch_size(weights: Mapping[str, torch.Tensor]) -> int | None:
    kernel = weights.get("patch_embed.proj.weight")
    return int(kernel.shape[-1]) if kernel is not None and kernel.ndim == 4 else None


def _weights_pos_grid(weights: Mapping[str, torch.Tensor]) -> int | None:
    """Side of the square token grid of ``pos_embed`` (1 x (1 + n*n) x D, class token first)."""
    pos = weights.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return None
    side = math.isqrt(pos.shape[1] - 1)
    return side if side * side == pos.shape[1] - 1 else None


def _name_img_size(name: str) -> int | None:
    match = re.search(r"_(\d+)$", name)
    return int(match[1]) if match else None


def _resolve_sensor(
    sensor: str | SensorSpec | None, args: Mapping[str, Any], path: Path
) -> tuple[str, SensorSpec]:
    """The model's sensor name and spec, with the checkpoint's normalisation."""
    if sensor is None:
        sensor = _default_official_sensor(args, path)
    if isinstance(sensor, SensorSpec):
        spec = sensor
    else:
        spec = get_sensor(OFFICIAL_SENSORS.get(sensor, sensor))
    if spec.band_names != ("red", "green", "blue") or spec.dtype != "uint8" or not math.isclose(spec.scale, 1 / 255):
        raise InvalidOptionError(
            f"Sensor {spec.name!r} ({', '.join(spec.band_names)}; {spec.dtype} x {spec.scale:.6g}) cannot "
            "feed an official X-STARS trunk, which was trained on 8-bit red, green, blue images scaled "
            f"to 0-1; use one of {sorted(OFFICIAL_SENSORS.values())} or such a spec.",
            field="sensor",
        )
    return spec.name, _with_checkpoint_normalisation(spec, args, path)


def _default_official_sensor(args: Mapping[str, Any], path: Path) -> str:
    # Continual pretraining runs DINO on the adapted sensor only, so that is what the trunk's
    # patch embedding saw. From-scratch pretraining feeds every sensor through one patch
    # embedding: any of them is right, and the caller must choose.
    adapt = args.get("adapt_sensor")
    sensors = args.get("sensors")
    sensors = [sensors] if isinstance(sensors, str) else list(sensors or [])
    official = adapt if isinstance(adapt, str) and adapt else (sensors[0] if len(sensors) == 1 else None)
    if official is None:
        raise InvalidOptionError(
            f"{path}: cannot tell which sensor the trunk is for (args.sensors={sensors or None}, no "
            f"args.adapt_sensor); pass sensor= one of {sorted(OFFICIAL_SENSORS.values())} "
            "(all sensors of a from-scratch run share the patch embedding and normalisation).",
            field="sensor",
        )
    if official not in OFFICIAL_SENSORS:
        raise InvalidOptionError(
            f"{path}: the checkpoint's sensor {official!r} is not one of the official "
            f"{sorted(OFFICIAL_SENSORS)}; pass sensor= a registered sensor name or SensorSpec.",
            field="sensor",
        )
    return OFFICIAL_SENSORS[official]


def _with_checkpoint_normalisation(spec: SensorSpec, args: Mapping[str, Any], path: Path) -> SensorSpec:
    """``spec`` with the per-band mean and std of ``args.mean`` / ``args.std``.

    The official code normalises every DINO view with ``args.mean`` / ``args.std`` (0-1 scale),
    whatever the sensor, and those values need not equal its per-sensor data set statistics (the
    command-line defaults do not). The weights were fitted to inputs normalised exactly that way,
    so the converted model must apply the same numbers; the spec's bands, wavelengths, GSD and
    value scaling are kept.
    """
    mean, std = args.get("mean"), args.get("std")
    if mean is None and std is None:
        logger.warning(
            "%s has no args.mean/args.std; using the %r built-in normalisation (%s).",
            path.name,
            spec.name,
            spec.normalisation_source or "unknown source",
        )
        return spec
    values = []
    for label, stats in (("mean", mean), ("std", std)):
        if (
            not isinstance(stats, (list, tuple))
            or len(stats) != spec.num_bands
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stats)
            or (label == "std" and not all(v > 0 for v in stats))
        ):
            raise CheckpointFormatError(
                f"{path}: args.{label} should be {spec.num_bands} finite numbers (R, G, B on a 0-1 scale"
                f"{', each > 0' if label == 'std' else ''}), got {stats!r}: the inputs the weights were trained "
                "on cannot be reproduced from it. Nothing was written.",
                field="checkpoint",
            )
        values.append(tuple(float(v) for v in stats))
    mean_t, std_t = values
    if mean_t == spec.mean and std_t == spec.std:
        return spec
    logger.info(
        "%s normalises with mean %s / std %s, not the %r statistics %s / %s; the model uses the checkpoint's.",
        path.name, mean_t, std_t, spec.name, spec.mean, spec.std,
    )
    bands = tuple(dataclasses.replace(b, mean=m, std=s) for b, m, s in zip(spec.bands, mean_t, std_t))
    return dataclasses.replace(
        spec,
        bands=bands,
        normalisation_source=f"args.mean/args.std of the official X-STARS checkpoint {path.name} (0-1 scale)",
    )


def _check_dino_trunk(trunk: nn.Module, timm_name: str) -> None:
    """Refuse a trunk that would load the weights strictly yet compute something else than DINO's
    ViT: strict loading checks names and shapes, not LayerNorm eps or the activation."""
    problems = sorted(
        {
            f"{type(m).__name__} eps {m.eps:g} (DINO: {_DINO_LAYERNORM_EPS:g})"
            for m in trunk.modules()
            if isinstance(m, nn.LayerNorm) and m.eps != _DINO_LAYERNORM_EPS
        }
        | {
            f"activation {m.act!r} (DINO: exact GELU)"
            for m in trunk.modules()
            if hasattr(m, "fc1") and hasattr(m, "act")
            and not (isinstance(m.act, nn.GELU) and m.act.approximate == "none")
        }
    )
    if problems:
        raise InvalidOptionError(
            f"timm {timm_name!r} is not DINO's ViT: {'; '.join(problems)}. Use an official arch name "
            f"{list(OFFICIAL_ARCHS)} or a plain 'vit_<size>_patch<p>_224'.",
            field="arch",
        )


def _training_record(args: Mapping[str, Any], epoch: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "source": "official X-STARS code",
        "recipe": "continual pretraining" if "adapt_sensor" in args else "pretraining",
        "epochs_completed": epoch if isinstance(epoch, int) else None,
    }
    if args.get("use_msad"):
        # docs/method.md, defect 1: the published code detaches the MSAD term from the graph.
        record["note"] = (
            "use_msad was set, but the official code's MSAD term carries no gradient "
            "(torch.tensor of the per-token losses), so these weights were trained by DINO alone."
        )
    kept = {}
    for name, value in sorted(args.items()):
        if name in _MACHINE_ARGS:
            continue
        if name == "pretrained_weights" and value:
            value = Path(str(value)).name  # the file it started from, without the local path
        kept[name] = _jsonable(value)
    record["args"] = kept
    return record


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
