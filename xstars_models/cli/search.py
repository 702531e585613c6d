"""``xstars search``: the tiles of a dataset most like an image, the tile under a point, or a tile
of the dataset, across sensors."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .flags import HelpFormatter, add_device_flag

EPILOG = """\
DATASET: an embed-collection dataset folder, or a folder of embed-scene --output cls files (each
file one scene, its scene_id the file's name without .parquet). The tiles of every sensor are
ranked by cosine similarity in the model's whitened space; --where narrows them before ranking
(columns sensor, scene_id, crs, row, col, datetime; bbox(W, S, E, N) in degrees; AND, OR, NOT,
IN, BETWEEN, IS NULL). The first search builds an index in DATASET/_index (exact up to
--exact-max-rows rows, else IVF-PQ with its recall@10 printed); later ones update it when parts
were added and rebuild it when parts changed.

examples:
  xstars search s2_tiles/ --image chip.tif --sensor aerial -k 10
  xstars search tiles/ --near 13.405 52.52 --where "sensor = 'sentinel2_rgb'" --out hits.geojson
  xstars search tiles/ --like S2A_33UUU_20240601:12:40 --where "datetime >= '2024-06-01'" --out hits.parquet
"""


def register(sub: Any) -> None:
    p = sub.add_parser("search", help="find the tiles of an embedded dataset most like an image, a place or a tile, "
                                      "across sensors", epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("dataset", help="the dataset folder (embed-collection output, or a folder of embed-scene cls files)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", metavar="FILE", help="an image file of --sensor (GeoTIFF, PNG, JPEG, .npy): best the "
                                                       "size of the dataset's tiles of that sensor")
    query.add_argument("--near", type=float, nargs=2, metavar=("LON", "LAT"),
                       help="take the dataset's tile under this point (degrees)")
    query.add_argument("--like", metavar="SCENE:ROW:COL", help="take this tile of the dataset")
    p.add_argument("--sensor", metavar="NAME", help="the sensor of --image; with --near or --like, the sensor whose tile to take")
    p.add_argument("-k", type=int, default=10, help="hits to return")
    p.add_argument("--where", metavar="FILTER", help="keep only these rows before ranking, e.g. \"sensor = 'aerial'\"")
    p.add_argument("--out", metavar="FILE", help="write the hits to a .parquet (GeoParquet) or .geojson file instead "
                                                 "of printing them")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (otherwise refused)")
    p.add_argument("--model", metavar="MODEL", help="the model the vectors were embedded with, when the dataset's own cannot be "
                                   "loaded (registry id, Hub repo or folder)")
    p.add_argument("--no-whiten", dest="whiten", action="store_false",
                   help="rank the stored vectors unwhitened (for a model without a fitted whitening; one sensor)")
    p.add_argument("--exact-max-rows", type=int, default=1_000_000, metavar="ROWS",
                   help="datasets of more rows get an IVF-PQ index instead of an exact one")
    p.add_argument("--nprobe", type=int, default=16, metavar="N", help="IVF-PQ clusters scanned per query")
    add_device_flag(p, " when embedding --image")
    p.add_argument("--offline", action="store_true", help="use only the local cache to load the model")
    p.set_defaults(func=_search)


def _search(args: argparse.Namespace) -> int:
    from ..search import SearchOptions, search

    options = SearchOptions(k=args.k, where=args.where, whiten=args.whiten, exact_max_rows=args.exact_max_rows,
                            nprobe=args.nprobe, device=args.device)
    model = None
    if args.model is not None:
        from ..model import XStarsBase

        model = XStarsBase.from_pretrained(args.model, local_files_only=args.offline)
    result = search(args.dataset, image=args.image, sensor=args.sensor, near=args.near, like=args.like, options=options,
                    model=model, local_files_only=args.offline)
    if result.index.action != "loaded":
        print(result.index.describe(), file=sys.stderr)
    query = result.query
    if query["kind"] != "image":
        print(f"query: the {query['sensor']} tile {query['scene_id']}:{query['row']}:{query['col']}", file=sys.stderr)
    if args.out is not None:
        path = result.write(args.out, overwrite=args.overwrite)
        print(f"{path}: {result.hits.num_rows} hits")
    else:
        print("\n".join(result.lines()))
    return 0
