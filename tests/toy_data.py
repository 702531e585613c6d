"""A small paired data set whose two sensors share content: the aerial image (5 m) is the
Sentinel-2 image (10 m) up-sampled 2x plus noise, so MSAD has something real to align."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class ToyPairs(Dataset):
    def __init__(self, n: int = 16, size: int = 64, seed: int = 0, nan_at: int | None = None) -> None:
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, size // 8, size // 8, generator=generator) * 200 + 20
        self.s2 = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        aerial = torch.nn.functional.interpolate(self.s2, scale_factor=2, mode="nearest")
        self.aerial = (aerial + torch.randn(aerial.shape, generator=generator) * 5).clamp(0, 255)
        self.nan_at = nan_at

    def __len__(self) -> int:
        return len(self.s2)

    def __getitem__(self, index: int) -> dict:
        s2 = self.s2[index].clone()
        if self.nan_at is not None:
            s2[:, 0, 0] = float("nan")
        return {"images": {"sentinel2_rgb": s2, "aerial": self.aerial[index]}}
