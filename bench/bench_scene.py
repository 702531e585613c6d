"""Whole scenes: the cost of model.embed() over a raw timm forward on the same batch, and
embed_scene() throughput and peak memory on synthetic uint8 Sentinel-2 RGB GeoTIFFs.

Each scene size runs in a fresh subprocess so that its peak RSS is its own; the peaks of a small
and a large scene should be about equal (memory does not grow with the scene). On Linux the peak is
the process's ``VmHWM``: ``getrusage``'s ``ru_maxrss`` survives ``exec``, so a child would report
the RSS its parent had when it was started whenever that is larger.

    python bench/bench_scene.py [--device cpu|cuda] [--arch vit_tiny_patch16_224] [--patch 8]
        [--img-size 64] [--sizes 2000 2000x10000 10000] [--tile PX] [--batch-size 16] [--amp/--no-amp]
        [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xstars_models import XStars
from xstars_models.scenes import embed_scene

SENSOR = "sentinel2_rgb"


def make_model(args: argparse.Namespace) -> XStars:
    torch.manual_seed(0)
    return XStars.new(args.arch, [SENSOR], patch_size=args.patch, img_size=args.img_size).eval()


def seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """Peak resident memory of this process (``VmHWM`` on Linux, else ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def forward_overhead(args: argparse.Namespace) -> dict:
    """Raw ``trunk.forward_features`` on normalised float input vs ``model.embed`` on the uint8
    batch (validation, normalisation, output formatting included), same batch and device."""
    device = torch.device(args.device)
    model = make_model(args).to(device)
    size = args.img_size
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device)
    x = model.norms[SENSOR](x)
    amp = device.type == "cuda" if args.amp is None else args.amp

    def raw() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model.trunk.forward_features(x)

    def embed() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model.embed(images, SENSOR, output="map", batch_size=args.batch_size, progress=False)

    raw(), embed()  # warm-up
    # Alternating the two spreads machine noise evenly over both; the best of many runs is the
    # estimate least disturbed by other work on a shared machine (as timeit advises).
    pairs = [(seconds(raw, device), seconds(embed, device)) for _ in range(args.repeats)]
    t_raw, t_embed = (min(column) for column in zip(*pairs))
    return {"raw_s": t_raw, "embed_s": t_embed, "raw_images_per_s": args.batch_size / t_raw}


def scene_size(text: str) -> tuple[int, int]:
    """``"2000"`` (a square) or ``"2000x10000"`` (width x height), in pixels."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def write_scene(path: Path, width: int, height: int) -> None:
    """A width x height 3-band uint8 GeoTIFF (UTM 18N, 10 m, deflate, 512 px tiles), written in
    strips so that making it does not need the whole scene in memory."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    profile = dict(
        driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs="EPSG:32618",
        transform=Affine(10.0, 0, 400000.0, 0, -10.0, 4200000.0), tiled=True, blockxsize=512,
        blockysize=512, compress="deflate", BIGTIFF="IF_SAFER",
    )
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, height, 512):
            rows = min(512, height - row)
            rng = np.random.default_rng(row)
            # Fields of ~320 m plus sensor-like noise: something for deflate and the model to chew on.
            coarse = rng.integers(30, 220, (3, rows // 32 + 1, width // 32 + 1), dtype=np.int16)
            field = np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)[:, :rows, :width]
            noise = rng.integers(-12, 13, field.shape, dtype=np.int16)
            dst.write(np.clip(field + noise, 0, 255).astype(np.uint8), window=Window(0, row, width, rows))


def worker(args: argparse.Namespace) -> None:
    """Embed one scene in this (fresh) process and print its measurements as JSON."""
    model = make_model(args).to(args.device)
    # One forward first, so that one-off start-up costs (kernel selection, allocator growth) are
    # neither timed nor attributed to embed_scene's memory.
    warm = torch.zeros(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    with torch.inference_mode():
        model.forward_tokens(warm, SENSOR, [])
    baseline = peak_rss_mib()
    result = embed_scene(
        model, args.scene, SENSOR, out=args.out, tile=args.tile, batch_size=args.batch_size,
        device=args.device, progress=False, resume=False, compile=args.compile,
        precision="auto" if args.amp is None else ("bf16" if args.amp else "fp32"),
    )
    print(json.dumps({
        "tiles": result.tiles,
        "seconds": result.seconds,
        "baseline_mib": baseline,
        "peak_mib": peak_rss_mib(),
    }))


def scene_run(args: argparse.Namespace, width: int, height: int, folder: Path) -> dict:
    scene, out = folder / f"scene_{width}x{height}.tif", folder / f"map_{width}x{height}.tif"
    write_scene(scene, width, height)
    command = [
        sys.executable, __file__, "--worker", "--scene", str(scene), "--out", str(out),
        "--device", args.device, "--arch", args.arch, "--patch", str(args.patch),
        "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
    ]
    if args.tile:
        command += ["--tile", str(args.tile)]
    if args.amp is not None:
        command.append("--amp" if args.amp else "--no-amp")
    if args.compile:
        command.append("--compile")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    stats["megabytes"] = width * height * 3 / 1e6
    scene.unlink()
    out.unlink()
    return stats


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="vit_tiny_patch16_224")
    parser.add_argument("--patch", type=int, default=8, help="trunk patch size in pixels")
    parser.add_argument("--img-size", type=int, default=64, help="pretraining image size in pixels")
    parser.add_argument("--sizes", type=scene_size, nargs="+", default=[(2000, 2000), (2000, 10000), (10000, 10000)],
                        help="scenes in pixels: a side (square) or WIDTHxHEIGHT")
    parser.add_argument("--tile", type=int, help="tile side in pixels (default: embed_scene's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs of the batch comparison")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scene", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    overhead = forward_overhead(args)
    tile = args.tile or args.img_size
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {args.device}; arch {args.arch} patch {args.patch} img_size {args.img_size}; "
          f"tile {tile} px, batch {args.batch_size}\n")
    print(f"| batch | raw timm forward ms | model.embed() ms | overhead (best of {args.repeats} alternating runs) |")
    print("|---|---|---|---|")
    print(f"| {args.batch_size} x {args.img_size} px | {overhead['raw_s'] * 1e3:.1f} | "
          f"{overhead['embed_s'] * 1e3:.1f} | {overhead['embed_s'] / overhead['raw_s'] - 1:+.1%} |\n")
    print("| scene | tiles | seconds | tiles (images)/s | MB/s | vs raw forward | peak RSS MiB "
          "| RSS before embed_scene MiB |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="xstars-bench-scene-") as folder:
        for width, height in args.sizes:
            stats = scene_run(args, width, height, Path(folder))
            rate = stats["tiles"] / stats["seconds"]
            print(f"| {width} x {height} px | {stats['tiles']} | {stats['seconds']:.1f} | {rate:.1f} | "
                  f"{stats['megabytes'] / stats['seconds']:.2f} | {rate / overhead['raw_images_per_s']:.0%} | "
                  f"{stats['peak_mib']:.0f} | {stats['baseline_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
