"""``xstars embed-collection``: a whole collection of scenes into one GeoParquet dataset, in this
process or on a Dask cluster, resumable."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..scenes import SceneOptions
from .flags import HelpFormatter, add_device_flag

if TYPE_CHECKING:
    from ..archive import StacSearch

EPILOG = """\
sources: GeoTIFF files, http(s):// COG URLs, STAC Item / ItemCollection / Catalog / Collection JSON
(paths or URLs; catalogues are walked), and/or the items a STAC API search finds (--stac-api with
--collection, --bbox, --datetime: every page of results). --bbox chooses the scenes; --bounds
limits the tiles embedded in each. Rows: one per embedded tile, under DATASET/sensor-S/.

examples:
  xstars embed-collection xstars-s2-aerial --sensor sentinel2_rgb catalog.json --out s2_tiles/ --workers 2
  xstars embed-collection xstars-s2-aerial --sensor sentinel2_rgb a.tif b.tif --out tiles/ \\
      --scheduler tcp://10.0.0.5:8786 --bounds 13.30 52.45 13.50 52.55
  xstars embed-collection xstars-s2-aerial --sensor sentinel2_rgb --out s2_tiles/ \\
      --stac-api https://earth-search.aws.element84.com/v1 --collection sentinel-2-l2a \\
      --bbox 13.30 52.45 13.50 52.55 --datetime 2024-06-01/2024-08-31 --max-items 20
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "embed-collection",
        help="embed a collection of scenes (files, COG URLs, STAC items, catalogues or an API search) into one "
             "GeoParquet dataset",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", help="registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument("sources", nargs="*", help="scenes: files, URLs, STAC JSON (paths or URLs); optional with --stac-api")
    p.add_argument("--sensor", required=True, help="the model's sensor name for this imagery")
    p.add_argument("--out", required=True, help="the dataset folder (created; an existing one is resumed or appended to)")
    search = p.add_argument_group("STAC API search (its items are scenes too)")
    search.add_argument("--stac-api", dest="url", metavar="URL",
                        help="the STAC API's landing page, e.g. https://earth-search.aws.element84.com/v1")
    search.add_argument("--collection", dest="collections", action="append", metavar="ID",
                        help="a collection to search (repeat for several; default: all)")
    search.add_argument("--bbox", type=float, nargs=4, metavar=("WEST", "SOUTH", "EAST", "NORTH"),
                        help="items intersecting this box, in degrees (EPSG:4326 longitude and latitude)")
    search.add_argument("--datetime", metavar="INTERVAL",
                        help="items acquired within this RFC 3339 instant or interval: 2024-01-01/2024-12-31, "
                             "2024-06-01T00:00:00Z/.. (a date alone: its whole day, UTC)")
    search.add_argument("--max-items", type=int, metavar="N", help="at most this many items (default: all found)")
    p.add_argument("--bounds", type=float, nargs=4, metavar=("WEST", "SOUTH", "EAST", "NORTH"),
                   help="embed only this area of each scene, in degrees (EPSG:4326 longitude and latitude)")
    p.add_argument("--tile", type=int,
                   help="tile side in pixels at the sensor's GSD (multiple of the patch size; default: the model's)")
    p.add_argument("--overlap", type=int, default=0, help="tile overlap in pixels at the sensor's GSD")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass")
    add_device_flag(p, " on each worker (auto: each worker's GPU when it has one)")
    p.add_argument("--resample", action="store_true", help="resample windows to the sensor's GSD")
    p.add_argument("--max-nodata", type=float, default=0.5, help="skip tiles with a larger nodata fraction (0-1)")
    p.add_argument("--whiten", action="store_true", help="write the vectors whitened by the model's fitted whitening")
    p.add_argument("--maps", action="store_true",
                   help="also write each scene's feature-map COG (as embed-scene --output map) into DATASET/_maps/")
    p.add_argument("--overviews", action="store_true", help="add overviews to the --maps COGs")
    from .embedding import _add_precision_flag

    _add_precision_flag(p)
    p.add_argument("--workers", type=int, default=1, help="local Dask worker processes (1: this process, no cluster)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="tasks each local worker runs at once")
    p.add_argument("--scheduler", help="run on this existing Dask scheduler instead (tcp://host:8786)")
    p.add_argument("--retries", type=int, default=2, help="further attempts of a failed task before it is recorded")
    p.add_argument("--strips-per-task", type=int, default=32, help="rows of tiles per task")
    p.add_argument("--restart", action="store_true", help="discard this sensor's rows written with other settings")
    p.add_argument("--no-progress", action="store_true", help="show no progress bar")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.set_defaults(func=_embed_collection, setting_flags={("resample", True): "--resample"}, intermixed="sources")


def _embed_collection(args: argparse.Namespace) -> int:
    from ..archive import ArchiveOptions
    from ..xstars import XStars

    # Checked before the model is loaded: a bad option fails at once.
    sources = _sources(args)
    scene = SceneOptions(
        output="cls", resume=False, progress=False, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
        device=args.device, resample=args.resample, max_nodata=args.max_nodata, precision=args.precision,
        whiten=args.whiten, bounds=args.bounds, bounds_crs="EPSG:4326" if args.bounds else None,
        overviews=args.overviews,
    )
    options = ArchiveOptions(
        scene=scene, maps=args.maps, workers=args.workers, threads_per_worker=args.threads_per_worker, scheduler=args.scheduler,
        retries=args.retries, strips_per_task=args.strips_per_task, restart=args.restart, progress=not args.no_progress,
    )
    model = XStars.from_pretrained(args.model, local_files_only=args.offline)
    result = model.embed_collection(sources, args.sensor, args.out, options=options)
    print(f"{result.dataset}: {result.rows} rows of {args.sensor} ({result.written} parts written now, "
          f"{result.reused} already done) in {result.seconds:.1f} s")
    if options.maps:
        print(f"{result.maps} feature maps assembled now, under {result.dataset}/_maps/")
    for failure in result.failures:
        print(f"failed: {failure['key']} ({failure['source']}): {failure['error']}")
    return 1 if result.failures else 0


# The search flags by the StacSearch field each sets.
_SEARCH_FLAGS = {"collections": "--collection", "bbox": "--bbox", "datetime": "--datetime", "max_items": "--max-items"}


def _sources(args: argparse.Namespace) -> list[str | StacSearch]:
    """The run's sources: the positional ones, then the search the --stac-api flags describe."""
    from ..archive import StacSearch
    from ..errors import InvalidInputError

    sources: list[str | StacSearch] = list(args.sources)
    if args.url is not None:
        sources.append(StacSearch(args.url, tuple(args.collections or ()), args.bbox and tuple(args.bbox),
                                  args.datetime, max_items=args.max_items))
    elif given := [flag for name, flag in _SEARCH_FLAGS.items() if getattr(args, name) is not None]:
        raise InvalidInputError(f"{', '.join(given)} select the items of a STAC API search: give its URL with "
                                "--stac-api.", field="url")
    if not sources:
        raise InvalidInputError("nothing to embed: give scenes (files, COG URLs, STAC JSON) and/or a STAC API search "
                                "(--stac-api URL with --collection, --bbox, --datetime).", field="sources")
    return sources
