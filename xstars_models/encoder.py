"""The X-STARS encoder: one timm ``VisionTransformer`` trunk shared by every sensor, and one input
stem per sensor (value normalisation + patch embedding).

The trunk's own ``patch_embed`` is the stem of the *primary* sensor, so ``trunk.state_dict()`` has
exactly timm's keys and loads into a plain ``timm.create_model(...)``. Every other sensor has its
own patch embedding whose patch size in pixels makes each token cover the same ground as the
primary sensor's tokens; token grids of the same footprint then line up position by position,
which is what the MSAD loss relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import timm
import torch
from timm.layers import PatchEmbed, resample_patch_embed
from torch import nn

from .sensors import SensorSpec

__all__ = ["SensorNorm", "StemConfig", "XStarsEncoder", "build_trunk"]


@dataclass(frozen=True)
class StemConfig:
    """A sensor as one model sees it: its spec and the patch size (pixels) of its stem."""

    spec: SensorSpec
    patch_size: int

    @property
    def token_ground_m(self) -> float:
        """Side of the ground square one token covers, in metres."""
        return self.patch_size * self.spec.gsd_m


class SensorNorm(nn.Module):
    """Digital numbers -> normalised inputs: ``((x * scale + offset) - mean) / std`` per band.

    The constants come from the :class:`SensorSpec` stored in the model's config, so they are
    non-persistent buffers rather than weights.
    """

    def __init__(self, spec: SensorSpec) -> None:
        super().__init__()
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("gain", spec.scale / std, persistent=False)
        self.register_buffer("bias", (spec.offset - mean) / std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + self.bias


def build_trunk(arch: str, in_chans: int, **arch_kwargs: Any) -> nn.Module:
    """A timm ViT without classifier that accepts any image size (position embeddings are
    interpolated to the token grid)."""
    trunk = timm.create_model(
        arch, pretrained=False, num_classes=0, dynamic_img_size=True, in_chans=in_chans, **arch_kwargs
    )
    if not hasattr(trunk, "blocks") or not hasattr(trunk, "_pos_embed"):
        raise ValueError(
            f"Architecture {arch!r} is not a timm VisionTransformer; X-STARS encoders need one "
            "(e.g. 'vit_small_patch16_224')."
        )
    return trunk


def _make_patch_embed(stem: StemConfig, embed_dim: int) -> PatchEmbed:
    return PatchEmbed(
        img_size=None,
        patch_size=stem.patch_size,
        in_chans=stem.spec.num_bands,
        embed_dim=embed_dim,
        output_fmt="NHWC",
        strict_img_size=False,
    )


class XStarsEncoder(nn.Module):
    """A shared ViT trunk with one input stem per sensor.

    Args:
        arch: timm model name of the trunk (``vit_small_patch16_224``).
        arch_kwargs: overrides passed to ``timm.create_model`` (``patch_size``, ``img_size``,
            ``embed_dim``, ``depth``...). ``img_size`` only sets the position-embedding grid.
        sensors: stems by sensor name, the primary first. The primary's patch size must equal
            the trunk's.
    """

    def __init__(self, arch: str, arch_kwargs: dict[str, Any], sensors: dict[str, StemConfig]) -> None:
        super().__init__()
        if not sensors:
            raise ValueError("An encoder needs at least one sensor.")
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs)
        self.primary_sensor = next(iter(sensors))
        primary = sensors[self.primary_sensor]
        self.trunk = build_trunk(arch, primary.spec.num_bands, **self.arch_kwargs)
        trunk_patch = self.trunk.patch_embed.patch_size[0]
        if primary.patch_size != trunk_patch:
            raise ValueError(
                f"Primary sensor {self.primary_sensor!r} has patch size {primary.patch_size} px but "
                f"the trunk {arch!r} uses {trunk_patch} px; set arch_kwargs['patch_size']."
            )
        self.sensors: dict[str, StemConfig] = {self.primary_sensor: primary}
        self.stems = nn.ModuleDict()
        self.norms = nn.ModuleDict({self.primary_sensor: SensorNorm(primary.spec)})
        for name, stem in list(sensors.items())[1:]:
            self._attach(name, stem, _make_patch_embed(stem, self.embed_dim))

    @property
    def embed_dim(self) -> int:
        return self.trunk.embed_dim

    @property
    def depth(self) -> int:
        return len(self.trunk.blocks)

    def _attach(self, name: str, stem: StemConfig, patch_embed: PatchEmbed) -> None:
        if name in self.sensors:
            raise ValueError(f"The model already has a sensor named {name!r}.")
        self.sensors[name] = stem
        self.stems[name] = patch_embed
        self.norms[name] = SensorNorm(stem.spec)

    def patch_embed_for(self, sensor: str) -> nn.Module:
        """The patch embedding of ``sensor`` (the trunk's own for the primary sensor)."""
        self.check_sensor(sensor)
        return self.trunk.patch_embed if sensor == self.primary_sensor else self.stems[sensor]

    def check_sensor(self, sensor: str) -> StemConfig:
        try:
            return self.sensors[sensor]
        except KeyError:
            raise ValueError(
                f"This model has no stem for sensor {sensor!r}; it knows {list(self.sensors)}. "
                "Add one with add_sensor() or adapt()."
            ) from None

    def add_sensor(
        self,
        spec: SensorSpec,
        patch_size: int | None = None,
        init_from: str | None = None,
        name: str | None = None,
    ) -> StemConfig:
        """Give the encoder a stem for a new sensor.

        Args:
            spec: the new sensor.
            patch_size: pixels per token side. Default: chosen from the GSD ratio so that a token
                covers the same ground as the primary sensor's tokens; an error if no whole number
                of pixels does.
            init_from: an existing sensor whose patch embedding initialises the new one: each new
                band copies the kernel of the band with the nearest centre wavelength, resized to
                the new patch size. ``None`` keeps a random initialisation.
            name: the name the model knows the sensor by (default ``spec.name``).
        """
        name = name or spec.name
        ground = self.sensors[self.primary_sensor].token_ground_m
        if patch_size is None:
            exact = ground / spec.gsd_m
            patch_size = round(exact)
            if patch_size < 1 or not math.isclose(exact, patch_size, rel_tol=1e-6):
                raise ValueError(
                    f"Sensor {name!r} at {spec.gsd_m:g} m GSD: tokens of the primary sensor cover "
                    f"{ground:g} m, which is {exact:.3f} px, not a whole number. Pass patch_size "
                    f"explicitly, or resample the imagery to a GSD that divides {ground:g} m."
                )
        stem = StemConfig(spec, int(patch_size))
        patch_embed = _make_patch_embed(stem, self.embed_dim)
        if init_from is not None:
            self.check_sensor(init_from)
            with torch.no_grad():
                weight, bias = _nearest_wavelength_kernel(
                    self.patch_embed_for(init_from), self.sensors[init_from].spec, spec, stem.patch_size
                )
                patch_embed.proj.weight.copy_(weight)
                patch_embed.proj.bias.copy_(bias)
        self._attach(name, stem, patch_embed.to(self.trunk.cls_token.device))
        return stem

    def forward_tokens(
        self, x: torch.Tensor, sensor: str, indices: int | Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """Run the encoder on digital numbers ``x`` (B x C x H x W) of ``sensor``.

        Returns:
            ``(tokens, intermediates, (h, w))``: the final LayerNorm-ed tokens B x (1 + h*w) x D
            with the CLS token first; the raw outputs (same layout, no final norm) of the blocks
            chosen by ``indices`` (timm convention: int = that many last blocks, sequence =
            those block indexes, None = all); and the token grid size.
        """
        take = _take_indices(self.depth, indices)
        trunk = self.trunk
        tokens = self.patch_embed_for(sensor)(self.norms[sensor](x))  # B x h x w x D
        h, w = tokens.shape[1:3]
        tokens = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(tokens)))
        intermediates = []
        for i, block in enumerate(trunk.blocks):
            tokens = block(tokens)
            if i in take:
                intermediates.append(tokens)
        return trunk.norm(tokens), intermediates, (h, w)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        sensor: str,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` for one sensor: final tokens and the patch tokens of
        the chosen blocks, as B x D x h x w (``NCHW``) or B x h*w x D (``NLC``); ``norm`` applies
        the final LayerNorm to them."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        final, intermediates, (h, w) = self.forward_tokens(x, sensor, indices)
        prefix = self.trunk.num_prefix_tokens
        out = []
        for y in intermediates:
            y = (self.trunk.norm(y) if norm else y)[:, prefix:]
            out.append(y.reshape(len(y), h, w, -1).permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        return final, out

    def forward(self, x: torch.Tensor, sensor: str) -> torch.Tensor:
        """Final normalised tokens, B x (1 + N) x D, CLS first."""
        return self.forward_tokens(x, sensor, indices=[])[0]


def _take_indices(depth: int, indices: int | Sequence[int] | None) -> set[int]:
    if indices is None:
        return set(range(depth))
    if isinstance(indices, int):
        if not 0 <= indices <= depth:
            raise ValueError(f"Asked for the last {indices} blocks of a {depth}-block encoder.")
        return set(range(depth - indices, depth))
    taken = {i if i >= 0 else depth + i for i in indices}
    bad = sorted(i for i in taken if not 0 <= i < depth)
    if bad:
        raise ValueError(f"Block indexes {list(indices)} out of range for a {depth}-block encoder.")
    return taken


def _nearest_wavelength_kernel(
    source: PatchEmbed, source_spec: SensorSpec, target_spec: SensorSpec, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-embedding kernel for ``target_spec`` built from ``source``'s, band by nearest centre
    wavelength, resized with timm's pseudo-inverse patch resampling (FlexiViT) so that an image
    up-sampled by the patch-size ratio gives the same tokens."""
    weight = source.proj.weight  # D x C_src x p x p
    picks = [
        min(range(source_spec.num_bands), key=lambda k: abs(source_spec.bands[k].center_um - band.center_um))
        for band in target_spec.bands
    ]
    weight = weight[:, picks]
    if weight.shape[-1] != patch_size:
        weight = resample_patch_embed(weight, [patch_size, patch_size])
    return weight, source.proj.bias.detach().clone()
