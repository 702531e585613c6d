"""``stac-item.json``: a STAC Item describing a saved model with the Machine Learning Model (MLM)
extension (https://stac-extensions.github.io/mlm/), so catalogues and MLM tools can read what the
weights expect and give without this package: one ``mlm:input`` per sensor (its bands, GSD, the
normalisation as per-band z-scores of the digital numbers, any height and width that is a multiple
of the patch size), the embeddings it returns, the architecture, framework and licence, and every
weight file as an asset with its sha256 (``file:checksum``, a multihash) and size.

Everything is derived from the :class:`~.config.XStarsConfig` (its ``files`` filled by
``save_pretrained``), so the item cannot disagree with ``config.json``; it is written beside the
weights with relative links, which resolve the same in a local folder and in a Hub repo."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, WEIGHTS_NAME, WHITENING_NAME, FileRecord, XStarsConfig, stem_file_name
from .encoder import XStarsEncoder
from .errors import ConfigError, InvalidOptionError
from .serialization import atomic_write_bytes

__all__ = ["STAC_ITEM_NAME", "stac_item", "stac_license", "write_stac_item"]

STAC_ITEM_NAME = "stac-item.json"
STAC_VERSION = "1.1.0"
# The MLM version of the extension's own package (stac-model 0.7.0), which the tests validate with.
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.6.0/schema.json"
FILE_SCHEMA = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
# eo v2 puts wavelengths in STAC 1.1 ``bands``; MLM cross-references input bands to those by name.
EO_SCHEMA = "https://stac-extensions.github.io/eo/v2.0.0/schema.json"

# Every output is an embedding to compare by similarity (cross-sensor retrieval); MLM has no
# "feature-extraction" task and its own package refuses names outside its list.
TASKS = ["similarity-search"]
# The eo extension's common band names; a band named otherwise gets no ``eo:common_name``.
EO_COMMON_NAMES = frozenset({
    "pan", "coastal", "blue", "green", "green05", "yellow", "red", "rededge", "rededge071", "rededge075",
    "rededge078", "nir", "nir08", "nir09", "cirrus", "swir16", "swir22", "lwir", "lwir11", "lwir12",
})
# STAC's ``license`` pattern (item-spec licensing.json): one SPDX id, or "other".
_LICENSE = re.compile(r"^[\w\-.+]+$")
# The Hub names licences by lowercase ids; these are their SPDX spellings (SPDX ids match without
# regard to case, so any other id passes as given).
_SPDX = {
    "mit": "MIT", "apache-2.0": "Apache-2.0", "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause",
    "cc0-1.0": "CC0-1.0", "cc-by-4.0": "CC-BY-4.0", "cc-by-sa-4.0": "CC-BY-SA-4.0", "cc-by-nc-4.0": "CC-BY-NC-4.0",
    "cc-by-nc-sa-4.0": "CC-BY-NC-SA-4.0", "odbl": "ODbL-1.0", "other": "other",
}
_ITEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# timm's ViT sizes by (embed_dim, depth), for the short name MLM asks of the architecture.
_VIT_SIZES = {(192, 12): "Ti", (384, 12): "S", (768, 12): "B", (1024, 24): "L", (1280, 32): "H"}
# No area or period is recorded for a model: the whole world and an open period, as MLM's best
# practices suggest (STAC allows no open end, hence the far date).
_WORLD = [-180.0, -90.0, 180.0, 90.0]
_PERIOD = ("1900-01-01T00:00:00Z", "9999-12-31T23:59:59Z")
_CITE_AS = ("https://doi.org/10.1109/JSTARS.2025.3566457", "https://arxiv.org/abs/2405.09922")
_WEIGHTS_TYPE = "application/octet-stream; framework=pytorch"
_ARTIFACT_TYPE = "safetensors.torch.save"  # MLM's name for safetensors files written from torch


def stac_license(license: str) -> str:
    """``license`` (a Hub licence id such as ``cc-by-4.0``, or an SPDX id) as STAC writes it: the
    SPDX spelling (``CC-BY-4.0``), or ``other``.

    Raises:
        InvalidOptionError: not one SPDX id (spaces, an expression); ``field="license"``.
    """
    if not isinstance(license, str) or not _LICENSE.match(license):
        raise InvalidOptionError(
            f"license {license!r} is not one SPDX licence id (e.g. 'mit', 'apache-2.0', 'cc-by-4.0') or 'other': "
            "a STAC item's licence has no spaces.",
            field="license",
        )
    return _SPDX.get(license.lower(), license)


def stac_item(
    config: XStarsConfig,
    *,
    item_id: str,
    license: str | None = None,
    title: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """The STAC Item (MLM extension) of the model ``config`` describes, as a JSON-ready dict.

    Args:
        config: the model's configuration with ``files`` recorded (as ``save_pretrained`` writes it).
        item_id: the item's id (letters, digits, ``.``, ``_``, ``-``).
        license: the weights' licence (:func:`stac_license`); ``None`` leaves it out (not known).
        title: the model's name (``mlm:name``); default ``item_id``.
        description: free text; default one naming the architecture and sensors.

    Raises:
        ConfigError: a weight file of the model has no sha256 recorded in ``config.files``
            (``field="files"``), or timm cannot build the trunk (``field`` from the config).
        InvalidOptionError: a bad ``item_id`` or ``license`` (``field`` names it).
    """
    missing = [name for name in config.weight_files if name not in config.files]
    if missing:
        raise ConfigError(
            f"no sha256 recorded for weight files {missing}: the item describes saved weights; "
            "write it from save_pretrained (or with the config.json it writes).",
            field="files",
        )
    if not isinstance(item_id, str) or not _ITEM_ID.match(item_id):
        raise InvalidOptionError(
            f"item_id {item_id!r} must start with a letter or digit and use only letters, digits, '.', '_', '-'.",
            field="item_id",
        )
    spdx = None if license is None else stac_license(license)
    # Built on the meta device: shapes and parameter counts only, no memory, no random numbers drawn.
    with torch.device("meta"):
        encoder = XStarsEncoder(config.arch, config.arch_kwargs, config.sensors)
    dim = encoder.embed_dim
    name = title or item_id
    architecture = _architecture(dim, encoder.depth, config.sensors[config.primary_sensor].patch_size)
    properties: dict[str, Any] = {
        "title": name,
        "description": description or _default_description(config, architecture),
        "datetime": None,
        "start_datetime": _PERIOD[0],
        "end_datetime": _PERIOD[1],
        **({"license": spdx} if spdx is not None else {}),
        "mlm:name": name,
        "mlm:architecture": architecture,
        "mlm:tasks": list(TASKS),
        "mlm:framework": "pytorch",
        "mlm:framework_version": torch.__version__,
        "mlm:total_parameters": sum(p.numel() for p in encoder.parameters()),
        "mlm:accelerator": None,  # CPU, CUDA or MPS: none is required
        "mlm:accelerator_constrained": False,
        "mlm:input": [_model_input(config, sensor) for sensor in config.sensors],
        "mlm:output": _model_outputs(dim),
        "mlm:hyperparameters": _hyperparameters(config, encoder),
        # Every sensor's bands, which MLM inputs name; STAC 1.1 allows bands here only when assets
        # have them too, so each weight asset also lists the bands of its sensor.
        "bands": [band for sensor in config.sensors for band in _stac_bands(config, sensor)],
    }
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [MLM_SCHEMA, FILE_SCHEMA, EO_SCHEMA],
        "id": item_id,
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[-180.0, -90.0], [180.0, -90.0], [180.0, 90.0], [-180.0, 90.0], [-180.0, -90.0]]],
        },
        "bbox": list(_WORLD),
        "properties": properties,
        "links": [{"rel": "cite-as", "href": href, "type": "text/html"} for href in _CITE_AS],
        "assets": _assets(config),
    }


def write_stac_item(
    folder: str | Path,
    config: XStarsConfig,
    *,
    license: str | None = None,
    item_id: str | None = None,
    title: str | None = None,
    description: str | None = None,
) -> FileRecord:
    """Write :func:`stac_item` to ``folder/stac-item.json`` atomically; returns the file's record.
    ``item_id`` defaults to ``xstars-`` and the first 12 hex digits of the trunk's sha256, so the
    same weights give the same item wherever they are saved; the other arguments and errors are
    :func:`stac_item`'s."""
    if item_id is None and WEIGHTS_NAME in config.files:
        item_id = f"xstars-{config.files[WEIGHTS_NAME].sha256[:12]}"
    item = stac_item(config, item_id=item_id or "", license=license, title=title, description=description)
    return atomic_write_bytes(Path(folder) / STAC_ITEM_NAME, (json.dumps(item, indent=2) + "\n").encode("utf-8"))


