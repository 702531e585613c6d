"""X-STARS encoders as TerraTorch backbones (``pip install "xstars-models[terratorch]"``).

Importing this module adds a source ``xstars`` to TerraTorch's ``BACKBONE_REGISTRY``, so every
model of the X-STARS registry (and any local folder or Hub repo ``from_pretrained`` accepts) is a
backbone TerraTorch's factories and tasks can build by name::

    import xstars_models.integrations.terratorch  # registers the "xstars" source
    from terratorch.registry import BACKBONE_REGISTRY

    backbone = BACKBONE_REGISTRY.build(
        "xstars_xstars-s2-aerial", model_bands=["RED", "GREEN", "BLUE"], sensor="sentinel2_rgb"
    )
    maps = backbone(images)  # list of B x D x h x w, one per block in out_indices

In a TerraTorch task the same goes through ``model_args``: ``backbone="xstars_xstars-s2-aerial"``,
``backbone_model_bands=[...]``, ``backbone_sensor=...``, ``backbone_out_indices=[...]``. With the
``terratorch`` command line, put ``import xstars_models.integrations.terratorch`` in a
``custom_modules/__init__.py`` of the working directory (TerraTorch imports that folder).

The backbone takes the sensor's *digital numbers* (e.g. uint8 values as floats for the 8-bit RGB
sensors, reflectance x 1e4 for ``sentinel2``), not standardised values: each X-STARS stem applies
its sensor's own normalisation, so a TerraTorch datamodule must not standardise the images again.

Which stem runs is chosen from TerraTorch's ``model_bands``: TerraTorch's band names (``RED``,
``NIR_NARROW``, ``SWIR_1``..., see :data:`TERRATORCH_BAND_NAMES`) or the sensors' own STAC common
names and aliases (``red``, ``B04``). The sensor whose bands are exactly those names is used, with
the input channels reordered to its band order; when several sensors have the same bands (the
default model's ``sentinel2_rgb`` at 10 m and ``aerial`` at 5 m are both RGB), ``sensor=`` picks
one, and the choice is never guessed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence, Set
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError, InvalidOptionError, SensorMismatchError
from ..inputs import band_order
from ..manifest import is_registered, list_models
from ..model import XStarsBase
from ..sensors import SensorSpec

# Importing TerraTorch 1.2 changes the whole process: its Clay v1.5 backbone module sets torch's
# float32 matmul precision to "medium" and its embedding task makes every UserWarning "once".
# Importing this integration must not change the numerics or the warnings of the caller's process,
# so both are put back (when TerraTorch was imported before, it already happened and nothing changes).
_matmul_precision = torch.get_float32_matmul_precision()
with warnings.catch_warnings():
    from terratorch.registry import BACKBONE_REGISTRY
    from terratorch.utils import InvalidModelError
torch.set_float32_matmul_precision(_matmul_precision)

__all__ = [
    "SOURCE",
    "TERRATORCH_BAND_NAMES",
    "XStarsBackbone",
    "XStarsBackboneSource",
    "register",
    "select_sensor",
    "xstars_backbone",
]

# The prefix of X-STARS backbones in TerraTorch's registry: "xstars_<model id>".
SOURCE = "xstars"

# TerraTorch's band names (its HLSBands) -> the STAC EO common names X-STARS sensors use.
TERRATORCH_BAND_NAMES: dict[str, str] = {
    "COASTAL_AEROSOL": "coastal",
    "BLUE": "blue",
    "GREEN": "green",
    "RED": "red",
    "RED_EDGE_1": "rededge071",
    "RED_EDGE_2": "rededge075",
    "RED_EDGE_3": "rededge078",
    "NIR_BROAD": "nir",
    "NIR_NARROW": "nir08",
    "WATER_VAPOR": "nir09",
    "CIRRUS": "cirrus",
    "SWIR_1": "swir16",
    "SWIR_2": "swir22",
    "THERMAL_INFRARED_1": "lwir11",
    "THERMAL_INFRARED_2": "lwir12",
}


def _band_name(band: Any) -> str:
    value = band.value if isinstance(band, Enum) else band
    if not isinstance(value, str):
        raise InvalidOptionError(
            f"model_bands entry {band!r} is not a band name; X-STARS picks the sensor stem by band names, "
            f"so give TerraTorch names ({', '.join(TERRATORCH_BAND_NAMES)}) or the sensor's own band names.",
            field="model_bands",
        )
    return TERRATORCH_BAND_NAMES.get(value.upper(), value)


def _channel_order(spec: SensorSpec, names: Sequence[str]) -> list[int] | None:
    """For each band of ``spec`` (in its order), the input channel holding it; ``None`` when the
    names are not exactly the sensor's bands."""
    try:
        return band_order(spec, names)
    except ValueError:
        return None


