"""Training steps/s of adapt() with and without the MSAD term (alpha = 0.1 vs 0), same model,
data and settings; the MSAD term should add at most 25% to a DINO step. MSAD runs both ways:
its view shared with the first DINO global view (the default) and as a separate forward.

    python bench/bench_train.py [--device cpu|cuda] [--steps 20] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from xstars_models import XStars, get_sensor
from xstars_models.training import TrainConfig, adapt


class SyntheticPairs(Dataset):
    """Sentinel-2 RGB 64 px tiles and their 2x up-sampled 'aerial' twins (128 px)."""

    def __init__(self, n: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.s2 = torch.rand(n, 3, 64, 64, generator=generator) * 255
        self.aerial = torch.nn.functional.interpolate(self.s2, scale_factor=2, mode="nearest")

    def __len__(self) -> int:
        return len(self.s2)

    def __getitem__(self, i: int) -> dict:
        return {"images": {"sentinel2_rgb": self.s2[i], "aerial": self.aerial[i]}}


def steps_per_second(alpha: float, args: argparse.Namespace, share: bool = True) -> float:
    torch.manual_seed(0)
    base = XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], patch_size=8, img_size=64)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch, alpha=alpha, dino_out_dim=4096, local_crops=args.local_crops,
        checkpoint_every=10**9, share_msad_view=share,
    )
    with tempfile.TemporaryDirectory() as run:
        adapt(
            base, get_sensor("aerial_rgb").with_gsd(5.0, name="aerial"), SyntheticPairs(), mode="full",
            config=config, out_dir=run, device=args.device, progress=False,
        )
        times = [json.loads(line)["time_s"] for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    skip = min(3, len(times) - 2)  # warm-up steps
    return (len(times) - 1 - skip) / (times[-1] - times[skip])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=4)
    args = parser.parse_args()
    dino_only = steps_per_second(0.0, args)
    shared, separate = steps_per_second(0.1, args), steps_per_second(0.1, args, share=False)
    print(f"adapt(mode='full'), ViT-Tiny patch 8 (S2 64 px, aerial 128 px), batch {args.batch}, "
          f"2 global + {args.local_crops} local crops, {args.device}\n")
    print("| loss | steps/s | time per step vs DINO only |")
    print("|---|---|---|")
    print(f"| DINO only (alpha = 0) | {dino_only:.2f} | 1.00x |")
    print(f"| DINO + 0.1 MSAD, view shared with DINO (default) | {shared:.2f} | {dino_only / shared:.2f}x |")
    print(f"| DINO + 0.1 MSAD, separate MSAD forward | {separate:.2f} | {dino_only / separate:.2f}x |")


if __name__ == "__main__":
    main()
