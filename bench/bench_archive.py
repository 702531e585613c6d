"""The collection engine's cost (issue #28): the same scenes embedded by a plain loop of
``embed_scene(output="cls")`` in one process, by ``embed_collection`` in this process
(``workers=1``), and on a Dask LocalCluster of W single-threaded workers against W processes each
running a plain loop over its share of the scenes (the same process and thread layout); plus the
per-task scheduling cost of that cluster (empty tasks) and each worker's peak resident memory.

    python bench/bench_archive.py [--scenes 8] [--size 1024] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from bench_scene import cpu_name, write_scene  # same folder
from xstars_models import XStars
from xstars_models.archive import embed_collection
from xstars_models.scenes import embed_scene

SENSOR = "sentinel2_rgb"


def loop(model_dir: str, scenes: list[str], out: str) -> float:
    """A plain loop of embed_scene over ``scenes``, in this process; seconds."""
    torch.set_num_threads(1)
    model = XStars.from_pretrained(model_dir, local_files_only=True)
    started = time.perf_counter()
    for scene in scenes:
        embed_scene(model, scene, SENSOR, Path(out) / (Path(scene).stem + ".parquet"), output="cls", precision="fp32",
                    progress=False, overwrite=True)
    return time.perf_counter() - started


def parallel_loops(model_dir: str, scenes: list[str], out: str, workers: int) -> float:
    """``workers`` processes, each a plain loop over its share of the scenes: the slowest loop's
    seconds (process start and model load left out, as the cluster's workers are warm too)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        return max(pool.starmap(loop, [(model_dir, scenes[k::workers], out) for k in range(workers)]))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="scene side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="xstars-bench-archive-") as folder:
        root = Path(folder)
        scenes = []
        for k in range(args.scenes):
            path = root / f"scene{k}.tif"
            write_scene(path, args.size, args.size)
            scenes.append(str(path))
        model_dir = str(XStars.from_pretrained("xstars-s2-aerial").save_pretrained(root / "model"))
        model = XStars.from_pretrained(model_dir, local_files_only=True)
        tiles = None
        best: dict[str, float] = {}

        def record(name: str, seconds: float) -> None:
            best[name] = min(best.get(name, float("inf")), seconds)

        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.run(torch.set_num_threads, 1)
            for repeat in range(args.repeats):
                (root / "loop").mkdir(exist_ok=True)
                record("plain loop, 1 process", loop(model_dir, scenes, str(root / "loop")))
                started = time.perf_counter()
                result = embed_collection(model, scenes, SENSOR, root / f"inproc{repeat}", precision="fp32", progress=False)
                record("embed_collection, workers=1 (in process)", time.perf_counter() - started)
                tiles = result.rows
                record(f"plain loops, {args.workers} processes", parallel_loops(model_dir, scenes, str(root / "loop"),
                                                                                 args.workers))
                started = time.perf_counter()
                embed_collection(model, scenes, SENSOR, root / f"dask{repeat}", precision="fp32", progress=False,
                                 client=client)
                record(f"embed_collection, LocalCluster {args.workers} x 1 thread", time.perf_counter() - started)
            # Scheduling cost: empty tasks through the same cluster.
            started = time.perf_counter()
            client.gather(client.map(lambda i: i, range(1000), pure=False))
            per_task_ms = (time.perf_counter() - started) / 1000 * 1e3
            worker_rss = client.run(peak_rss_mib)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {date.today().isoformat()}; "
          f"{args.scenes} scenes of {args.size} x {args.size} px, {tiles} tiles, xstars-s2-aerial fp32, best of {args.repeats}\n")
    print("| path | seconds | tiles/s | vs its plain loop |\n|---|---|---|---|")
    base = {"1": best["plain loop, 1 process"], "n": best[f"plain loops, {args.workers} processes"]}
    for name, seconds in best.items():
        ref = base["1"] if ("1 process" in name or "workers=1" in name) else base["n"]
        print(f"| {name} | {seconds:.2f} | {tiles / seconds:.0f} | {ref / seconds:.2f}x |")
    print(f"\nper-task scheduling cost (1000 empty tasks): {per_task_ms:.2f} ms; "
          f"peak RSS per worker: {', '.join(f'{v:.0f} MiB' for v in worker_rss.values())}")


if __name__ == "__main__":
    main()
