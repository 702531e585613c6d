"""View makers working on raw digital numbers of any band count: DINO multi-crop views of one
sensor's image, and the un-augmented, geometrically matched views of a multi-sensor pair that
MSAD aligns. Randomness comes only from a ``torch.Generator``, so views are reproducible."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, InvalidOptionError
from ..sensors import SensorSpec

__all__ = ["MultiCropAugment", "check_native_size", "resize"]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator)) < p


def _default_generator() -> torch.Generator:
    # Drawn from the global RNG, so torch.manual_seed still makes unseeded calls reproducible.
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))


def check_native_size(sensor: str, size: int, shape: tuple[int, ...], kind: str = "") -> None:
    """Raise InvalidInputError unless an image of ``shape`` (..., H, W) holds a ``size``-pixel square
    window: views at the sensor's own resolution (``native``) are cut, never resized.
    ``kind`` names the views in the message (e.g. ``"MSAD "``)."""
    if min(shape[-2:]) < size:
        raise InvalidInputError(
            f"Sensor {sensor!r}: native-resolution {kind}views of {size} px need images of at least that size, got "
            f"{tuple(shape[-2:])}; give larger training images or turn native crops off.",
            field="images",
        )


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``image`` (C x H x W) resized to ``size`` (H, W) px, bilinear; returned as is when it
    already has that size."""
    if tuple(image.shape[-2:]) == size:
        return image
    # Antialiasing makes down-sampling an area average rather than a sparse sampling of pixels.
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


class MultiCropAugment:
    """DINO multi-crop views of one sensor's image, in digital numbers.

    ``n_global`` crops of ``global_size`` px and ``n_local`` of ``local_size`` px, each a random
    resized crop (area fraction in ``*_scale``, aspect ratio 3/4-4/3) with random flips, then
    photometric changes that are safe for any band count and DN scale because they are relative
    to the view's own per-band statistics: contrast and brightness jitter (multiplicative, up to
    ``jitter``), Gaussian blur (probability ``blur_p``), band-wise Gaussian noise of
    ``noise_std`` times each band's standard deviation (probability ``noise_p``) and, only for
    sensors whose bands are exactly red, green and blue, conversion to grey (``grey_p``).
    Values are clamped to the sensor's integer DN range.

    Call with a ``C x H x W`` float tensor of DNs (``C`` = the spec's band count) and an optional
    ``torch.Generator``; returns the list of views, global ones first.

    With ``native``, every view is instead a crop of exactly its size at a random position,
    never resized: the views keep the sensor's ground sampling distance, so the encoder is not
    taught to ignore the scale of textures (fields, tree crowns), which at a fixed GSD tells
    land covers apart. The scales are then unused and images must be at least ``global_size``
    on each side; views of one image differ by position (what a wider image adds: neighbouring
    ground as the positive pair), flips and the photometric changes.
    """

    def __init__(
        self,
        spec: SensorSpec,
        global_size: int,
        local_size: int,
        n_global: int = 2,
        n_local: int = 4,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        jitter: float = 0.3,
        blur_p: float = 0.3,
        grey_p: float = 0.2,
        noise_p: float = 0.2,
        noise_std: float = 0.05,
        native: bool = False,
    ) -> None:
        for label, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise InvalidOptionError(f"{label} must be area fractions 0 < low <= high <= 1, got {scale}.", field=label)
        if global_size < 1 or local_size < 1:
            raise InvalidOptionError(
                f"Crop sizes must be >= 1 px, got global {global_size}, local {local_size}.",
                field="global_size" if global_size < 1 else "local_size",
            )
        self.spec, self.jitter, self.blur_p = spec, jitter, blur_p
        self.noise_p, self.noise_std, self.native = noise_p, noise_std, native
        self.grey_p = grey_p if set(spec.band_names) == {"red", "green", "blue"} else 0.0
        self.plan = [(global_size, global_scale)] * n_global + [(local_size, local_scale)] * n_local

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        if image.ndim != 3 or image.shape[0] != self.spec.num_bands:
            raise InvalidInputError(
                f"Sensor {self.spec.name!r}: augmentation expects C x H x W with C = {self.spec.num_bands}, "
                f"got {tuple(image.shape)}.",
                field="image",
            )
        if self.native:
            check_native_size(self.spec.name, max((size for size, _ in self.plan), default=0), image.shape)
        generator = generator or _default_generator()
        return [self._view(image.float(), size, scale, generator) for size, scale in self.plan]

    def _view(self, image: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
        _, height, width = image.shape
        if self.native:
            h = w = size
        else:
            area = height * width * _uniform(g, *scale)
            ratio = math.exp(_uniform(g, math.log(3 / 4), math.log(4 / 3)))
            h = min(height, max(1, round(math.sqrt(area / ratio))))
            w = min(width, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, height - h + 1, (), generator=g))
        left = int(torch.randint(0, width - w + 1, (), generator=g))
        view = resize(image[:, top : top + h, left : left + w], (size, size))
        if _chance(g, 0.5):
            view = view.flip(-1)
        if _chance(g, 0.5):
            view = view.flip(-2)
        mean = view.mean(dim=(1, 2), keepdim=True)
        contrast = _uniform(g, 1 - self.jitter, 1 + self.jitter)
        brightness = _uniform(g, 1 - self.jitter, 1 + self.jitter)
        view = (mean + (view - mean) * contrast) * brightness
        if _chance(g, self.grey_p):
            view = view.mean(dim=0, keepdim=True).expand_as(view).clone()
        if _chance(g, self.blur_p):
            view = _gaussian_blur(view, _uniform(g, 0.1, 1.5))
        if _chance(g, self.noise_p):
            std = view.std(dim=(1, 2), keepdim=True)
            view = view + torch.randn(view.shape, generator=g) * std * self.noise_std
        limits = self.spec.value_range
        return view.clamp(*limits) if limits else view


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]
