"""The main job of the quick start: embed the bundled sample imagery with a pretrained model, write
the embeddings to disk and a picture of the dense features.

    python -m xstars_models.demo [--model xstars-s2-aerial] [--out demo_output]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import XStarsError
from .samples import list_samples, load_sample
from .visualize import pca_rgb, stretch_rgb
from .xstars import XStars

DEFAULT_MODEL = "xstars-s2-aerial"


def run(model_name: str, sensor: str, out: Path) -> dict[str, Path]:
    model = XStars.from_pretrained(model_name)
    names = [n for n in list_samples() if n.startswith("sentinel2_rgb")]
    images = np.stack([load_sample(n) for n in names])
    maps = model.embed(images, sensor=sensor, output="map", progress=False)
    cls = model.embed(images, sensor=sensor, output="cls", progress=False)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "embeddings.npz"
    tmp = out / ".embeddings.tmp.npz"
    np.savez(tmp, names=np.array(names), cls=cls.numpy(), maps=maps.numpy())
    tmp.replace(npz)

    colours = pca_rgb(maps)
    tiles = []
    for image, colour in zip(images, colours):
        size = image.shape[:2]
        left = Image.fromarray(stretch_rgb(image))
        right = Image.fromarray(colour).resize(size[::-1], Image.Resampling.NEAREST)
        pair = Image.new("RGB", (size[1] * 2 + 8, size[0]), "white")
        pair.paste(left, (0, 0))
        pair.paste(right, (size[1] + 8, 0))
        tiles.append(pair)
    sheet = Image.new("RGB", (tiles[0].width, sum(t.height for t in tiles) + 8 * (len(tiles) - 1)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (0, i * (tile.height + 8)))
    picture = out / "pca.png"
    sheet.save(out / ".pca.tmp.png")
    (out / ".pca.tmp.png").replace(picture)

    similarity = float(torch.nn.functional.cosine_similarity(cls[0], cls[1], dim=0))
    print(f"model {model_name} ({model.arch}, sensors {list(model.sensors)})")
    print(f"embedded {len(names)} samples {names} as {sensor}: cls {tuple(cls.shape)}, map {tuple(maps.shape)}")
    print(f"cosine similarity of the two samples' cls embeddings: {similarity:.3f}")
    print(f"wrote {npz} and {picture} (left: input, right: PCA of dense features as RGB)")
    return {"embeddings": npz, "picture": picture}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry id, Hub repo or folder")
    parser.add_argument("--sensor", default="sentinel2_rgb", help="the model's name for 8-bit Sentinel-2 RGB")
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    args = parser.parse_args(argv)
    try:
        run(args.model, args.sensor, args.out)
    # Bad input, unreadable files and a missing extra (rasterio reads the samples) are one line;
    # anything else is a bug and keeps its traceback.
    except (XStarsError, ValueError, OSError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
