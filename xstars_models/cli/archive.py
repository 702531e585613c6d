"""``xstars embed-collection``: a whole collection of scenes into one GeoParquet dataset, in this
process or on a Dask cluster, resumable."""

from __future__ import annotations

import argparse
from typing import Any

from ..scenes import SceneOptions

EPILOG = """\
sources: GeoTIFF files, http(s):// COG URLs, STAC Item / ItemCollection / Catalog / Collection JSON
(paths or URLs; catalogues are walked). Rows: one per embedded tile, under DATASET/sensor=S/.

examples:
  xstars embed-collection xstars-s2-aerial --sensor sentinel2_rgb catalog.json --out s2_tiles/ --workers 2
  xstars embed-collection xstars-s2-aerial --sensor sentinel2_rgb a.tif b.tif --out tiles/ \\
      --scheduler tcp://10.0.0.5:8786 --bounds 13.30 52.45 13.50 52.55
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "embed-collection",
        help="embed a collection of scenes (files, COG URLs, STAC items or catalogues) into one GeoParquet dataset",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument("sources", nargs="+", help="scenes: files, URLs, STAC JSON (paths or URLs)")
    p.add_argument("--sensor", required=True, help="the model's sensor name for this imagery")
    p.add_argument("--out", required=True, help="the dataset folder (created; an existing one is resumed or appended to)")
    p.add_argument("--bounds", type=float, nargs=4, metavar=("WEST", "SOUTH", "EAST", "NORTH"),
                   help="embed only this area, in degrees (EPSG:4326 longitude and latitude)")
    p.add_argument("--tile", type=int, help="tile side in pixels at the sensor's GSD (multiple of the patch size)")
    p.add_argument("--overlap", type=int, default=0, help="tile overlap in pixels at the sensor's GSD")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cpu, cuda, cuda:1... on each worker (default cpu)")
    p.add_argument("--resample", action="store_true", help="resample windows to the sensor's GSD")
    p.add_argument("--max-nodata", type=float, default=0.5, help="skip tiles with a larger nodata fraction (0-1)")
    p.add_argument("--whiten", action="store_true", help="write the vectors whitened by the model's fitted whitening")
    from .embedding import _add_precision_flag

    _add_precision_flag(p)
    p.add_argument("--workers", type=int, default=1, help="local Dask worker processes (1: this process, no cluster)")
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--scheduler", help="run on this existing Dask scheduler instead (tcp://host:8786)")
    p.add_argument("--retries", type=int, default=2, help="further attempts of a failed task before it is recorded")
    p.add_argument("--strips-per-task", type=int, default=32, help="rows of tiles per task")
    p.add_argument("--restart", action="store_true", help="discard this sensor's rows written with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.set_defaults(func=_embed_collection, setting_flags={("resample", True): "--resample"})


def _embed_collection(args: argparse.Namespace) -> int:
    from ..archive import ArchiveOptions
    from ..xstars import XStars

    # Checked before the model is loaded: a bad option fails at once.
    scene = SceneOptions(
        output="cls", resume=False, progress=False, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
        device=args.device, resample=args.resample, max_nodata=args.max_nodata, precision=args.precision,
        whiten=args.whiten, bounds=args.bounds, bounds_crs="EPSG:4326" if args.bounds else None,
    )
    options = ArchiveOptions(
        scene=scene, workers=args.workers, threads_per_worker=args.threads_per_worker, scheduler=args.scheduler,
        retries=args.retries, strips_per_task=args.strips_per_task, restart=args.restart, progress=not args.no_progress,
    )
    model = XStars.from_pretrained(args.model, local_files_only=args.offline)
    result = model.embed_collection(args.sources, args.sensor, args.out, options=options)
    print(f"{result.dataset}: {result.rows} rows of {args.sensor} ({result.written} parts written now, "
          f"{result.reused} already done) in {result.seconds:.1f} s")
    for failure in result.failures:
        print(f"failed: {failure['key']} ({failure['source']}): {failure['error']}")
    return 1 if result.failures else 0