def _architecture(dim: int, depth: int, patch: int) -> str:
    """``ViT-S/16`` for timm's standard sizes, else the width and depth spelled out."""
    size = _VIT_SIZES.get((dim, depth))
    return f"ViT-{size}/{patch}" if size else f"ViT/{patch} (embed_dim {dim}, depth {depth})"


def _default_description(config: XStarsConfig, architecture: str) -> str:
    sensors = ", ".join(f"{name} ({stem.spec.gsd_m:g} m)" for name, stem in config.sensors.items())
    return (
        f"X-STARS cross-sensor encoder ({architecture}, timm {config.arch}): one ViT trunk shared by every sensor, "
        f"one input stem per sensor: {sensors}. Each mlm:input is one sensor; the model embeds one sensor's "
        "imagery per call."
    )


def _band_name(sensor: str, band: str) -> str:
    # Sensors of one model share band names (two 'red's of different wavelengths); the item's
    # ``bands`` list needs one name per band, so each is qualified by its sensor.
    return f"{sensor}.{band}"


def _stac_bands(config: XStarsConfig, sensor: str) -> list[dict[str, Any]]:
    """STAC 1.1 band objects of ``sensor``: name, wavelengths (um), GSD (m), storage type, nodata."""
    spec = config.sensors[sensor].spec
    bands = []
    for band in spec.bands:
        entry: dict[str, Any] = {
            "name": _band_name(sensor, band.name),
            "description": f"{band.name} of sensor {sensor}" + (f" ({band.alias})" if band.alias else ""),
            **({"eo:common_name": band.name} if band.name in EO_COMMON_NAMES else {}),
            "eo:center_wavelength": band.center_um,
            "eo:full_width_half_max": band.width_um,
            "gsd": spec.gsd_m,
            "data_type": spec.dtype,
        }
        if spec.nodata is not None:
            entry["nodata"] = spec.nodata
        bands.append(entry)
    return bands


