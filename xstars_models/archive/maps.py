"""The feature maps of a collection run (``maps=True``): each scene's map, the Cloud-Optimised
GeoTIFF that ``embed_scene(output="map")`` writes for it with the same options, at
``DATASET/_maps/sensor-<sensor>/<safe scene id>.tif`` (:func:`~.parts.safe_id`). The folder's
name starts with ``_`` so that readers of the dataset's parts (pyarrow, geopandas) skip it, as
they skip ``_manifest.json`` and ``_model``.

How a map is made whole and at once
    Each block task of a scene also writes its piece of the map (the token rows its strips own,
    :mod:`xstars_models.scenes.maprows`) to ``<id>.pieces/<block>.tif`` beside the map, under a
    temporary name then renamed, before its part. When every block of the scene is done, the
    driver submits one merge task (:func:`merge_map`): it stacks the pieces (a GDAL VRT, so they
    are not copied twice) into the COG under a temporary name, renames it, and only then removes
    the pieces. Readers see no map or the whole map.

Resuming
    A map at its final name is complete. The manifest lists it with its size and sha256; a rerun
    counts a listed map of that size as done (hashing every map again would read the whole
    archive), and adopts an unlisted one (the driver died after the rename) whose ``xstars_run``
    tag names this scene, these settings and this model. A map not done is merged again from the
    pieces; a block whose piece is missing is embedded again.
"""

from __future__ import annotations

import glob
import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from ..io import GDAL_CACHE_BYTES, import_rasterio, quiet_georef
from ..scenes.failures import writing
from ..scenes.writers import COG_BLOCK, band_names, check_complete
from ..serialization import atomic_path, file_record
from .parts import safe_id, sensor_folder

__all__ = ["MAPS", "RUN_TAG", "MapTask", "map_path", "map_record", "maps_folder", "merge_map", "piece_path",
           "read_run_tag"]

MAPS = "_maps"
# The tag naming the run a map belongs to: its task key, settings and model files, as JSON.
RUN_TAG = "xstars_run"


def maps_folder(dataset: Path, sensor: str) -> Path:
    """The folder of ``sensor``'s maps: ``dataset/_maps/sensor-<sensor>``."""
    return sensor_folder(Path(dataset) / MAPS, sensor)


def map_path(dataset: Path, sensor: str, scene_id: str) -> Path:
    """Where scene ``scene_id``'s map for ``sensor`` lives: ``<maps folder>/<safe id>.tif``."""
    return maps_folder(dataset, sensor) / f"{safe_id(scene_id)}.tif"


def piece_path(dataset: Path, sensor: str, scene_id: str, block: int) -> Path:
    """Where block ``block``'s piece of scene ``scene_id``'s map lives until the map is merged."""
    return maps_folder(dataset, sensor) / f"{safe_id(scene_id)}.pieces" / f"{int(block):05d}.tif"


@dataclass(frozen=True)
class MapTask:
    """Merge the pieces of one scene's map into its COG.

    Attributes:
        key: the map's key in the manifest, ``sensor/scene_id``.
        dataset: the dataset folder.
        sensor: the sensor.
        scene_id: the scene.
        blocks: the scene's blocks (pieces ``0 .. blocks - 1``).
        overviews: add average-resampled overviews, as ``embed_scene``'s ``overviews``.
        tags: the COG's dataset tags (those of ``embed_scene``'s maps, and :data:`RUN_TAG`).
    """

    key: str
    dataset: str
    sensor: str
    scene_id: str
    blocks: int
    overviews: bool
    tags: dict[str, str]


def read_run_tag(path: Path) -> Any:
    """The parsed :data:`RUN_TAG` of the map at ``path``; ``None`` when it has none or is no
    readable GeoTIFF."""
    rasterio = import_rasterio()
    try:
        with quiet_georef(), rasterio.open(path) as dataset:
            text = dataset.tags().get(RUN_TAG)
        return json.loads(text) if text is not None else None
    except (rasterio.errors.RasterioError, ValueError):
        return None


