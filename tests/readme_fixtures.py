"""What the README's code blocks need to run as copied, for tests/test_readme_snippets.py: the
blocks themselves (with the heading they sit under and their line in README.md), a Hugging Face
cache in which every Hub repo they name holds the bundled model, and a working directory holding
the files they open, made from the bundled sample GeoTIFFs."""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pystac
import rasterio
from affine import Affine

from xstars_models.samples import co_registered_pair, sample_path

_FENCE_OPEN = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
_FENCE_CLOSE = re.compile(r"^ *```\s*$")
_HEADING = re.compile(r"^#{1,6} +(?P<title>.+?)\s*$")
INDENTED = "indented"
"""The ``lang`` of a Markdown indented code block (four spaces, after a blank line)."""


@dataclass(frozen=True)
class Block:
    """One code block of the README.

    Attributes:
        section: title of the nearest heading above the block.
        lang: the fence's language (``""`` when none), or :data:`INDENTED`.
        code: the block's text without its indentation.
        line: 1-based line in README.md of the block's first code line.
    """

    section: str
    lang: str
    code: str
    line: int

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")

    @property
    def label(self) -> str:
        """How a test id and a failure name the block: its heading and first line."""
        return f"{self.section}: {self.first_line[:60]}"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced and indented code block of a Markdown text, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE_OPEN.match(line)
        if fence:
            indent, body = len(fence["indent"]), []
            i += 1
            while i < len(lines) and not _FENCE_CLOSE.match(lines[i]):
                body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
                i += 1
            blocks.append(Block(section, fence["lang"], "\n".join(body) + "\n", i - len(body) + 1))
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            section = heading["title"]
        elif line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(section, INDENTED, "\n".join(body) + "\n", start + 1))
            continue
        i += 1
    return blocks


# --- The Hub cache -------------------------------------------------------------------------------

def _blob_name(data: bytes, lfs: bool) -> str:
    # As the Hub names cached blobs: an LFS file by its sha256, any other by its git blob id.
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(cache: Path, repo_ids: Iterable[str], folder: Path) -> dict[str, str]:
    """Lay ``folder``'s files out in the Hub cache ``cache`` (``HF_HUB_CACHE``) as the client
    leaves a downloaded model repo: ``models--org--name/blobs/<hash>``, ``snapshots/<commit>/<file>``
    linking to the blob, ``refs/main`` holding the commit. Returns the commit of each repo."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commits = {}
    for repo_id in repo_ids:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(repo_id.encode() + b"".join(p.read_bytes() for p in files)).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in files:
            data = path.read_bytes()
            blob = _blob_name(data, lfs=path.suffix == ".safetensors")
            (repo / "blobs" / blob).write_bytes(data)
            (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        commits[repo_id] = commit
    return commits


# --- Files the snippets open ---------------------------------------------------------------------

def _read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), dict(src.profile)


def _write(path: Path, pixels: np.ndarray, profile: dict, cog: bool = False) -> None:
    meta = {**profile, "count": pixels.shape[0], "height": pixels.shape[1], "width": pixels.shape[2]}
    for key in ("blockxsize", "blockysize", "tiled", "interleave", "compress"):
        meta.pop(key, None)
    if cog:  # what a remote scene is: read over HTTP by byte ranges
        meta.update(driver="COG", compress="DEFLATE", blocksize=128)
    else:
        meta.update(driver="GTiff")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(pixels)


def _stac_item(item_id: str, assets: dict[str, tuple[str, list[str]]]) -> pystac.Item:
    """An Item whose assets (key -> href, band common names) carry ``eo:bands``."""
    item = pystac.Item(item_id, geometry=None, bbox=None, datetime=datetime.datetime(2024, 6, 1), properties={})
    for key, (href, bands) in assets.items():
        item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"],
                                         extra_fields={"eo:bands": [{"name": b, "common_name": b} for b in bands]}))
    return item


RGB = ["red", "green", "blue"]


def workspace(root: Path, www: Path, base_url: str) -> None:
    """Write the files the README's snippets name into the working directory ``root`` and the
    folder ``www`` that ``base_url`` serves (the stand-in for ``https://example.com/``).

    ``root``: ``scene.tif``, ``a.tif`` (the inland Sentinel-2 RGB sample, 256 x 256 px at 10 m),
    ``b.tif`` (the coast sample), ``s2.tif`` (the Baviaanskloof Sentinel-2 RGB sample, 672 x 1008
    px at 10 m) and ``aerial.tif`` (the same pixels repeated 2 x 2: 5 m, the aerial sensor's GSD),
    ``catalog.json`` (a static STAC Catalog, relative links, one Item: the coast sample).
    ``www``: ``scene.tif`` and ``b.tif`` as COGs, ``items/S2A_xyz.json``, an Item whose red, green
    and blue assets are single-band COGs of the inland sample behind ``base_url``.
    """
    inland, inland_profile = _read(sample_path("sentinel2_rgb_inland"))
    coast, coast_profile = _read(sample_path("sentinel2_rgb_coast"))
    _write(root / "scene.tif", inland, inland_profile)
    _write(root / "a.tif", inland, inland_profile)
    _write(root / "b.tif", coast, coast_profile)
    s2, s2_profile = _read(co_registered_pair()["sentinel2_rgb"])
    _write(root / "s2.tif", s2, s2_profile)
    transform: Affine = s2_profile["transform"]
    _write(root / "aerial.tif", np.repeat(np.repeat(s2, 2, axis=1), 2, axis=2),
           {**s2_profile, "transform": transform @ Affine.scale(0.5)})

    catalog = pystac.Catalog("scenes", "the coast sample")
    catalog.add_item(_stac_item("coast", {"visual": ("./visual.tif", RGB)}))
    catalog.normalize_hrefs(str(root))  # the item goes to coast/coast.json, beside its asset
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    _write(root / "coast" / "visual.tif", coast, coast_profile)

    _write(www / "scene.tif", inland, inland_profile, cog=True)
    _write(www / "b.tif", coast, coast_profile, cog=True)
    for k, band in enumerate(RGB):
        _write(www / f"{band}.tif", inland[k : k + 1], inland_profile, cog=True)
    item = _stac_item("S2A_xyz", {band: (f"{base_url}/{band}.tif", [band]) for band in RGB})
    (www / "items").mkdir(parents=True, exist_ok=True)
    item.save_object(include_self_link=False, dest_href=str(www / "items" / "S2A_xyz.json"))