def _describe(model: XStarsBase) -> str:
    return "; ".join(
        f"{name} ({stem.spec.gsd_m:g} m): {list(stem.spec.band_names)}" for name, stem in model.sensors.items()
    )


def select_sensor(model: XStarsBase, model_bands: Sequence[Any] | None, sensor: str | None = None) -> tuple[str, list[int]]:
    """The sensor stem for input channels named ``model_bands``, and the channel order.

    Args:
        model: the encoder.
        model_bands: the input channels' band names in order (TerraTorch names, ``HLSBands``
            members, or the sensors' common names / aliases); ``None`` means the order of
            ``sensor``'s bands.
        sensor: the stem to use; needed when ``model_bands`` is ``None`` or fits several sensors.

    Returns:
        ``(sensor, order)``: ``x[:, order]`` puts input channels in the sensor's band order.

    Raises:
        SensorMismatchError: the bands fit no sensor, or not ``sensor`` (``field="model_bands"``).
        InvalidOptionError: the bands fit several sensors and ``sensor`` is not given, or neither
            argument is given.
    """
    if sensor is not None:
        stem = model.check_sensor(sensor)
        if model_bands is None:
            return sensor, list(range(stem.spec.num_bands))
        names = [_band_name(b) for b in model_bands]
        order = _channel_order(stem.spec, names)
        if order is None:
            raise SensorMismatchError(
                f"model_bands {list(model_bands)} (as band names {names}) are not the bands of sensor "
                f"{sensor!r}, which needs exactly {list(stem.spec.band_names)}. The model's sensors: {_describe(model)}.",
                field="model_bands",
            )
        return sensor, order
    if model_bands is None:
        raise InvalidOptionError(
            f"Name the input bands (model_bands=[...]) or the stem (sensor=...); the model's sensors: {_describe(model)}.",
            field="model_bands",
        )
    names = [_band_name(b) for b in model_bands]
    fits = {name: order for name, stem in model.sensors.items() if (order := _channel_order(stem.spec, names)) is not None}
    if not fits:
        raise SensorMismatchError(
            f"model_bands {list(model_bands)} (as band names {names}) match no sensor of this model; each needs "
            f"exactly its bands, in any order: {_describe(model)}. Give those bands, or adapt the model to your "
            "sensor first (XStars.adapt).",
            field="model_bands",
        )
    if len(fits) > 1:
        options = "; ".join(f"{name} ({model.sensors[name].spec.gsd_m:g} m GSD)" for name in fits)
        raise InvalidOptionError(
            f"model_bands {list(model_bands)} fit several sensors: {options}. Pass sensor= the one whose "
            "imagery (and ground sampling distance) you feed.",
            field="sensor",
        )
    return next(iter(fits.items()))