def merge_map(task: MapTask) -> dict[str, Any]:
    """Stack the scene's pieces into its COG (temporary name, then rename) and remove them; a map
    already at its final name with this run's tag is kept as it is (a merge that ran twice).
    Returns the map's record fields (key, path relative to the dataset, sha256, size).

    Raises:
        InvalidInputError: (``field="maps"``) a piece is missing (its block must run again).
        OutputWriteError: writing the COG failed (a full disk...), naming the cause; nothing is
            left at the map's name.
    """
    dataset = Path(task.dataset)
    out = map_path(dataset, task.sensor, task.scene_id)
    pieces = [piece_path(dataset, task.sensor, task.scene_id, block) for block in range(task.blocks)]
    folder = pieces[0].parent
    if not (out.exists() and read_run_tag(out) == json.loads(task.tags[RUN_TAG])):
        missing = [p.name for p in pieces if not p.exists()]
        if missing:
            raise InvalidInputError(
                f"{out}: cannot merge the map of scene {task.scene_id!r}, pieces {', '.join(missing)} are missing from "
                f"{folder}; rerun to embed their blocks again.",
                field="maps",
            )
        # Left by a merge killed before its rename: atomic_path's ".NAME.<12 hex>.tmp" and GDAL's
        # files beside it (only this scene's merge writes these names; another scene's map name
        # may start with this one's, hence the exact pattern).
        stale = re.compile(rf"\.{re.escape(out.name)}\.[0-9a-f]{{12}}\.tmp(\..*)?")
        for leftover in out.parent.glob("." + glob.escape(out.name) + ".*"):
            if stale.fullmatch(leftover.name):
                leftover.unlink(missing_ok=True)
        _write_cog(pieces, folder / "map.vrt", out, task)
    record = map_record(task.key, out, dataset)
    shutil.rmtree(folder, ignore_errors=True)
    return record


def map_record(key: str, path: Path, dataset: Path) -> dict[str, Any]:
    """The manifest's record fields of the map ``key`` at ``path``: its path relative to
    ``dataset``, sha256 and size (read in chunks: a map may be larger than memory)."""
    record = file_record(path)
    return {"key": key, "path": str(path.relative_to(dataset)), "sha256": record.sha256, "size": record.size}


def _write_cog(pieces: list[Path], vrt: Path, out: Path, task: MapTask) -> None:
    """The COG of the pieces stacked top to bottom, with ``embed_scene``'s COG options."""
    from rasterio.shutil import copy as gdal_copy

    height, width = _stack(pieces, vrt, task.tags)
    # As MapWriter.finish: DEFLATE with the float predictor, 128-token pixel-interleaved blocks,
    # GDAL compressing on torch's threads.
    options: dict[str, Any] = dict(
        driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=COG_BLOCK, BIGTIFF="IF_SAFER",
        OVERVIEWS="NONE", NUM_THREADS=str(torch.get_num_threads()),
    )
    if task.overviews:
        levels = max(1, math.ceil(math.log2(max(height, width) / COG_BLOCK)))
        options.update(OVERVIEWS="IGNORE_EXISTING", OVERVIEW_COUNT=levels, OVERVIEW_RESAMPLING="AVERAGE")
    size = sum(p.stat().st_size for p in pieces)  # bounds the COG's size, compressed or not
    rasterio = import_rasterio()
    # GDAL's block cache capped as embed_scene caps it (its default, 5 % of RAM, grows with the map).
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), writing(out, size) as log, quiet_georef(), \
            atomic_path(out) as tmp:
        try:
            gdal_copy(vrt, tmp, **options)
            log.check()
            check_complete(tmp, log)
        except BaseException:
            for leftover in tmp.parent.glob(glob.escape(tmp.name) + ".*"):  # GDAL's "<tmp>.ovr.tmp"
                leftover.unlink(missing_ok=True)
            raise
    vrt.unlink()


def _stack(pieces: list[Path], vrt: Path, tags: dict[str, str]) -> tuple[int, int]:
    """Write the VRT that stacks ``pieces`` (same width and bands) top to bottom, georeferenced
    as the first, with ``tags`` and the map's band descriptions; returns its (height, width)."""
    rasterio = import_rasterio()
    heights: list[int] = []
    for piece in pieces:
        with quiet_georef(), rasterio.open(piece) as src:
            if not heights:
                width, count, crs, transform = src.width, src.count, src.crs, src.transform
            heights.append(src.height)
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(sum(heights)))
    if crs is not None:
        ET.SubElement(root, "SRS").text = crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in transform.to_gdal())
    metadata = ET.SubElement(root, "Metadata")
    for key, value in sorted(tags.items()):
        ET.SubElement(metadata, "MDI", key=key).text = value
    for band, name in enumerate(band_names(count), start=1):
        element = ET.SubElement(root, "VRTRasterBand", dataType="Float32", band=str(band))
        ET.SubElement(element, "Description").text = name
        ET.SubElement(element, "NoDataValue").text = "nan"
        top = 0
        for piece, rows in zip(pieces, heights):
            source = ET.SubElement(element, "SimpleSource")
            ET.SubElement(source, "SourceFilename", relativeToVRT="1").text = piece.name
            ET.SubElement(source, "SourceBand").text = str(band)
            ET.SubElement(source, "SrcRect", xOff="0", yOff="0", xSize=str(width), ySize=str(rows))
            ET.SubElement(source, "DstRect", xOff="0", yOff=str(top), xSize=str(width), ySize=str(rows))
            top += rows
    with atomic_path(vrt) as tmp:
        tmp.write_text(ET.tostring(root, encoding="unicode"))
    return sum(heights), width
