"""X-STARS weights the TorchGeo way (``pip install "xstars-models[torchgeo]"`` for TorchGeo's
datasets and samplers): a ``WeightsEnum`` whose members carry the sensor's facts in ``meta`` and
the sensor's own normalisation as ``transforms``, and a builder that returns a plain timm ViT::

    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler
    from xstars_models.integrations.torchgeo import XStarsS2Aerial_Weights, xstars_vit

    weights = XStarsS2Aerial_Weights.SENTINEL2_RGB
    encoder = xstars_vit(weights).eval()              # timm ViT, the sensor's stem, no classifier
    dataset = RasterDataset("scenes/")                # 8-bit R, G, B GeoTIFFs at 10 m
    loader = DataLoader(dataset, sampler=GridGeoSampler(dataset, size=64), collate_fn=stack_samples)
    for batch in loader:
        vectors = encoder(weights.transforms(batch["image"]))  # B x D, = model.embed(...) on those pixels

Feed the sensor's digital numbers (``batch["image"]`` as TorchGeo reads them, e.g. 0-255 for the
8-bit RGB sensors). ``weights.transforms`` computes ``(dn * scale + offset - mean) / std`` with
the model's own constants (``meta["scale"]``, ``meta["mean"]``...), the same arithmetic as
``XStars.embed``. Do not add TorchGeo's ``Normalize`` (or a datamodule's ``mean``/``std``, or a
division by 255) as well: the images would be normalised twice and the embeddings would be
silently wrong. The transform takes a tensor (``... x C x H x W``) or a TorchGeo sample dict
(``RasterDataset(..., transforms=weights.transforms)`` normalises each sample's ``"image"``).

``WeightsEnum`` is TorchGeo's own base class (TorchGeo uses torchvision's, which timm already
installs), so this module imports without TorchGeo. ``url`` says where the files are (a
``file://`` URL of the bundled model's folder: the trunk, and the stem file for a non-primary
sensor); :meth:`XStarsS2Aerial_Weights.get_state_dict` never downloads it: it loads the model
through the X-STARS registry (offline for bundled models, every file checked against its sha256)
and returns the state dict of a timm ViT built from ``meta["model"]`` and ``meta["model_args"]``.
TorchGeo's trainers build ``timm.create_model(model)`` with the architecture's default patch and
image size, which these weights do not fit: build the encoder with :func:`xstars_vit`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models import Weights, WeightsEnum

from ..config import WEIGHTS_NAME
from ..encoder import SensorNorm
from ..errors import InvalidInputError
from ..hub import resolve_model
from ..manifest import get_model_entry
from ..model import XStarsBase
from ..sensors import SensorSpec
from ..serialization import load_state_dict_strict

__all__ = ["XStarsNormalize", "XStarsS2Aerial_Weights", "xstars_vit"]

PUBLICATION = "https://arxiv.org/abs/2405.09922"


class XStarsNormalize(nn.Module):
    """Digital numbers -> the trunk's inputs, ``(dn * scale + offset - mean) / std`` per band: the
    X-STARS sensor normalisation (:class:`~xstars_models.encoder.SensorNorm`'s constants) for
    tensors ``... x C x H x W`` or TorchGeo sample dicts (their ``"image"``). Integer inputs come
    back as float32. Already normalised images must not go through it again."""

    gain: torch.Tensor
    bias: torch.Tensor

    def __init__(self, spec: SensorSpec) -> None:
        super().__init__()
        norm = SensorNorm(spec)  # 1 x C x 1 x 1 constants; kept as C x 1 x 1 to broadcast over any batch shape
        self.register_buffer("gain", norm.gain[0], persistent=False)
        self.register_buffer("bias", norm.bias[0], persistent=False)
        self.sensor = spec.name

    def forward(self, x: torch.Tensor | Mapping[str, Any]) -> Any:
        if isinstance(x, Mapping):
            return {**x, "image": self(x["image"])}
        if x.dim() < 3 or x.shape[-3] != self.gain.shape[0]:
            raise InvalidInputError(
                f"{self.sensor} images have {self.gain.shape[0]} bands, as ... x C x H x W; got shape {tuple(x.shape)}.",
                field="images",
            )
        x = x if x.is_floating_point() else x.float()
        # .to() copies when the batch is elsewhere; the shared enum member's buffers stay put.
        return x * self.gain.to(x.device, x.dtype) + self.bias.to(x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"sensor={self.sensor!r}"


def _weights(model_id: str, sensor: str) -> Weights:
    """One enum value from the registry entry and the ``config.json`` it verifies (no weights read)."""
    resolved = resolve_model(model_id)
    config = resolved.config
    stem = config.sensors[sensor]
    spec = stem.spec
    return Weights(
        url=resolved.paths[WEIGHTS_NAME].parent.as_uri(),
        transforms=XStarsNormalize(spec),
        meta={
            "model_id": model_id,
            "sensor": sensor,
            "model": config.arch,
            "model_args": {
                **config.arch_kwargs,
                "patch_size": stem.patch_size,
                "img_size": list(config.stem_image_size(sensor)),
                "in_chans": spec.num_bands,
                "dynamic_img_size": True,
            },
            "in_chans": spec.num_bands,
            "bands": list(spec.band_names),
            "band_aliases": [band.alias for band in spec.bands],
            "gsd_m": spec.gsd_m,
            "patch_size": stem.patch_size,
            "dtype": spec.dtype,
            "scale": spec.scale,
            "offset": spec.offset,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "license": get_model_entry(model_id).license,
            "publication": PUBLICATION,
        },
    )


class XStarsS2Aerial_Weights(WeightsEnum):  # TorchGeo's naming: <model>_Weights
    """The bundled ``xstars-s2-aerial`` model (ViT-Tiny, patch 8 at 10 m), one member per sensor.

    ``meta``: ``model_id`` (X-STARS registry id), ``sensor``, ``bands`` (names in channel order)
    and ``band_aliases`` (e.g. Sentinel-2 ``B04``; ``None`` where a band has none), ``in_chans``,
    ``gsd_m`` (ground sampling distance, metres), ``patch_size`` (pixels), the input's ``dtype``,
    ``scale``/``offset`` (``value = dn * scale + offset``) and ``mean``/``std`` (of ``value``),
    ``model`` and ``model_args`` (timm's architecture and keywords for this sensor's trunk),
    ``license`` and ``publication``.
    """

    SENTINEL2_RGB = _weights("xstars-s2-aerial", "sentinel2_rgb")
    AERIAL = _weights("xstars-s2-aerial", "aerial")

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        # By name: the value's transforms module equals only itself, so a member pickled by value
        # (DataLoader workers, saved hyperparameters) would not be found again when unpickled.
        return getattr, (type(self), self.name)

    def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The weights of a timm ViT built with ``timm.create_model(meta["model"],
        **meta["model_args"])``: the shared trunk with this sensor's stem as ``patch_embed``.
        Loaded through the X-STARS registry, offline for bundled models, sha256-checked.
        torch.hub's download arguments (TorchGeo's trainers pass ``progress=``) are accepted and
        unused: nothing is downloaded."""
        model = XStarsBase.from_pretrained(self.meta["model_id"])
        state: dict[str, Any] = dict(model.trunk.state_dict())
        stem = model.patch_embed_for(self.meta["sensor"])
        state.update({f"patch_embed.{key}": value for key, value in stem.state_dict().items()})
        return state


def xstars_vit(weights: XStarsS2Aerial_Weights, num_classes: int = 0) -> VisionTransformer:
    """A plain timm ``VisionTransformer`` with the weights of ``weights`` (TorchGeo's builder
    style): it takes normalised images (``weights.transforms(dn)``) of any height and width that
    are multiples of ``meta["patch_size"]``; its output is the final-norm CLS token, B x D, the
    same as ``XStars.embed(dn, meta["sensor"])``. ``num_classes > 0`` adds a new, randomly
    initialised linear head."""
    meta = weights.meta
    model = cast(VisionTransformer, timm.create_model(meta["model"], num_classes=num_classes, **meta["model_args"]))
    # The new head keeps its own initial weights; every other tensor must come from the model.
    head = {key: value for key, value in model.state_dict().items() if key.startswith("head.")}
    load_state_dict_strict(model, {**weights.get_state_dict(), **head}, f"{weights!r} ({meta['model_id']})")
    return model
