"""Rebuild the co-registered Sentinel-2 / Landsat-8 sample pair in xstars_models/samples/baviaanskloof/
from the homonim test rasters (Baviaanskloof, South Africa).

    python scripts/make_pair_samples.py [--homonim DIR]

DIR holds ``reference/sentinel2_b432_byte.tif`` and ``reference/landsat8_byte.tif`` (default:
../shared/data/homonim beside the repository). Writes one crop of the same ground from each: 6.72 x
10.08 km from the north-west corner, on the 30 m Landsat-8 grid, so both crops share their bounds
exactly. Sentinel-2 keeps B4/B3/B2 (8-bit, 10 m); Landsat-8 keeps SR_B4/SR_B3/SR_B2 of its 24 bands
(8-bit, 30 m, nodata 0). Only open data is written (Copernicus and USGS); the NGI aerial imagery
beside them is not redistributable and is not read.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import rasterio
from rasterio.windows import from_bounds

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "xstars_models" / "samples" / "baviaanskloof"
# Ground bounds (left, bottom, right, top) in the rasters' Transverse Mercator CRS, metres: a
# whole number of 30 m Landsat-8 pixels and 10 m Sentinel-2 pixels.
LEFT, TOP = -60330.0, -3722700.0
WIDTH_M, HEIGHT_M = 6720.0, 10080.0
BOUNDS = (LEFT, TOP - HEIGHT_M, LEFT + WIDTH_M, TOP)
# (output name, input file, bands to keep in order, their names)
RASTERS = (
    ("sentinel2_rgb.tif", "reference/sentinel2_b432_byte.tif", (1, 2, 3), ("B4", "B3", "B2")),
    ("landsat8_rgb.tif", "reference/landsat8_byte.tif", (4, 3, 2), ("SR_B4", "SR_B3", "SR_B2")),
)


def write_crop(source: Path, out: Path, bands: tuple[int, ...], names: tuple[str, ...]) -> None:
    with rasterio.open(source) as src:
        window = from_bounds(*BOUNDS, transform=src.transform).round_offsets().round_lengths()
        data = src.read(bands, window=window)
        profile = {
            "driver": "GTiff", "dtype": src.dtypes[0], "count": len(bands), "height": data.shape[1],
            "width": data.shape[2], "crs": src.crs, "transform": src.window_transform(window),
            "nodata": src.nodata, "compress": "deflate", "predictor": 2, "zlevel": 9, "tiled": True,
            "blockxsize": 256, "blockysize": 256,
        }
    # Written under a temporary name and renamed: an interrupted run leaves no half-written sample.
    fd, tmp = tempfile.mkstemp(suffix=".tif", dir=out.parent)
    os.close(fd)
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            dst.descriptions = names
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--homonim", type=Path, default=REPO.parent / "shared" / "data" / "homonim")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, source, bands, names in RASTERS:
        path = args.homonim / source
        if not path.is_file():
            raise SystemExit(f"{path} is missing: pass --homonim DIR, the folder holding reference/.")
        write_crop(path, OUT / name, bands, names)
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