def _model_input(config: XStarsConfig, sensor: str) -> dict[str, Any]:
    """One sensor as an MLM input. The package computes ``(dn * scale + offset - mean) / std``;
    that is ``(dn - mean_dn) / std_dn`` with ``mean_dn = (mean - offset) / scale`` and
    ``std_dn = std / scale``, MLM's z-score of the digital numbers, one per band."""
    stem = config.sensors[sensor]
    spec = stem.spec
    patch = stem.patch_size
    height, width = config.stem_image_size(sensor)
    intro = f"{spec.description} " if spec.description else ""
    return {
        "name": sensor,
        "description": (
            f"{intro}Digital numbers ({spec.dtype}, {spec.units}) of sensor {sensor!r} at "
            f"{spec.gsd_m:g} m; value_scaling is the package's (dn * {spec.scale!r} + {spec.offset!r} - mean) / std "
            f"written per band in digital numbers (mean and std after scaling: mlm:hyperparameters "
            f"sensors.{sensor}). Height and width: any multiple of {patch} px (one token per {patch} x {patch} px, "
            f"{stem.token_ground_m:g} m); pretraining size {height} x {width} px. XStars.embed(images, "
            f"sensor={sensor!r}) takes the digital numbers and scales them itself."
        ),
        "bands": [_band_name(sensor, band.name) for band in spec.bands],
        "input": {
            "shape": [-1, spec.num_bands, -1, -1],
            "dim_order": ["batch", "bands", "height", "width"],
            "data_type": "float32",
        },
        "value_scaling": [
            {"type": "z-score", "mean": (band.mean - spec.offset) / spec.scale, "stddev": band.std / spec.scale}
            for band in spec.bands
        ],
        "resize_type": None,  # never resized: a resize would change the GSD the stem was trained for
        "pre_processing_function": None,
    }


def _model_outputs(dim: int) -> list[dict[str, Any]]:
    """The outputs of ``XStars.embed(..., output=NAME)``, each a float32 embedding of ``dim`` values."""
    outputs = (
        ("cls", "The CLS token: one embedding per image.", [-1, dim], ["batch", "embedding"]),
        ("mean", "The mean of the patch tokens: one embedding per image.", [-1, dim], ["batch", "embedding"]),
        ("patch", "One embedding per token, row by row.", [-1, -1, dim], ["batch", "token", "embedding"]),
        (
            "map",
            "One embedding per token as a map: (i, j) covers pixels [i*p, (i+1)*p) x [j*p, (j+1)*p) of patch size p.",
            [-1, dim, -1, -1],
            ["batch", "embedding", "height", "width"],
        ),
    )
    return [
        {
            "name": name,
            "description": f"{text} XStars.embed(images, sensor, output={name!r}).",
            "tasks": list(TASKS),
            "result": {"shape": shape, "dim_order": order, "data_type": "float32"},
            "post_processing_function": None,
        }
        for name, text, shape, order in outputs
    ]


