"""Write the notebooks in notebooks/ (outputs stripped): python scripts/make_notebooks.py"""
from pathlib import Path

import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# Embeddings with `xstars-s2-aerial`

Load the bundled default model, embed the bundled real Sentinel-2 crops, look at the dense features,
compare two sensors' features of the same place, search nearest neighbours, and embed whole scenes
into a GeoParquet dataset. Everything runs offline on a CPU."""),
code("""import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from IPython.display import display

from xstars_models import XStars
from xstars_models.samples import list_samples, load_sample
from xstars_models.visualize import pca_rgb, stretch_rgb

model = XStars.from_pretrained("xstars-s2-aerial")
print({name: (stem.spec.gsd_m, stem.patch_size) for name, stem in model.sensors.items()})"""),
md("## Dense features of real Sentinel-2 imagery, as RGB (first three principal components)"),
code("""names = [n for n in list_samples() if n.startswith("sentinel2_rgb")]
images = np.stack([load_sample(n) for n in names])           # N x 256 x 256 x 3, uint8
maps = model.embed(images, sensor="sentinel2_rgb", output="map", progress=False)
print(maps.shape)                                             # N x D x 32 x 32: one token per 80 m
colours = pca_rgb(maps)
for image, colour in zip(images, colours):
    row = np.concatenate([stretch_rgb(image), np.asarray(Image.fromarray(colour).resize((256, 256), Image.NEAREST))], axis=1)
    display(Image.fromarray(row))"""),
md("""## Cross-sensor similarity map

The same place seen by a second sensor: here a 5 m "aerial-like" view made by up-sampling the
Sentinel-2 crop 2x (the real 5 m aerial imagery used in training may not be redistributed). Each
aerial token is compared with the Sentinel-2 token at the same position. MSAD aligns tokens through
projection heads used only in training, so raw cosine similarities of trunk tokens are modest: what
shows alignment is that co-located tokens are more similar than tokens from other positions."""),
code("""s2 = images[:1]
aerial = np.repeat(np.repeat(s2, 2, axis=1), 2, axis=2)     # 512 x 512 px at 5 m = same 2.56 km
a = torch.nn.functional.normalize(model.embed(aerial, sensor="aerial", output="map", progress=False), dim=1)
b = torch.nn.functional.normalize(model.embed(s2, sensor="sentinel2_rgb", output="map", progress=False), dim=1)
similarity = (a * b).sum(dim=1)[0]                           # 32 x 32 cosine similarity
print(f"mean cosine similarity of co-located tokens: {similarity.mean():.3f}")
shuffled = (a * b.flip(-1)).sum(dim=1)[0]
print(f"...and of tokens from mirrored positions: {shuffled.mean():.3f}")
km = (0, 2.56, 2.56, 0)                                       # both images cover 2.56 x 2.56 km
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
left.imshow(stretch_rgb(s2[0]), extent=km); left.set_title("Sentinel-2, 10 m")
shown = right.imshow(similarity.numpy(), extent=km, cmap="viridis")
right.set_title("aerial vs Sentinel-2 tokens")
fig.colorbar(shown, ax=right, label="cosine similarity")
for ax in (left, right):
    ax.set_xlabel("km"); ax.set_ylabel("km")
plt.show()"""),
md("""## Nearest neighbours: which tokens of the inland crop look like a chosen token?

Each token covers 80 m (8 x 8 px). The query (red) is the centre token; its eight nearest tokens by
cosine similarity are outlined on the crop and shown below it, each with the token in the middle of
a 3 x 3-token window (240 m) for context."""),
code("""from matplotlib.patches import Rectangle

tokens = torch.nn.functional.normalize(maps[1].flatten(1).T, dim=1)   # 1024 tokens x D
query = 16 * 32 + 16                                                  # the centre token
scores = tokens @ tokens[query]
others = scores.clone()
others[query] = -2                                                    # not the query itself
best = others.topk(8).indices.tolist()
assert all(scores[i] >= scores.median() for i in best)
inland = stretch_rgb(images[1])
padded = np.pad(inland, ((8, 8), (8, 8), (0, 0)))                     # windows at the edge stay 24 px

def window(token: int) -> np.ndarray:
    r, c = divmod(token, 32)                                          # token row and column
    return padded[r * 8 : r * 8 + 24, c * 8 : c * 8 + 24]            # 3 x 3 tokens, the token in the middle

fig = plt.figure(figsize=(11, 4.5))
crop = fig.add_axes([0.0, 0.05, 0.4, 0.9])
crop.imshow(inland); crop.set_title("inland crop: query (red), nearest tokens (yellow)"); crop.axis("off")
for token, colour in [(query, "red")] + [(i, "yellow") for i in best]:
    r, c = divmod(token, 32)
    crop.add_patch(Rectangle((c * 8 - 0.5, r * 8 - 0.5), 8, 8, fill=False, edgecolor=colour, linewidth=1.5))
