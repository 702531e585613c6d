"""Write the notebooks in notebooks/ (outputs stripped): python scripts/make_notebooks.py"""
from pathlib import Path

import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# Embeddings with `xstars-s2-aerial`

Load the bundled default model, embed the bundled real Sentinel-2 crops, look at the dense features,
compare two sensors' features of the same place, and search nearest neighbours.
Everything runs offline on a CPU."""),
code("""import numpy as np
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
display(Image.fromarray((similarity.clamp(0, 1).numpy() * 255).astype(np.uint8)).resize((256, 256), Image.NEAREST))"""),
md("## Nearest neighbours: which tokens of the inland crop look like a chosen token?"),
code("""tokens = torch.nn.functional.normalize(maps[1].flatten(1).T, dim=1)   # 1024 tokens x D
query = tokens[16 * 32 + 16]                                          # the centre token
scores = tokens @ query
best = scores.topk(10).indices
rows, cols = (best // 32).tolist(), (best % 32).tolist()
print("10 nearest tokens (row, col):", list(zip(rows, cols)))
assert scores[best[0]] >= scores.median()"""),
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
display(Image.fromarray(np.concatenate([s2, np.asarray(Image.fromarray(l8).resize((64, 64), Image.NEAREST))], axis=1)).resize((256, 128), Image.NEAREST))"""),
md("""## Before: the new stem initialised from the nearest-wavelength Sentinel-2 kernels, no training

Recall@k: for each held-out Landsat-8 footprint, is the Sentinel-2 footprint of the same place among
its k nearest neighbours (token-by-token features), and back."""),
code("""before = XStars.from_pretrained("xstars-s2-aerial")
before.add_sensor(landsat, init_from="sentinel2_rgb")
recall_before = cross_sensor_retrieval(before, held_out, "landsat8", "sentinel2_rgb")
recall_before"""),
md("""## Continual pretraining: DINO on Landsat-8 views + MSAD against the frozen Sentinel-2 model

Stem mode trains only the new stem (and the loss heads); the trunk stays the base model's. A short
run needs a low teacher momentum, as the result is the EMA teacher."""),
code("""run = Path(tempfile.mkdtemp(prefix="xstars-adapt-"))
config = TrainConfig(
    steps=STEPS, batch_size=16, lr=2e-3, warmup_steps=max(STEPS // 10, 1), alpha=1.0, teacher_momentum=0.8,
    dino_out_dim=1024, local_crops=2, checkpoint_every=max(STEPS // 2, 1),
)
adapted = base.adapt(landsat, train, mode="stem", config=config, out_dir=run, progress=False,
                     data_description="Baviaanskloof sample pair: Sentinel-2 10 m <-> Landsat-8 30 m (read at 20 m), 640 m pairs, training area")
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
fig, ax = plt.subplots(figsize=(6, 3))
for key in ("loss", "msad", "dino"):
    ax.plot([m["step"] for m in metrics], [m[key] for m in metrics], label=key)
ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(); plt.show()"""),
md("## After"),
code("""recall_after = cross_sensor_retrieval(adapted, held_out, "landsat8", "sentinel2_rgb")
print("           " + "  ".join(f"{k:>10}" for k in recall_before))
print("before     " + "  ".join(f"{v:10.3f}" for v in recall_before.values()))
print("after      " + "  ".join(f"{v:10.3f}" for v in recall_after.values()))"""),
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
code("""import logging
import warnings

import xstars_models.integrations.terratorch  # noqa: F401  registers the "xstars" backbones (import it first, see README)

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import torch
from terratorch.registry import BACKBONE_REGISTRY
from terratorch.tasks import ClassificationTask
from torch.utils.data import DataLoader, Dataset

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
