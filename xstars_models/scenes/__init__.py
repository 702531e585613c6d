"""Whole scenes: a GeoTIFF, a cloud-optimised GeoTIFF behind ``http(s)://``, a STAC Item (or a
large C x H x W array) in, georeferenced embeddings out.

:func:`embed_scene` cuts a scene into tiles, embeds them in batches and writes either a dense
feature map — a float32 Cloud-Optimised GeoTIFF with one band per feature dimension and one pixel
per token — or one vector per tile with its footprint, as GeoParquet (read by geopandas; a
geometry column, a GeoParquet 1.1 ``bbox`` covering and an ``embedding`` fixed-size list of
float32, the layout of the GeoParquet embedding datasets TorchGeo and TerraTorch use, though not
tested against those libraries here). A job's settings
(tile, overlap, output, batch size, precision...) are one :class:`SceneOptions`, checked when
built, given as ``options=`` or field by field as keywords.

Sources
    A URL is opened by GDAL, which reads the file's header and then only the byte ranges of the
    windows asked for (HTTP range requests); nothing is downloaded whole. A STAC Item's assets are
    chosen by the sensor's band names (see :mod:`.stac`) and stacked into a virtual raster that is
    read the same way. ``bounds=`` (in the scene's CRS, or in ``bounds_crs=``, e.g.
    ``"EPSG:4326"``) or ``window=`` (input pixels) restricts everything below to an area of
    interest, whose corner becomes the outputs' origin.

Units
    Float imagery whose values cannot be the sensor's digital numbers (values of another bit
    depth, or already scaled to 0-1) is refused strip by strip, naming the expected units (see
    :mod:`xstars_models.units`); integer imagery must have the sensor's data type.

Ground sampling distance (GSD)
    The pixel size in the scene's metadata (its affine transform, in the CRS's linear unit,
    converted to metres) is compared with the sensor's ``gsd_m``:

    * within 1 %: used as is;
    * otherwise, with ``resample=True``: every window is read resampled to the sensor's GSD
      (``average`` when the file is finer than the sensor, ``bilinear`` when coarser); the scale is
      recorded in :attr:`SceneResult.resample_scale` and in the output's metadata;
    * otherwise, within 10 %: used as is with a ``UserWarning`` naming both GSDs;
    * otherwise: ``ValueError`` naming both GSDs and the ``resample=True`` option.

    Scenes in a geographic CRS (degrees) are refused: reproject them to a projected CRS first.
    Scenes without georeferencing (no CRS and an identity transform) are taken to be at the
    sensor's GSD; the output is then in the input's pixel coordinates.

Tiles
    ``tile`` and ``overlap`` are in pixels at the sensor's GSD and must be whole numbers of the
    sensor's patch size. Along each axis tiles start every ``tile - overlap`` pixels and the last one
    is shifted inward to end at the scene edge, so every tile is full size unless the scene itself is
    smaller than a tile (then the tile is the scene). Pixels beyond a whole number of patches
    (bottom rows, right columns) are not embedded, with a warning.

Stitching (``output="map"``)
    Where tiles overlap, a token's feature is the weighted mean of the tiles covering it. A tile's
    weight ramps linearly across its overlap with each neighbour (a cross-fade: where two tiles
    overlap their weights sum to one), so seams do not show. Without overlap every token comes from
    exactly one tile and equals ``model.embed(tile, sensor, output="map")`` there.

Nodata
    A pixel is missing when all its bands equal the file's nodata value (else the sensor spec's
    ``nodata``), or when any band is NaN or infinite. Tiles with more than ``max_nodata`` of their
    pixels missing, or all of them, are not embedded. In the map, tokens covered only by such tiles,
    and tokens whose pixels are all missing, are NaN (the output's nodata value); in ``cls`` output
    such tiles have NaN vectors and ``valid`` False.

Memory
    The scene is processed one row of tiles (a *strip*) at a time, and nothing is kept for rows
    already done: the next strip is read in a background thread while the current one is embedded,
    the features of the strip are added into an accumulator one tile high and one scene wide (in
    tokens), and the rows of it that no later tile touches are written to the output window by
    window. Peak memory therefore depends on the scene's width, the tile size, the batch size and
    the feature dimension, never on the scene's height. GDAL's block cache is capped at 64 MiB
    during the call so that it cannot grow with the scene either. ``cls`` outputs are streamed into
    the GeoParquet file one row group per strip, and the map is copied into its COG layout block
    by block at the end. (An array source is, of course, in memory already.)

Resuming
    Outputs are written under temporary names beside ``out`` — ``<out>.partial`` (an uncompressed
    GeoTIFF of the map, or the raw tile vectors for ``cls``) and ``<out>.partial.json`` — and
    turned into the final file under a temporary name that is renamed into place at the end. After
    each strip the partial output is flushed to disk, the accumulator rows that the next strip
    still adds to are saved (``<out>.partial.carry-<strip>.npz``, only with overlapping
    tiles), and the JSON records the number of finished strips together with the settings and a
    fingerprint of the input (path, size and modification time of a file, the URL or STAC Item
    and its assets, the raster's shape and transform, the area of interest, or a hash of an array)
    and of the model's weights. A later call with ``resume=True`` continues after the last finished
    strip and refuses, naming the differing settings, if any of them changed; ``resume=False``
    discards a partial run and starts over. ``batch_size``, ``device``, ``compile``,
    ``overviews`` and ``overwrite`` may change between runs.

    An existing ``out`` is refused unless ``overwrite=True``; partial files are resumed either way.
    ``out`` may not be a file the run reads (STAC assets included), and ``<out>.lock`` keeps a
    second run off the same output while one writes it. After a failure (a full disk, an input
    that cannot be read, Ctrl-C) a run leaves either its partial files, consistent, for a rerun to
    resume (once a strip was recorded), or nothing of itself; ``OutputWriteError`` /
    ``InputReadError`` name the cause (ENOSPC and the file, or the input's rows) and say which.
    Network waits are bounded: :mod:`xstars_models.io.network`.
"""

from .embed import SceneResult, embed_scene
from .options import SCENE_OUTPUTS, SceneOptions
from .tiles import SceneGrid, TileTable, embed_tiles, scene_grid
from .tiling import default_tile
from .writers import SceneWriter, StripWriter

__all__ = [
    "SCENE_OUTPUTS", "SceneGrid", "SceneOptions", "SceneResult", "SceneWriter", "StripWriter", "TileTable",
    "default_tile", "embed_scene", "embed_tiles", "scene_grid",
]
