"""The X-STARS encoder: one timm ``VisionTransformer`` trunk shared by every sensor, and one input
stem per sensor (value normalisation + patch embedding).

The trunk's own ``patch_embed`` is the stem of the *primary* sensor, so ``trunk.state_dict()`` has
exactly timm's keys and loads into a plain ``timm.create_model(...)``. Every other sensor has its
own patch embedding whose patch size in pixels makes each token cover the same ground as the
primary sensor's tokens; token grids of the same footprint then line up position by position,
which is what the MSAD loss relies on.

The trunk runs timm's own ``forward_features`` / ``forward_intermediates`` for every sensor (so
``set_grad_checkpointing`` and ``stop_early`` work as in timm): its ``patch_embed`` is a
:class:`SensorPatchEmbed`, which hands the image to another sensor's stem while the encoder routes
a forward pass to that sensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import timm
import torch
from timm.layers import PatchEmbed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import StemConfig, arch_kwargs_problem
from .errors import ConfigError, InvalidOptionError
from .sensors import SensorSpec

__all__ = ["SensorNorm", "SensorPatchEmbed", "StemConfig", "XStarsEncoder", "build_trunk", "pool_tokens"]


class SensorNorm(nn.Module):
    """Digital numbers -> normalised inputs: ``((x * scale + offset) - mean) / std`` per band.

    The constants come from the :class:`SensorSpec` stored in the model's config, so they are
    non-persistent buffers rather than weights.
    """

    gain: torch.Tensor
    bias: torch.Tensor

    def __init__(self, spec: SensorSpec) -> None:
        super().__init__()
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("gain", spec.scale / std, persistent=False)
        self.register_buffer("bias", (spec.offset - mean) / std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + self.bias


class SensorPatchEmbed(PatchEmbed):
    """The trunk's patch embedding: timm's ``PatchEmbed`` for the primary sensor (same parameters
    and state-dict keys), which hands the image to another sensor's stem inside
    :meth:`routed_to`. timm builds it through ``VisionTransformer(embed_layer=...)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A tuple, not a module attribute: nn.Module would register the stem as a submodule and
        # its weights would leak into the trunk's (timm) state dict.
        self._route: tuple[PatchEmbed, ...] = ()

    @contextmanager
    def routed_to(self, stem: PatchEmbed | None) -> Iterator[None]:
        """Within the block, images go through ``stem`` (``None``: this, the primary's, embedding).
        A model must not run two sensors at once from different threads."""
        previous = self._route
        self._route = () if stem is None or stem is self else (stem,)
        try:
            yield
        finally:
            self._route = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._route[0](x) if self._route else super().forward(x)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        # timm's forward_intermediates asks this for the token grid of NCHW outputs.
        if self._route:
            return self._route[0].dynamic_feat_size(img_size)
        return super().dynamic_feat_size(img_size)


# timm modules whose models are VisionTransformer (or subclasses), the only trunks X-STARS builds on.
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def is_vit_arch(arch: str) -> bool:
    """Whether timm builds ``arch`` as a ``VisionTransformer`` (without building it)."""
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__ in VIT_MODULES