def _hyperparameters(config: XStarsConfig, encoder: XStarsEncoder) -> dict[str, Any]:
    """The trunk's settings and each sensor's facts in the package's own terms (scale, offset,
    mean and std after scaling, as in ``config.json``)."""
    attention: Any = encoder.trunk.blocks[0].attn  # timm's Attention (blocks are typed as modules)
    sensors = {}
    for name, stem in config.sensors.items():
        spec = stem.spec
        sensors[name] = {
            "weights": WEIGHTS_NAME if name == config.primary_sensor else stem_file_name(name),
            "patch_size": stem.patch_size,
            "gsd_m": spec.gsd_m,
            "token_ground_m": stem.token_ground_m,
            "pretraining_size": list(config.stem_image_size(name)),
            "dtype": spec.dtype,
            "value_scale": spec.scale,
            "value_offset": spec.offset,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "units": spec.units,
            "normalisation_source": spec.normalisation_source,
        }
    return {
        "timm_architecture": config.arch,
        "arch_kwargs": config.arch_kwargs,
        "embed_dim": encoder.embed_dim,
        "depth": encoder.depth,
        "num_heads": attention.num_heads,
        "primary_sensor": config.primary_sensor,
        "sensors": sensors,
    }


def _file_fields(record: FileRecord) -> dict[str, Any]:
    # A multihash: 0x12 = sha2-256, 0x20 = 32 bytes of digest.
    return {"file:checksum": "1220" + record.sha256, "file:size": record.size}


def _assets(config: XStarsConfig) -> dict[str, Any]:
    """The weight files (sha256, size; the trunk's and each stem's with its sensor's bands) and
    ``config.json``. Only the ``mlm:model`` asset may name an artifact type (MLM's schema)."""
    primary = config.primary_sensor
    assets: dict[str, Any] = {
        "mlm:model": {
            "href": f"./{WEIGHTS_NAME}",
            "type": _WEIGHTS_TYPE,
            "title": f"ViT trunk with the {primary} stem",
            "description": (
                f"timm {config.arch} without classifier, its patch embedding the {primary!r} stem: "
                "XStars.from_pretrained(<folder or repo>), or timm.create_model('local-dir:<folder>' or "
                "'hf-hub:<repo>', pretrained=True) for the trunk alone."
            ),
            "roles": ["mlm:model", "mlm:weights", "weights", "data"],
            "mlm:artifact_type": _ARTIFACT_TYPE,
            **_file_fields(config.files[WEIGHTS_NAME]),
            "bands": _stac_bands(config, primary),
        }
    }
    for sensor in list(config.sensors)[1:]:
        file_name = stem_file_name(sensor)
        assets[file_name.removesuffix(".safetensors")] = {
            "href": f"./{file_name}",
            "type": _WEIGHTS_TYPE,
            "title": f"{sensor} stem",
            "description": f"Patch embedding of sensor {sensor!r}, in place of the trunk's for that sensor's imagery.",
            "roles": ["mlm:weights", "weights"],
            **_file_fields(config.files[file_name]),
            "bands": _stac_bands(config, sensor),
        }
    if WHITENING_NAME in config.weight_files:
        assets["whitening"] = {
            "href": f"./{WHITENING_NAME}",
            "type": _WEIGHTS_TYPE,
            "title": "Global-embedding whitening",
            "description": "Per-sensor centring and shared PCA whitening of the cls and mean outputs: embed(..., whiten=True).",
            "roles": ["mlm:weights", "weights"],
            **_file_fields(config.files[WHITENING_NAME]),
        }
    # No checksum: config.json is rewritten when only its metadata changes (metrics, timm keys)
    # and already records the sha256 of every weight file itself.
    assets["config"] = {
        "href": f"./{CONFIG_NAME}",
        "type": "application/json",
        "title": "Model configuration",
        "description": "Architecture, sensors and the sha256 of every weight file, as XStars.from_pretrained and timm read it.",
        "roles": ["metadata"],
    }
    return assets