class XStarsBackbone(nn.Module):
    """An X-STARS encoder as a TerraTorch backbone: images of one sensor in, a list of feature
    maps (one B x D x h x w per chosen block, h = H / patch size) out, as TerraTorch's necks and
    decoders expect.

    Args:
        model: the encoder.
        sensor: the stem the images go through.
        order: input channel for each of the sensor's bands (from :func:`select_sensor`); default
            the sensor's own order.
        out_indices: trunk blocks whose outputs are returned, in this order (negative counts from
            the end); default four evenly spaced blocks ending with the last, for pyramid necks.
        norm: apply the trunk's final LayerNorm to every returned map (timm's ``norm=True``);
            ``False`` returns raw block outputs, as timm's ``features_only`` does.
    """

    def __init__(
        self,
        model: XStarsBase,
        sensor: str,
        order: Sequence[int] | None = None,
        out_indices: Sequence[int] | None = None,
        norm: bool = False,
    ) -> None:
        super().__init__()
        stem = model.check_sensor(sensor)
        self.model = model
        self.sensor = sensor
        self.norm = norm
        bands = stem.spec.num_bands
        self.order = list(range(bands)) if order is None else [int(i) for i in order]
        if sorted(self.order) != list(range(bands)):
            raise InvalidOptionError(
                f"order must be a permutation of 0..{bands - 1} for sensor {sensor!r}, got {self.order}.", field="order"
            )
        depth = model.depth
        if out_indices is None:
            out_indices = [depth - 1 - step * max(depth // 4, 1) for step in range(min(4, depth))][::-1]
        wanted = [int(i) for i in out_indices]
        bad = [i for i in wanted if not -depth <= i < depth]
        if bad or not wanted:
            raise InvalidOptionError(
                f"out_indices {list(out_indices)} must be a non-empty list of block indexes in {-depth}..{depth - 1} "
                f"(the trunk has {depth} blocks).",
                field="out_indices",
            )
        self.out_indices = [i % depth for i in wanted]
        # TerraTorch pads images to a multiple of the first `patch_size` it finds among the
        # backbone's modules; this module comes first, and the trunk's own is the primary sensor's.
        self.patch_size = stem.patch_size

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned map (TerraTorch builds necks and decoders from this)."""
        return [self.model.embed_dim] * len(self.out_indices)

    @property
    def band_names(self) -> tuple[str, ...]:
        """The sensor's bands in the order the input channels must hold them."""
        names = self.model.sensors[self.sensor].spec.band_names
        return tuple(names[self.order.index(j)] for j in range(len(names)))

    def forward(self, x: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
        """Feature maps of ``x``: B x C x H x W digital numbers of the sensor (float), channels as
        named by ``model_bands``, H and W multiples of ``patch_size`` pixels."""
        if x.ndim != 4 or x.shape[1] != len(self.order):
            raise InvalidInputError(
                f"Sensor {self.sensor!r} expects B x {len(self.order)} x H x W images with bands {list(self.band_names)}, "
                f"got shape {tuple(x.shape)}.",
                field="x",
            )
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise InvalidInputError(
                f"Sensor {self.sensor!r}: images of {x.shape[-2]} x {x.shape[-1]} px are not a whole number of "
                f"{p} px patches; crop or pad them (TerraTorch's factories pad when the task's padding is set).",
                field="x",
            )
        taken = sorted(set(self.out_indices))
        maps = self.model.forward_intermediates(
            x[:, self.order].float(), self.sensor, indices=taken, norm=self.norm, intermediates_only=True, output_fmt="NCHW"
        )
        by_block = dict(zip(taken, maps))
        return [by_block[i] for i in self.out_indices]


def xstars_backbone(
    name_or_path: str | Path,
    model_bands: Sequence[Any] | None = None,
    sensor: str | None = None,
    out_indices: Sequence[int] | None = None,
    pretrained: bool = True,
    norm: bool = False,
    revision: str | None = None,
    local_files_only: bool = False,
    **unused: Any,
) -> XStarsBackbone:
    """Build a TerraTorch backbone from an X-STARS model (registry id, Hub repo or folder).

    ``pretrained=False`` gives the same configuration with fresh random weights from the global
    random state (the saved files are still read, for the configuration); the baseline a
    fine-tuning result should be compared with. See :func:`select_sensor` for ``model_bands`` /
    ``sensor`` and :class:`XStarsBackbone` for ``out_indices`` / ``norm``.

    Raises:
        InvalidOptionError: an argument TerraTorch passed that this backbone does not know
            (``field``: the first of them).
        SensorMismatchError, InvalidOptionError: bands that select no single sensor (see
            :func:`select_sensor`).
    """
    if unused:
        raise InvalidOptionError(
            f"X-STARS backbones take model_bands, sensor, out_indices, pretrained, norm, revision and "
            f"local_files_only; got also {sorted(unused)}.",
            field=sorted(unused)[0],
        )
    model = XStarsBase.from_pretrained(name_or_path, revision=revision, local_files_only=local_files_only)
    if not pretrained:
        model = XStarsBase(model.config)
    chosen, order = select_sensor(model, model_bands, sensor)
    # from_pretrained returns an inference model; a backbone starts in training mode like any new
    # module, and the task switches it (Lightning warns about sub-modules left in eval mode).
    return XStarsBackbone(model, chosen, order, out_indices, norm).train()


class XStarsBackboneSource(Set):
    """TerraTorch registry source: the X-STARS registry's model ids are its names, and any name
    ``XStars.from_pretrained`` accepts (a folder, ``org/name``) can be built with the prefix."""

    def __iter__(self) -> Iterator[str]:
        return iter(list_models())

    def __len__(self) -> int:
        return len(list_models())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and is_registered(name)

    def build(self, name: str, *args: Any, **kwargs: Any) -> XStarsBackbone:
        """The backbone for ``name``; TerraTorch's ``InvalidModelError`` for a name that is not an
        X-STARS model, so the registry can try its other sources."""
        if args:
            raise InvalidOptionError(f"X-STARS backbones take keyword arguments only, got positional {args!r}.", field="args")
        if not (is_registered(name) or os.path.isdir(name) or "/" in name):
            raise InvalidModelError(
                f"{name!r} is not an X-STARS model (registry ids: {sorted(list_models())}; or a folder, or a Hub "
                "repo 'org/name').",
                model_name=name,
            )
        return xstars_backbone(name, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return f"X-STARS registry with {len(self)} models"


def register() -> None:
    """Add the ``xstars`` source to TerraTorch's ``BACKBONE_REGISTRY`` (done on import; again is
    a no-op)."""
    if SOURCE not in BACKBONE_REGISTRY.keys():
        BACKBONE_REGISTRY.register_source(SOURCE, XStarsBackboneSource())


register()
