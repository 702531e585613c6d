"""The collection engine's cost (issue #28): the same scenes embedded by a plain loop of
``embed_scene(output="cls")`` in one process, by ``embed_collection`` in this process
(``workers=1``), and on a Dask LocalCluster of W single-threaded workers against W processes each
running a plain loop over its share of the scenes (the same process and thread layout); plus the
per-task scheduling cost of that cluster (empty tasks) and each worker's peak resident memory.

    python bench/bench_archive.py [--scenes 8] [--size 1024] [--workers 2] [--repeats 2]

With ``--rss``, instead: a worker's peak resident memory against the number and the size of the
scenes it embeds. Each configuration ``SCENESxSIDE`` (``--rss 2x512,32x512,2x4096``) runs on a
fresh LocalCluster of one single-threaded worker (so each peak is that run's alone);
``--rss-maps`` lists configurations to run again with ``maps=True``.

    python bench/bench_archive.py --rss 2x512,8x512,32x512,2x2048,8x2048,2x4096 --rss-maps 2x4096
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


def configurations(text: str) -> list[tuple[int, int]]:
    """``"2x512,32x512"`` -> [(2, 512), (32, 512)]: scenes and side in pixels."""
    return [(int(a), int(b)) for a, b in (item.split("x") for item in text.split(",") if item)]


def rss(runs: list[tuple[int, int, bool]]) -> None:
    """Peak RSS of one fresh single-threaded worker per run (scenes, side in pixels, maps)."""
    from distributed import Client, LocalCluster

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="xstars-bench-rss-") as folder:
        root = Path(folder)
        model_dir = str(XStars.from_pretrained("xstars-s2-aerial").save_pretrained(root / "model"))
        model = XStars.from_pretrained(model_dir, local_files_only=True)
        for k, (count, side, maps) in enumerate(runs):
            scenes = []
            for i in range(count):  # scenes of one side are written once, shared by its runs
                path = root / f"scene{side}-{i}.tif"
                if not path.exists():
                    write_scene(path, side, side)
                scenes.append(str(path))
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                client.run(torch.set_num_threads, 1)
                started = time.perf_counter()
                result = embed_collection(model, scenes, SENSOR, root / f"run{k}", precision="fp32", progress=False,
                                          maps=maps, client=client)
                seconds = time.perf_counter() - started
                (peak,) = client.run(peak_rss_mib).values()
            assert not result.failures, result.failures
            rows.append((count, side, maps, result.rows, seconds, peak))
            print(f"{count} x {side} px, maps={maps}: {peak:.0f} MiB", flush=True)
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {date.today().isoformat()}; "
          "xstars-s2-aerial fp32, 64 px tiles, strips_per_task 32, one worker x 1 thread\n")
    print("| scenes | side (px) | maps | tiles | seconds | worker peak RSS (MiB) |\n|---|---|---|---|---|---|")
    for count, side, maps, tiles, seconds, peak in rows:
        print(f"| {count} | {side} | {'yes' if maps else 'no'} | {tiles} | {seconds:.1f} | {peak:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="scene side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rss", type=configurations, help="measure peak RSS per worker for SCENESxSIDE,...")
    parser.add_argument("--rss-maps", type=configurations, default=[], help="the same with maps=True")
    args = parser.parse_args()
    if args.rss or args.rss_maps:
        rss([(n, side, False) for n, side in args.rss or []] + [(n, side, True) for n, side in args.rss_maps])
        return
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