for k, token in enumerate([query] + best):
    ax = fig.add_axes([0.42 + (k % 3) * 0.195, 0.66 - (k // 3) * 0.31, 0.17, 0.26])
    ax.imshow(window(token), interpolation="nearest")
    ax.add_patch(Rectangle((7.5, 7.5), 8, 8, fill=False, edgecolor="red" if k == 0 else "yellow", linewidth=1.5))
    ax.set_title("query" if k == 0 else f"cos {scores[token]:.2f}", fontsize=9); ax.axis("off")
plt.show()"""),
md("""## A collection of scenes into one GeoParquet dataset

`embed_collection` embeds whole scenes (GeoTIFFs, COG URLs, STAC items or catalogues) into one
GeoParquet dataset, one row per tile, resumable; with one worker (the default) it runs in this
process, with more on a Dask cluster. Here the three bundled Sentinel-2 GeoTIFFs. The map shows each
tile's footprint coloured by the first three principal components of its embedding, inside the
outline of its scene: a run that covered its area leaves no gap, and similar colours are similar
embeddings."""),
code("""import tempfile
from pathlib import Path

import geopandas as gpd
import rasterio
from shapely.geometry import box

from xstars_models.samples import co_registered_pair, sample_path

scenes = [sample_path(n) for n in names] + [co_registered_pair()["sentinel2_rgb"]]
dataset = tempfile.mkdtemp(prefix="xstars-collection-")
model.embed_collection(scenes, sensor="sentinel2_rgb", out=dataset, progress=False)
tiles = gpd.read_parquet(dataset)                                     # lon/lat footprints, one row per tile
print(len(tiles), "tiles:", tiles.groupby("scene_id").size().to_dict())

embeddings = torch.tensor(np.stack(tiles["embedding"]))               # tiles x D
colours = pca_rgb(embeddings.T[None, :, :, None])[0, :, 0] / 255      # first 3 principal components as RGB
fig, axes = plt.subplots(1, len(scenes), figsize=(12, 4.5))
for ax, path in zip(axes, scenes):
    with rasterio.open(path) as src:                                  # the scene's own outline, in lon/lat
        outline = gpd.GeoSeries([box(*src.bounds)], crs=src.crs).to_crs(tiles.crs)
    mine = (tiles["scene_id"] == Path(path).stem).to_numpy()
    tiles[mine].plot(ax=ax, color=colours[mine], edgecolor="white", linewidth=0.3)
    outline.boundary.plot(ax=ax, color="black", linewidth=1)
    ax.set_title(f"{Path(path).stem}: {mine.sum()} tiles", fontsize=9)
    ax.set_xlabel("longitude", fontsize=8); ax.set_ylabel("latitude", fontsize=8)
    ax.tick_params(labelsize=7); ax.locator_params(nbins=4); ax.ticklabel_format(useOffset=False)
fig.tight_layout()
plt.show()"""),
]
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def write(nb: nbf.NotebookNode, name: str) -> None:
    """Stable cell ids, so regenerating an unchanged notebook changes no byte."""
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = KERNEL
    nbf.write(nb, str(NOTEBOOKS / name))


write(nb, "01_embeddings.ipynb")

nb = nbf.v4.new_notebook()
nb.cells = [
md("""# Adapting `xstars-s2-aerial` to a new sensor: Landsat-8

Continual pretraining (X-STARS, MSAD): a frozen copy of the model encodes Sentinel-2, a new input
stem learns to put Landsat-8 tokens of the same place where the frozen Sentinel-2 tokens are.
The pairs are real and co-registered: Sentinel-2 10 m and Landsat-8 30 m over Baviaanskloof, South
Africa, shipped with the package (`xstars_models.samples.co_registered_pair()`; credits in its
SOURCES.md). The southern 75% of the area trains, the northern 25% is held out for retrieval.

Tokens must cover the same ground for both sensors (80 m: 8 px of Sentinel-2). 80 m is not a whole
number of 30 m pixels, so Landsat-8 is read resampled to 20 m and gets 4 px tokens. `STEPS` is small
so that the notebook runs in about a minute on a laptop CPU; raise it for a real run."""),
code("""import json
import math
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display
from PIL import Image

from xstars_models import XStars, get_sensor
from xstars_models.data import GeoPairDataset, RasterSource
from xstars_models.evaluation import cross_sensor_retrieval
from xstars_models.samples import co_registered_pair
from xstars_models.training import TrainConfig
from xstars_models.training.monitors import MIN_MARGINAL_FRACTION, UNIFORM_FRACTION
from xstars_models.visualize import stretch_rgb

RASTERS = co_registered_pair()  # Sentinel-2 B4/B3/B2 10 m and Landsat-8 SR_B4/B3/B2 30 m, 8-bit
STEPS = int(os.environ.get("XSTARS_NOTEBOOK_STEPS", "60"))
torch.manual_seed(0)

base = XStars.from_pretrained("xstars-s2-aerial")
landsat = get_sensor("landsat8_rgb").with_gsd(20.0, name="landsat8")"""),
md("## Real pairs: 640 m footprints cut from both rasters by ground coordinates"),
code("""def pairs(split: str) -> GeoPairDataset:
    sources = {
        "sentinel2_rgb": RasterSource(RASTERS["sentinel2_rgb"], bands=(1, 2, 3), size_px=64),
        "landsat8": RasterSource(RASTERS["landsat8_rgb"], bands=(1, 2, 3), size_px=32),
    }
    stride = 320 if split == "train" else 640  # overlapping windows for training only
    return GeoPairDataset(sources, footprint_m=640, stride_m=stride, split=split, val_fraction=0.25, split_axis="y")

train, held_out = pairs("train"), pairs("val")
print(f"{len(train)} training pairs, {len(held_out)} held-out pairs")
item = held_out[0]["images"]
s2 = stretch_rgb(item["sentinel2_rgb"].permute(1, 2, 0).numpy())
l8 = stretch_rgb(item["landsat8"].permute(1, 2, 0).numpy())
l8_at_s2_pixels = np.asarray(Image.fromarray(l8).resize((64, 64), Image.NEAREST))
display(Image.fromarray(np.concatenate([s2, l8_at_s2_pixels], axis=1)).resize((256, 128), Image.NEAREST))"""),
md("""## Before: the new stem initialised from the nearest-wavelength Sentinel-2 kernels, no training

Recall@k: for each held-out Landsat-8 footprint, is the Sentinel-2 footprint of the same place among
its k nearest neighbours (token-by-token features), and back."""),
code("""before = XStars.from_pretrained("xstars-s2-aerial")
before.add_sensor(landsat, init_from="sentinel2_rgb")
recall_before = cross_sensor_retrieval(before, held_out, "landsat8", "sentinel2_rgb")
recall_before"""),
md("""## Continual pretraining: DINO on Landsat-8 views + MSAD against the frozen Sentinel-2 model

Stem mode trains only the new stem (and the loss heads); the trunk stays the base model's. A short
run needs a low teacher momentum, as the result is the EMA teacher.

The DINO head is new (heads are used in training only, never saved with a model), so it starts
untrained. With the teacher at its final temperature (0.04, sharper than the student's 0.1) from
the first step, such a head sends every image to the same prototype within three steps, the
centring then flattens the teacher to uniform, and the DINO loss climbs to ln K: the run ends
COLLAPSED (`CollapseWarning`), with a rising loss curve, although MSAD has trained the stem. So the
teacher here starts no sharper than the student (`warmup_teacher_temp=0.1`) and sharpens to 0.04
over the first half of the run, and DINOv2's KoLeo term (`koleo_weight=0.1`) spreads the head's
outputs over the batch. The right panel shows the collapse monitors: the teacher's entropy per image
and of the batch mean, as fractions of ln K, between the two collapses (uniform at the top line,
one prototype for every image at the bottom one)."""),
code("""run = Path(tempfile.mkdtemp(prefix="xstars-adapt-"))
config = TrainConfig(
    steps=STEPS, batch_size=16, lr=2e-3, warmup_steps=max(STEPS // 10, 1), alpha=1.0, teacher_momentum=0.8,
    dino_out_dim=1024, local_crops=2, checkpoint_every=max(STEPS // 2, 1),
    warmup_teacher_temp=0.1, warmup_teacher_temp_steps=max(STEPS // 2, 1), koleo_weight=0.1,
)
adapted = base.adapt(
    landsat, train, mode="stem", config=config, out_dir=run, progress=False,
    data_description="Baviaanskloof sample pair: Sentinel-2 10 m <-> Landsat-8 30 m (read at 20 m), 640 m pairs, training area",
)
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps, ln_k = [m["step"] for m in metrics], math.log(config.dino.out_dim)
fig, (losses, monitors) = plt.subplots(1, 2, figsize=(11, 3))
for key in ("loss", "msad", "dino"):
    losses.plot(steps, [m[key] for m in metrics], label=key)
losses.set_xlabel("step"); losses.set_ylabel("loss"); losses.legend()
for key, label in (("teacher_entropy", "per image"), ("teacher_marginal_entropy", "batch mean")):
    monitors.plot(steps, [m[key] / ln_k for m in metrics], label=label)
for line in (UNIFORM_FRACTION, MIN_MARGINAL_FRACTION):
    monitors.axhline(line, color="grey", linestyle=":")
monitors.set_ylim(0, 1.05); monitors.set_xlabel("step"); monitors.set_ylabel("teacher entropy / ln K"); monitors.legend()
plt.show()
verdict = adapted.training_record["monitors"]
print(f"collapsed: {verdict['collapsed']}; effective rank {verdict['rank']:.1f}, CLS spread {verdict['cls_spread']:.2f}")"""),
md("## After"),
code("""recall_after = cross_sensor_retrieval(adapted, held_out, "landsat8", "sentinel2_rgb")
print("           " + "  ".join(f"{k:>10}" for k in recall_before))
print("before     " + "  ".join(f"{v:10.3f}" for v in recall_before.values()))
print("after      " + "  ".join(f"{v:10.3f}" for v in recall_after.values()))"""),
md("""The run's record (losses per step, collapse verdict, retrieval before and after, settings) goes
to `results/02_adapt_new_sensor.json`, beside the notebook when Jupyter runs it."""),
code("""record = {
    "notebook": "02_adapt_new_sensor.ipynb", "steps": STEPS, "settings": config.to_dict(),
    "precision": adapted.training_record["precision"],
    **{key: [m[key] for m in metrics] for key in ("loss", "msad", "dino")},
    "monitors": verdict, "recall_before": recall_before, "recall_after": recall_after,
}
results = Path("results") / "02_adapt_new_sensor.json"
results.parent.mkdir(exist_ok=True)
results.write_text(json.dumps(record, indent=2) + "\\n")
print(f"wrote {results}")"""),
md("""## Share it, and load it back

With `HF_ENDPOINT` set (a Hub server: the test suite runs a local one) the model is pushed as one
commit with a generated model card; otherwise it is saved to a folder. Either way it is reloaded
and gives the same embeddings."""),
code("""if os.environ.get("HF_ENDPOINT"):
    commit = adapted.push_to_hub("demo/xstars-s2-landsat8", commit_message="Adapted to Landsat-8 (notebook 02)")
    reloaded = XStars.from_pretrained(f"demo/xstars-s2-landsat8@{commit}")
    print(f"pushed demo/xstars-s2-landsat8@{commit}")
else:
    folder = adapted.save_pretrained("xstars-s2-landsat8")
    reloaded = XStars.from_pretrained(folder)
    print(f"saved {folder}")
images = torch.stack([held_out[i]["images"]["landsat8"] for i in range(4)])
assert torch.equal(reloaded.embed(images, "landsat8", output="map", progress=False),
                   adapted.embed(images, "landsat8", output="map", progress=False))
print(reloaded.lineage)"""),
]
write(nb, "02_adapt_new_sensor.ipynb")

nb = nbf.v4.new_notebook()
nb.cells = [
md("""# Fine-tuning a land-cover classifier through TerraTorch

TerraTorch builds backbones by name from its `BACKBONE_REGISTRY`; importing
`xstars_models.integrations.terratorch` adds the X-STARS models to it (prefix `xstars_`). The input
stem is chosen from TerraTorch's `model_bands`, and the backbone returns one B x D x h x w map per
chosen block for TerraTorch's necks and decoders.

The data are the bundled labelled Sentinel-2 chips (64 x 64 px at 10 m, four land-cover classes,
split spatially into train and test blocks, from the area the default model never saw in
pretraining). The encoder stays frozen, so its features are computed once and TerraTorch's
`ClassificationTask` (Lightning) trains a linear head on them with TerraTorch's `IdentityBackbone`,
its own route for heads on precomputed embeddings. The same head, on the same steps, is trained on
the features of the same architecture at random initialisation, the baseline the pretrained model has
to beat."""),
code("""import json
import logging
import warnings
from importlib.metadata import version
from pathlib import Path

import xstars_models.integrations.terratorch  # noqa: F401  registers the "xstars" backbones (import it first, see README)

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import torch
from terratorch.registry import BACKBONE_REGISTRY
from terratorch.tasks import ClassificationTask
from torch.utils.data import DataLoader, Dataset

from xstars_models import get_model_entry
from xstars_models.evaluation.landcover import balanced_accuracy, load_landcover_chips

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no GPU/TPU banners
warnings.filterwarnings("ignore", module="lightning|torchmetrics")  # Lightning's hints for long runs

chips = load_landcover_chips()
(train_chips, train_labels), (test_chips, test_labels) = chips.train, chips.test
print(f"{len(train_chips)} train and {len(test_chips)} test chips, classes {chips.class_names}")"""),
md("""## The backbone, by name from TerraTorch's registry

The default model has two RGB stems (Sentinel-2 at 10 m and aerial at 5 m), so `RED, GREEN, BLUE`
alone fits both and `sensor=` says which one the chips come from. The chips hold the sensor's digital
numbers: the X-STARS stem normalises them itself."""),
code("""def backbone(pretrained: bool):
    return BACKBONE_REGISTRY.build(
        "xstars_xstars-s2-aerial", pretrained=pretrained, model_bands=["RED", "GREEN", "BLUE"],
        sensor="sentinel2_rgb", out_indices=[-1], norm=True,
    ).eval()

@torch.no_grad()
def features(encoder) -> tuple[torch.Tensor, torch.Tensor]:
    return encoder(train_chips.float())[-1], encoder(test_chips.float())[-1]

torch.manual_seed(0)  # the random-init weights
encoders = {"X-STARS (xstars-s2-aerial)": backbone(True), "random init": backbone(False)}
cached = {name: features(encoder) for name, encoder in encoders.items()}
print({name: tuple(train.shape) for name, (train, test) in cached.items()})  # N x D x 8 x 8 token maps"""),
md("""## The same linear head, trained by TerraTorch's ClassificationTask

`IdentityDecoder` passes the last map on; the `ScalarHead` mean-pools its tokens and applies one
linear layer. Twenty epochs of AdamW, seed 0, for both encoders."""),
code("""class Maps(Dataset):
    def __init__(self, maps: torch.Tensor, labels: torch.Tensor) -> None:
        self.maps, self.labels = maps, labels

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.maps[i], "label": self.labels[i]}


def fine_tune(train: torch.Tensor, test: torch.Tensor, epochs: int = 20) -> torch.Tensor:
    pl.seed_everything(0, verbose=False)
    task = ClassificationTask(
        model_factory="EncoderDecoderFactory",
        model_args=dict(backbone="IdentityBackbone", backbone_out_channels=[train.shape[1]], decoder="IdentityDecoder",
                        num_classes=len(chips.class_names), head_linear_after_pool=True),
        optimizer="AdamW", lr=1e-2,
    )
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, DataLoader(Maps(train, train_labels), batch_size=32, shuffle=True))
    task.eval()
    with torch.no_grad():
        return task.model(test).output.argmax(dim=1)

predictions = {name: fine_tune(train, test) for name, (train, test) in cached.items()}
majority = torch.full_like(test_labels, int(train_labels.bincount().argmax()))
rows = {name: (float((p == test_labels).double().mean()), balanced_accuracy(test_labels, p))
        for name, p in {**predictions, "majority class": majority}.items()}
print(f"{'':28}{'accuracy':>10}{'balanced':>10}")
for name, (accuracy, balanced) in rows.items():
    print(f"{name:28}{accuracy:10.3f}{balanced:10.3f}")
assert rows["X-STARS (xstars-s2-aerial)"][1] > rows["majority class"][1]  # the head learned from the features"""),
code("""fig, ax = plt.subplots(figsize=(6, 3))
names = list(rows)
ax.bar([i - 0.2 for i in range(len(names))], [rows[n][0] for n in names], width=0.4, label="accuracy")
ax.bar([i + 0.2 for i in range(len(names))], [rows[n][1] for n in names], width=0.4, label="balanced accuracy")
ax.set_xticks(range(len(names)), names, fontsize=8); ax.set_ylim(0, 1); ax.legend(fontsize=8)
ax.set_title("Land cover, test blocks: a linear head through TerraTorch"); plt.show()"""),
md("""## The record of this run

The figures above go to `results/03_finetune.json` (beside the notebook when Jupyter runs it), with
what they depend on: the weights' sha256, the chips, the head's settings and the library versions.
The README quotes the committed copy (`notebooks/results/03_finetune.json`); the test suite checks
that a fresh run gives the same figures (on the CPU that recorded them exactly, whatever the number of
threads; on another, within three test chips)."""),
code("""record = {
    "notebook": "03_finetune.ipynb",
    "model": "xstars-s2-aerial",
    "weights_sha256": get_model_entry("xstars-s2-aerial").files["model.safetensors"].sha256,
    "chips": {"train": len(train_chips), "test": len(test_chips)},
    "head": {"epochs": 20, "optimizer": "AdamW", "lr": 1e-2, "batch_size": 32, "seed": 0, "random_init_seed": 0},
    "accuracy": {name: accuracy for name, (accuracy, balanced) in rows.items()},
    "balanced_accuracy": {name: balanced for name, (accuracy, balanced) in rows.items()},
    "versions": {name: version(name) for name in ("xstars-models", "torch", "terratorch", "lightning")},
}
results = Path("results") / "03_finetune.json"
results.parent.mkdir(exist_ok=True)
results.write_text(json.dumps(record, indent=2) + "\\n")
print(f"wrote {results}")"""),
md("""## Fine-tuning the whole encoder, or a segmentation decoder

Without precomputed features the task builds the X-STARS backbone itself; leave out
`freeze_backbone=True` to fine-tune the encoder too. For segmentation, choose several blocks and a
pyramid neck, e.g. `backbone_out_indices=[2, 5, 8, 11]`,
`necks=[{"name": "LearnedInterpolateToPyramidal"}]`, `decoder="UperNetDecoder"`."""),
code("""task = ClassificationTask(
    model_factory="EncoderDecoderFactory",
    model_args=dict(backbone="xstars_xstars-s2-aerial", backbone_model_bands=["RED", "GREEN", "BLUE"],
                    backbone_sensor="sentinel2_rgb", backbone_out_indices=[-1], backbone_norm=True,
                    decoder="IdentityDecoder", num_classes=len(chips.class_names), head_linear_after_pool=True),
    freeze_backbone=True,
)
print(task.model(test_chips[:4].float()).output.shape)  # 4 chips x 4 classes"""),
]
write(nb, "03_finetune.ipynb")

nb = nbf.v4.new_notebook()
nb.cells = [
md("""# Searching an archive across sensors: Landsat-8 and Sentinel-2

Two sensors' imagery of one area goes into one GeoParquet dataset of tile embeddings with
`embed_collection` (one folder per sensor, one model), and `search` then finds, for a tile of one
sensor, the tiles of the other that look like it. The imagery is the real co-registered pair the
package ships (Baviaanskloof, South Africa: Sentinel-2 10 m and Landsat-8 30 m, 6.72 x 10.08 km;
`xstars_models.samples.co_registered_pair()`, credits in its SOURCES.md).

The default model has no Landsat-8 stem, so one is adapted first, as notebook 02 does (Landsat-8
read resampled to 20 m, 4 px tokens of 80 m like Sentinel-2's 8 px), on the southern part of the
area. The queries are tiles of the northern quarter, held out from that training. `STEPS` is the
length of the adaptation: the default takes about a minute on a laptop CPU."""),
code("""import json
import os
import tempfile
from pathlib import Path

import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import rasterio
import shapely
import torch
from rasterio.enums import Resampling
from shapely.geometry import box

from xstars_models import XStars, get_sensor
from xstars_models.data import GeoPairDataset, RasterSource
from xstars_models.samples import co_registered_pair
from xstars_models.search import SearchIndex
from xstars_models.training import TrainConfig, fit_global_whitening
from xstars_models.visualize import stretch_rgb

RASTERS = co_registered_pair()  # Sentinel-2 B4/B3/B2 10 m and Landsat-8 SR_B4/B3/B2 30 m, 8-bit
STEPS = int(os.environ.get("XSTARS_NOTEBOOK_STEPS", "60"))
LABEL = {"sentinel2_rgb": "Sentinel-2", "landsat8": "Landsat-8"}
torch.manual_seed(0)

base = XStars.from_pretrained("xstars-s2-aerial")
landsat = get_sensor("landsat8_rgb").with_gsd(20.0, name="landsat8")"""),
md("""## A Landsat-8 stem, adapted as in notebook 02

Stem mode trains only the new stem against the frozen Sentinel-2 model (MSAD), on 640 m pairs of the
southern three quarters of the area; the northern quarter (`held_out`) is never trained on."""),
code("""def pairs(split: str) -> GeoPairDataset:
    sources = {
        "sentinel2_rgb": RasterSource(RASTERS["sentinel2_rgb"], bands=(1, 2, 3), size_px=64),
        "landsat8": RasterSource(RASTERS["landsat8_rgb"], bands=(1, 2, 3), size_px=32),
    }
    stride = 320 if split == "train" else 640  # overlapping windows for training only
    return GeoPairDataset(sources, footprint_m=640, stride_m=stride, split=split, val_fraction=0.25, split_axis="y")

train, held_out = pairs("train"), pairs("val")
config = TrainConfig(
    steps=STEPS, batch_size=16, lr=2e-3, warmup_steps=max(STEPS // 10, 1), alpha=1.0, teacher_momentum=0.8,
    dino_out_dim=1024, local_crops=2, checkpoint_every=max(STEPS // 2, 1),
    warmup_teacher_temp=0.1, warmup_teacher_temp_steps=max(STEPS // 2, 1), koleo_weight=0.1,
)
adapted = base.adapt(
    landsat, train, mode="stem", config=config, out_dir=tempfile.mkdtemp(prefix="xstars-adapt-"), progress=False,
    data_description="Baviaanskloof sample pair: Sentinel-2 10 m <-> Landsat-8 30 m (read at 20 m), 640 m pairs, training area",
)
verdict = adapted.training_record["monitors"]
print(f"{STEPS} steps on {len(train)} training pairs; collapsed: {verdict['collapsed']}")"""),
md("""## A whitening for the two sensors, fit before embedding

Search ranks tiles by the cosine similarity of their CLS vectors whitened with the model's fitted
whitening: each sensor's own mean is removed and one PCA whitening is shared, which is what puts
tiles of two sensors in one space. `adapt` drops the base model's whitening (it was fit on other
weights, and has no Landsat-8 mean), so one is fit here on the training pairs of both sensors, never
on the held-out ground. It is fit before anything is embedded: the dataset records the sha256 of
each of the model's weight files, the whitening's among them, and refuses a second sensor embedded
with another model."""),
code("""adapted.whitening = fit_global_whitening(
    adapted, train, ("sentinel2_rgb", "landsat8"), pools=("cls",), progress=False,
    fit_on="Baviaanskloof sample pair, training area: Sentinel-2 and Landsat-8 (20 m), 640 m pairs",
)
print(adapted.whitening.metadata())"""),
md("""## Both rasters into one dataset

Each raster is embedded whole, one row per 640 m tile (64 px of Sentinel-2, 32 px of Landsat-8 read
at 20 m: `resample=True`), into the same folder: `sensor-sentinel2_rgb/` and `sensor-landsat8/` parts,
one manifest, and the dataset's own copy of the model in `_model/`, which the search loads."""),
code("""dataset = Path(tempfile.mkdtemp(prefix="xstars-archive-")) / "tiles"
adapted.embed_collection([RASTERS["sentinel2_rgb"]], "sentinel2_rgb", dataset, progress=False)
adapted.embed_collection([RASTERS["landsat8_rgb"]], "landsat8", dataset, resample=True, progress=False)
tiles = gpd.read_parquet(dataset)  # one table of both sensors; footprints in lon/lat
print(len(tiles), "tiles:", tiles.groupby("sensor").size().to_dict())

# The two rasters share their bounds, so the two sensors' tile grids are the same ground, tile by tile.
grids = {s: t.set_index(["row", "col"]).sort_index() for s, t in tiles.groupby("sensor")}
assert np.allclose(np.stack(grids["landsat8"]["native_bounds"]), np.stack(grids["sentinel2_rgb"]["native_bounds"]))
SCENE = {s: t["scene_id"].iloc[0] for s, t in grids.items()}
# Held-out tiles: those wholly inside the northern strip (its south edge, in the rasters' metres).
tiles["held_out"] = np.stack(tiles["native_bounds"])[:, 1] >= held_out.regions[0][1]

index = SearchIndex(dataset, k=5)  # the dataset's own model (_model), exact index of every row
print(index.report.describe())"""),
md("""## A query tile and its hits, as pictures

A held-out tile of one sensor is the query (`like=(scene_id, row, col)`). Without a filter every
row is a candidate, and the query's own sensor takes the first hits, or most of them (the query
itself first, with a score of 1, then tiles of its own sensor: tiles of one sensor are more alike
than one place seen by two). `where="sensor = '...'"` keeps only the other sensor's tiles before
ranking, so all five hits are of it. The chips
are shown as the model reads them (Landsat-8 at 20 m); the tile of the query's own place is framed in
green, and the map shows where the hits are."""),
code("""def reading(sensor: str) -> tuple[np.ndarray, rasterio.coords.BoundingBox, float]:
    \"\"\"The whole raster at the sensor's GSD, as the model reads it, stretched once for display.\"\"\"
    gsd = adapted.sensors[sensor].spec.gsd_m
    with rasterio.open(RASTERS["landsat8_rgb" if sensor == "landsat8" else sensor]) as src:
        shape = (src.count, round(src.height * src.res[1] / gsd), round(src.width * src.res[0] / gsd))
        image = src.read(out_shape=shape, resampling=Resampling.bilinear)
        return stretch_rgb(np.moveaxis(image, 0, -1)), src.bounds, gsd

PICTURES = {sensor: reading(sensor) for sensor in LABEL}

def chip(sensor: str, native_bounds: np.ndarray) -> np.ndarray:
    picture, bounds, gsd = PICTURES[sensor]
    left, bottom, right, top = native_bounds
    r, c, n = round((bounds.top - top) / gsd), round((left - bounds.left) / gsd), round((right - left) / gsd)
    return picture[r : r + n, c : c + n]

def footprints(table) -> gpd.GeoSeries:
    \"\"\"The hits' footprints (WKB in the table) as lon/lat shapes.\"\"\"
    return gpd.GeoSeries(shapely.from_wkb(table["geometry"].to_pylist()), crs="EPSG:4326")

strip = gpd.GeoSeries([box(*held_out.regions[0])], crs=held_out.crs).to_crs("EPSG:4326")
queries = []

def show(sensor: str, row: int, col: int) -> None:
    other = next(s for s in LABEL if s != sensor)
    unfiltered = index.search(like=(SCENE[sensor], row, col), sensor=sensor)
    result = index.search(like=(SCENE[sensor], row, col), sensor=sensor, where=f"sensor = '{other}'")
    hits = result.hits.to_pylist()
    print(f"{LABEL[sensor]} tile ({row}, {col}): without where, the hits are of "
          f"{unfiltered.hits['sensor'].to_pylist()}; with where = {other!r}, of {result.hits['sensor'].to_pylist()}")
    queries.append({"sensor": sensor, "row": row, "col": col, "where": f"sensor = '{other}'",
                    "unfiltered_hit_sensors": unfiltered.hits["sensor"].to_pylist(),
                    "hits": [{k: hit[k] for k in ("sensor", "scene_id", "row", "col", "score")} for hit in hits]})

    fig, axes = plt.subplot_mosaic([["q", "1", "2", "map"], ["3", "4", "5", "map"]], figsize=(12, 4.6),
                                   width_ratios=[1, 1, 1, 1.9])
    axes["q"].imshow(chip(sensor, grids[sensor].loc[(row, col), "native_bounds"]), interpolation="nearest")
    axes["q"].set_title(f"query: {LABEL[sensor]}\\ntile ({row}, {col})", fontsize=9, color="red")
    for rank, hit in enumerate(hits, start=1):
        ax, same = axes[str(rank)], (hit["row"], hit["col"]) == (row, col)
        ax.imshow(chip(other, np.asarray(hit["native_bounds"])), interpolation="nearest")
        ax.set_title(f"#{rank} {LABEL[other]}, cos {hit['score']:.2f}\\ntile ({hit['row']}, {hit['col']})"
                     + (": same place" if same else ""), fontsize=9, color="green" if same else "black")
        if same:
            for spine in ax.spines.values():
                spine.set(edgecolor="green", linewidth=3)
    for name in "q12345":
        axes[name].set_xticks([]); axes[name].set_yticks([])

    ax = axes["map"]
    grids[other].boundary.plot(ax=ax, color="lightgrey", linewidth=0.5)
    strip.plot(ax=ax, color="tab:blue", alpha=0.12)
    grids[sensor].loc[[(row, col)]].boundary.plot(ax=ax, color="red", linewidth=4)  # wider: a hit there shows inside
    spots = footprints(result.hits)
    spots.boundary.plot(ax=ax, color="orange", linewidth=1.5)
    for rank, spot in enumerate(spots, start=1):
        ax.annotate(str(rank), (spot.centroid.x, spot.centroid.y), ha="center", va="center", fontsize=9, weight="bold")
    ax.set_title(f"query (red), its {len(hits)} {LABEL[other]} hits (orange);\\nheld-out strip shaded", fontsize=9)
    ax.set_xlabel("longitude", fontsize=8); ax.set_ylabel("latitude", fontsize=8)
    ax.tick_params(labelsize=7); ax.locator_params(nbins=4); ax.ticklabel_format(useOffset=False)
    fig.tight_layout()
    plt.show()

show("landsat8", 1, 3)         # a held-out Landsat-8 tile -> Sentinel-2 tiles
show("sentinel2_rgb", 1, 7)    # and the reverse, elsewhere in the held-out strip"""),
md("""## How often is the first hit the same place?

Every held-out tile of each sensor is a query, among all the other sensor's tiles (training ground
too), so the chance of finding its own place first is 1 in 176. The maps colour each held-out tile
by where its own place ranked among its five hits. Beside the model, two baselines on the same
queries: the nearest tile by mean colour, and by the pixels averaged to 8 x 8 (80 m cells), each
sensor's values standardised over its own tiles."""),
code("""from matplotlib.patches import Patch

def same_place_ranks(sensor: str, other: str) -> gpd.GeoDataFrame:
    \"\"\"The held-out tiles of ``sensor`` with the rank of their own place among their 5 hits of
    ``other`` (0: not among them).\"\"\"
    mine = tiles[(tiles["sensor"] == sensor) & tiles["held_out"]]
    places = list(zip(mine["row"], mine["col"]))
    ids = np.array([index.find_tile(SCENE[sensor], r, c, sensor) for r, c in places])
    scores, found = index.nearest(index.row_vectors(ids), k=5, where=f"sensor = '{other}'")
    ranks = []
    for place, hit_ids in zip(places, found):
        hits = index.rows(hit_ids)
        hit_places = list(zip(hits["row"].to_pylist(), hits["col"].to_pylist()))
        ranks.append(hit_places.index(place) + 1 if place in hit_places else 0)
    return mine.assign(rank=ranks)

def pixel_features(sensor: str, kind: str) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    \"\"\"A baseline's vector of each tile of ``sensor``: its chip's mean colour, or its pixels averaged
    to 8 x 8 (both sensors' chips cover 640 m); standardised over the sensor's own tiles.\"\"\"
    mine = tiles[tiles["sensor"] == sensor]
    chips = [torch.from_numpy(chip(sensor, b).astype(np.float32)).permute(2, 0, 1) for b in mine["native_bounds"]]
    size = 1 if kind == "mean colour" else 8
    vectors = np.stack([torch.nn.functional.adaptive_avg_pool2d(c, size).flatten().numpy() for c in chips])
    return mine, (vectors - vectors.mean(0)) / (vectors.std(0) + 1e-6)

def baseline_first(sensor: str, other: str, kind: str) -> int:
    \"\"\"Held-out tiles of ``sensor`` whose nearest ``other`` tile (Euclidean, ``kind`` vectors) is their own place.\"\"\"
    queries_, q = pixel_features(sensor, kind)
    candidates, c = pixel_features(other, kind)
    held = queries_["held_out"].to_numpy()
    nearest = ((q[held][:, None] - c[None]) ** 2).sum(-1).argmin(1)
    found = zip(candidates["row"].to_numpy()[nearest], candidates["col"].to_numpy()[nearest])
    return sum(f == own for f, own in zip(found, zip(queries_["row"][held], queries_["col"][held])))

same_place = {}
fig, axes = plt.subplots(2, 1, figsize=(9, 5.6))
for ax, (sensor, other) in zip(axes, [("landsat8", "sentinel2_rgb"), ("sentinel2_rgb", "landsat8")]):
    ranked = same_place_ranks(sensor, other)
    first, top5, n = int((ranked["rank"] == 1).sum()), int((ranked["rank"] > 0).sum()), len(ranked)
    candidates = int((tiles["sensor"] == other).sum())
    baselines = {kind: baseline_first(sensor, other, kind) / n for kind in ("mean colour", "raw pixels 8x8")}
    same_place[f"{sensor}->{other}"] = {"r@1": first / n, "r@5": top5 / n, "queries": n, "candidates": candidates,
                                        "baselines r@1": baselines}
    colours = ["tab:green" if r == 1 else "gold" if r > 0 else "tab:red" for r in ranked["rank"]]
    ranked.plot(ax=ax, color=colours, edgecolor="white", linewidth=0.5)
    ax.set_title(f"{LABEL[sensor]} queries, {LABEL[other]} hits: own place first for {first} of {n},\\n"
                 f"among the first five for {top5} (chance: 1 in {candidates} first)", fontsize=9)
    ax.set_xlabel("longitude", fontsize=8); ax.set_ylabel("latitude", fontsize=8)
    ax.tick_params(labelsize=7); ax.locator_params(nbins=5); ax.ticklabel_format(useOffset=False)
    print(f"{LABEL[sensor]} -> {LABEL[other]}: recall@1 {first / n:.2f}, recall@5 {top5 / n:.2f} "
          f"({n} held-out queries, {candidates} candidates); recall@1 of the mean colour "
          f"{baselines['mean colour']:.2f}, of the raw pixels at 8 x 8 {baselines['raw pixels 8x8']:.2f}")
fig.legend(handles=[Patch(color="tab:green", label="first"), Patch(color="gold", label="2nd to 5th"),
                    Patch(color="tab:red", label="not in the first five")], loc="center right", fontsize=8,
           title="own place", title_fontsize=8)
fig.tight_layout(rect=(0, 0, 0.82, 1))
plt.show()"""),
md("""Read the baselines before the model's rates. The two rasters are co-registered and ten days apart
(2015-09-23 and 2015-10-03), so the raw pixels averaged to 8 x 8 find a held-out tile's own place
first about every time, better than the model's one whitened CLS vector per tile (the mean colour
rarely does): finding the *same* place in a co-registered pair is easy for pixels, as it is for the
aerial / Sentinel-2 pairs in the README's table. What the embedding search is for, places that
*look alike* across sensors although their pixels differ, is what the pictures above show and
these rates do not measure."""),
md("""The run's record (hits of the two queries above, the same-place rates, the dataset's rows) goes to
`results/04_archive_search.json`, beside the notebook when Jupyter runs it."""),
code("""record = {
    "notebook": "04_archive_search.ipynb", "steps": STEPS, "monitors": verdict,
    "rows": {sensor: int(n) for sensor, n in tiles.groupby("sensor").size().items()},
    "held_out_tiles": {sensor: int(n) for sensor, n in tiles[tiles["held_out"]].groupby("sensor").size().items()},
    "index": {"rows": index.report.rows, "parts": index.report.parts},
    "queries": queries, "same_place": same_place,
}
results = Path("results") / "04_archive_search.json"
results.parent.mkdir(exist_ok=True)
results.write_text(json.dumps(record, indent=2) + "\\n")
print(f"wrote {results}")"""),
]
write(nb, "04_archive_search.ipynb")
