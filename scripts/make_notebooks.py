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
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, str(Path(__file__).resolve().parents[1] / "notebooks" / "01_embeddings.ipynb"))