def build_trunk(arch: str, in_chans: int, **arch_kwargs: Any) -> VisionTransformer:
    """A timm ViT without classifier that accepts any image size (position embeddings are
    interpolated to the token grid), with a :class:`SensorPatchEmbed`.

    Raises:
        InvalidOptionError: ``arch`` is not a timm ViT (``field="arch"``).
        ConfigError: an ``arch_kwargs`` key timm's ViT does not take or the model sets itself
            (``field="arch_kwargs.KEY"``), or values timm cannot build a trunk from
            (``field="arch_kwargs"``).
    """
    if not is_vit_arch(arch):
        raise InvalidOptionError(
            f"Architecture {arch!r} is not a timm VisionTransformer; X-STARS encoders need one "
            "(e.g. 'vit_small_patch16_224').",
            field="arch",
        )
    problem = arch_kwargs_problem(arch_kwargs)
    if problem is not None:
        raise ConfigError(f"arch_kwargs of {arch!r}: {problem[1]}.", field=f"arch_kwargs.{problem[0]}")
    try:
        trunk = timm.create_model(
            arch, pretrained=False, num_classes=0, dynamic_img_size=True, in_chans=in_chans, embed_layer=SensorPatchEmbed,
            **arch_kwargs,
        )
    # What timm raises from deep inside for a value of the wrong type or range (mlp_ratio="x", num_heads not dividing embed_dim).
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(
            f"timm cannot build {arch!r} with arch_kwargs {arch_kwargs} ({type(err).__name__}: {str(err)[:200]}).",
            field="arch_kwargs",
        ) from None
    # is_vit_arch checked that the entrypoint builds a VisionTransformer.
    return cast(VisionTransformer, trunk)


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

    Raises:
        InvalidOptionError: no sensors, or ``arch`` not a timm ViT.
        ConfigError: the primary sensor's patch size is not the trunk's (``"arch_kwargs.patch_size"``).
    """

    def __init__(self, arch: str, arch_kwargs: dict[str, Any], sensors: dict[str, StemConfig]) -> None:
        super().__init__()
        if not sensors:
            raise InvalidOptionError("An encoder needs at least one sensor.", field="sensors")
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs)
        self.primary_sensor = next(iter(sensors))
        primary = sensors[self.primary_sensor]
        self.trunk = build_trunk(arch, primary.spec.num_bands, **self.arch_kwargs)
        trunk_patch = self.trunk.patch_embed.patch_size[0]
        if primary.patch_size != trunk_patch:
            raise ConfigError(
                f"Primary sensor {self.primary_sensor!r} has patch size {primary.patch_size} px but "
                f"the trunk {arch!r} uses {trunk_patch} px; set arch_kwargs['patch_size'].",
                field="arch_kwargs.patch_size",
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

    @property
    def device(self) -> torch.device:
        """Where the trunk's weights are (and so where inputs must go)."""
        return next(self.trunk.parameters()).device

    def _attach(self, name: str, stem: StemConfig, patch_embed: PatchEmbed) -> None:
        if name in self.sensors:
            raise InvalidOptionError(f"The model already has a sensor named {name!r}.", field="name")
        self.sensors[name] = stem
        self.stems[name] = patch_embed
        self.norms[name] = SensorNorm(stem.spec)

    def patch_embed_for(self, sensor: str) -> PatchEmbed:
        """The patch embedding of ``sensor`` (the trunk's own for the primary sensor)."""
        self.check_sensor(sensor)
        # Both are PatchEmbed (SensorPatchEmbed is one); nn.Module's attribute access types them as Module.
        return cast(PatchEmbed, self.trunk.patch_embed if sensor == self.primary_sensor else self.stems[sensor])

    def check_sensor(self, sensor: str) -> StemConfig:
        """The stem of ``sensor``.

        Raises:
            InvalidOptionError: the model has no such sensor (``field="sensor"``).
        """
        try:
            return self.sensors[sensor]
        except KeyError:
            raise InvalidOptionError(
                f"This model has no stem for sensor {sensor!r}; it knows {list(self.sensors)}. "
                "Add one with add_sensor() or adapt().",
                field="sensor",
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

        Raises:
            InvalidOptionError: a ``patch_size`` that is not a whole number >= 1, no whole
                ``patch_size`` fits the GSDs, a ``name`` the model already has, an unknown ``init_from``.
        """
        name = name or spec.name
        ground = self.sensors[self.primary_sensor].token_ground_m
        whole = isinstance(patch_size, numbers.Real) and not isinstance(patch_size, bool) and float(patch_size).is_integer()
        if patch_size is not None and not (whole and patch_size >= 1):
            raise InvalidOptionError(
                f"{{patch_size}}: pixels per token side must be a whole number >= 1 (leave it out to take it from "
                f"the GSDs: tokens of the primary sensor cover {ground:g} m).",
                field="patch_size", settings={"patch_size": patch_size},
            )
        if patch_size is None:
            exact = ground / spec.gsd_m
            patch_size = round(exact)
            if patch_size < 1 or not math.isclose(exact, patch_size, rel_tol=1e-6):
                raise InvalidOptionError(
                    f"Sensor {name!r} at {spec.gsd_m:g} m GSD: tokens of the primary sensor cover "
                    f"{ground:g} m, which is {exact:.3f} px, not a whole number. Pass patch_size "
                    f"explicitly, or resample the imagery to a GSD that divides {ground:g} m.",
                    field="patch_size",
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
                if patch_embed.proj.bias is not None:
                    # A trunk without a patch bias (pre-norm ViTs) adds nothing there: the new stem starts at zero.
                    patch_embed.proj.bias.copy_(bias) if bias is not None else patch_embed.proj.bias.zero_()
        self._attach(name, stem, patch_embed.to(self.device))
        return stem

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each trunk block's activations in the backward pass instead of keeping them
        (timm's gradient checkpointing): less memory for the same gradients, about a third more
        compute."""
        self.trunk.set_grad_checkpointing(enable)

    @contextmanager
    def _routed(self, sensor: str) -> Iterator[None]:
        self.check_sensor(sensor)
        stem = None if sensor == self.primary_sensor else self.stems[sensor]
        with self.trunk.patch_embed.routed_to(stem):
            yield

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
        take = take_indices(self.depth, indices)
        grid = self.patch_embed_for(sensor).dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = self.norms[sensor](x)
        with self._routed(sensor):
            if not take:
                return self.trunk.forward_features(x), [], grid
            # Not intermediates_only: timm returns (final, intermediates), each intermediate as
            # (patch tokens, prefix tokens) with return_prefix_tokens.
            final, taken = cast(
                "tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]",
                self.trunk.forward_intermediates(x, indices=take, return_prefix_tokens=True, output_fmt="NLC"),
            )
        # Prefix tokens (CLS...) first, as in the final output; a trunk without any has empty prefixes.
        return final, [torch.cat([prefix, patches], dim=1) for patches, prefix in taken], grid

    def forward_intermediates(
        self,
        x: torch.Tensor,
        sensor: str,
        indices: int | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        """timm's ``VisionTransformer.forward_intermediates`` on digital numbers ``x`` of
        ``sensor``, with timm's options (``norm``, ``output_fmt`` ``"NCHW"``/``"NLC"``,
        ``stop_early``, ``intermediates_only``, ``return_prefix_tokens``...). By default: the
        final tokens and the patch tokens of the chosen blocks as B x D x h x w."""
        output_fmt = kwargs.get("output_fmt", "NCHW")
        if output_fmt not in ("NCHW", "NLC"):
            raise InvalidOptionError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.", field="output_fmt")
        take = take_indices(self.depth, indices)
        if not take:
            raise InvalidOptionError(
                "{indices} chooses no block; forward_tokens() gives the final tokens alone.",
                field="indices",
                settings={"indices": indices},
            )
        self.check_sensor(sensor)
        with self._routed(sensor):
            return self.trunk.forward_intermediates(self.norms[sensor](x), indices=take, **kwargs)

    def forward(self, x: torch.Tensor, sensor: str) -> torch.Tensor:
        """Final normalised tokens, B x (1 + N) x D, CLS first."""
        return self.forward_tokens(x, sensor, indices=[])[0]


def take_indices(depth: int, indices: int | Sequence[int] | None, field: str = "indices") -> list[int]:
    """Block indexes (ascending, non-negative) chosen by timm's ``indices`` convention.

    Raises:
        InvalidOptionError: a count or index outside the ``depth`` blocks (timm only asserts);
            ``field`` is the caller's name for ``indices`` (``"layers"`` in ``embed``).
    """
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 <= indices <= depth:
            raise InvalidOptionError(f"Asked for the last {indices} blocks of a {depth}-block encoder.", field=field)
        return list(range(depth - indices, depth))
    taken = {i if i >= 0 else depth + i for i in indices}
    bad = sorted(i for i in taken if not 0 <= i < depth)
    if bad:
        raise InvalidOptionError(f"Block indexes {list(indices)} out of range for a {depth}-block encoder.", field=field)
    return sorted(taken)


def _nearest_wavelength_kernel(
    source: PatchEmbed, source_spec: SensorSpec, target_spec: SensorSpec, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch-embedding kernel and bias (``None`` where ``source`` has none) for ``target_spec``
    built from ``source``'s, band by nearest centre wavelength, resized with timm's pseudo-inverse
    patch resampling (FlexiViT) so that an image up-sampled by the patch-size ratio gives the same
    tokens."""
    weight = source.proj.weight  # D x C_src x p x p
    picks = [
        min(range(source_spec.num_bands), key=lambda k: abs(source_spec.bands[k].center_um - band.center_um))
        for band in target_spec.bands
    ]
    weight = weight[:, picks]
    if weight.shape[-1] != patch_size:
        weight = resample_patch_embed(weight, [patch_size, patch_size])
    bias = source.proj.bias
    return weight, None if bias is None else bias.detach().clone()


def pool_tokens(tokens: torch.Tensor, output: str, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """B x (prefix + h*w) x D tokens as ``output`` lays them out (``"cls"``, ``"mean"``,
    ``"patch"`` or ``"map"`` on the ``grid`` of h x w tokens: see ``XStarsBase.embed``), as
    float32 on the CPU. Shapes are read from the tensors, so a traced graph keeps them dynamic."""
    patches = tokens[:, prefix:]
    if output == "cls":
        out = tokens[:, 0]
    elif output == "mean":
        out = patches.mean(dim=1)
    elif output == "patch":
        out = patches
    else:
        out = patches.reshape(patches.shape[0], *grid, -1).permute(0, 3, 1, 2)
    return out.float().cpu()
