"""Building the index of a GeoPairDataset: the valid-pixel count grid (one read of each file, what
the data set does) against reading every candidate window of every sensor (what it did before),
on the co-registered homonim rasters (../shared/data/homonim): aerial 5 m and Sentinel-2 10 m,
640 m footprints at several strides. Both must keep the same windows up to the few whose missing
fraction differs between native and resampled pixels at the threshold.

    python bench/bench_pair_index.py [--strides 640 320 160] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from xstars_models.data import GeoPairDataset, RasterSource

HOMONIM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "homonim"
MAX_NODATA = 0.05


def sources() -> dict[str, RasterSource]:
    return {
        "sentinel2_rgb": RasterSource((str(HOMONIM / "reference/sentinel2_b432_byte.tif"),), (1, 2, 3), 64),
        "aerial": RasterSource(tuple(str(HOMONIM / f"source/ngi_rgb_byte_{i}.tif") for i in (1, 2, 3)), (1, 2, 3), 128),
    }


def window_by_window(pairs: GeoPairDataset) -> tuple[float, list]:
    """Seconds to read every candidate window of every sensor and the windows kept that way."""
    began = time.perf_counter()
    kept = [w for w in pairs.windows if max(1.0 - pairs._read(n, w)[1].mean() for n in pairs.sources) <= MAX_NODATA]
    return time.perf_counter() - began, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strides", type=float, nargs="+", default=[640, 320, 160])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("| stride m | candidates | kept | index build s | every window s | speed-up | windows differing |")
    print("|---|---|---|---|---|---|---|")
    for stride in args.strides:
        times = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            pairs = GeoPairDataset(sources(), footprint_m=640, stride_m=stride, max_nodata=MAX_NODATA)
            times.append(time.perf_counter() - began)
        everything = GeoPairDataset(sources(), footprint_m=640, stride_m=stride, max_nodata=1.0)
        reference, kept = window_by_window(everything)
        differing = len(set(kept) ^ set(pairs.windows))
        print(f"| {stride:g} | {len(everything)} | {len(pairs)} | {min(times):.2f} | {reference:.2f} | "
              f"{reference / min(times):.1f}x | {differing} |")


if __name__ == "__main__":
    main()
