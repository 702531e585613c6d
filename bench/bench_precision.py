"""Precision: fp32 / bf16 / int8 (and what "auto" picks) for model.embed() on a batch, embed_scene()
on a whole synthetic scene and training steps, with the GFLOP/s achieved beside a raw fp32 forward.

The variants are interleaved (fp32, bf16, int8, auto, fp32, ...) and the best of the repeats is
kept, so that other work on a shared machine slows all of them alike rather than one of them.
FLOPs are counted once by torch's FlopCounterMode (matrix products, attention, convolutions: the
same count for every precision), so GFLOP/s is model arithmetic per second, not what the CPU did.

    python bench/bench_precision.py [--device cpu|cuda] [--model xstars-s2-aerial] [--batch 64] [--size 64]
        [--scene 2000] [--repeats 5] [--scene-repeats 3] [--train-steps 12] [--train-repeats 2]
        [--skip-scene] [--skip-train]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench_scene import cpu_name, seconds, write_scene  # same folder: scene writer, timer, machine name
from bench_train import SyntheticPairs
import xstars_models.model
import xstars_models.scenes.embed
from xstars_models import XStars, get_sensor
from xstars_models.scenes import embed_scene
from xstars_models.training import TrainConfig, adapt

SENSOR = "sentinel2_rgb"
INFERENCE = ("fp32", "bf16", "int8", "auto")
# bf16 as it ran before the weights were cast once (precision.bf16_copy): autocast re-casting the
# fp32 weights on every call. Kept as a variant so the gain of the cast stays measured.
AUTOCAST_ONLY = "bf16 autocast only"
TRAINING = ("fp32", "bf16", "auto")


def interleaved_best(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Best (smallest) result of each run over ``repeats`` rounds, the runs taken in turn."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return {name: min(values) for name, values in results.items()}


def variants(device: torch.device, names: tuple[str, ...]) -> list[str]:
    """The variants that can run on ``device`` (int8 is CPU only)."""
    return [n for n in names if not (n == "int8" and device.type != "cpu")]


@contextlib.contextmanager
def autocast_only() -> Iterator[None]:
    """bf16 runs with the model's own fp32 weights under autocast, as before precision.bf16_copy
    (the callers' ``inference_copy`` swapped for one that returns the model)."""
    saved = xstars_models.model.inference_copy, xstars_models.scenes.embed.inference_copy
    same = lambda model, precision, part="trunk": model  # noqa: E731
    xstars_models.model.inference_copy = xstars_models.scenes.embed.inference_copy = same
    try:
        yield
    finally:
        xstars_models.model.inference_copy, xstars_models.scenes.embed.inference_copy = saved


def run_as(variant: str) -> tuple[str, Callable[[], contextlib.AbstractContextManager]]:
    """The precision to ask for and the context (a new one per run) to run ``variant`` in."""
    return ("bf16", autocast_only) if variant == AUTOCAST_ONLY else (variant, contextlib.nullcontext)


def matmul_peak(model: XStars, rows: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """The host's matrix-product rate (GFLOP/s, all torch threads) on the trunk's Linear layer shapes
    (one of each distinct shape, FLOP-weighted as one block runs them), at the best of ``rows``
    (tokens per product): what the hardware gives these shapes, the reference for a model's rate."""
    shapes = sorted({(m.in_features, m.out_features) for m in model.trunk.modules() if type(m) is nn.Linear})
    best = (0.0, rows[0])
    for n in rows:
        mats = [(torch.randn(n, k, device=device, dtype=dtype), torch.randn(k, o, device=device, dtype=dtype))
                for k, o in shapes]
        flops = sum(2 * n * k * o for k, o in shapes)

        def once(mats: list[tuple[torch.Tensor, torch.Tensor]] = mats) -> None:
            for a, b in mats:
                torch.mm(a, b)

        once()
        best = max(best, (flops / min(seconds(once, device) for _ in range(20)) / 1e9, n))
    return best


def forward_flops(model: XStars, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.forward_tokens(x, SENSOR, [])
    return counter.get_total_flops()


def bench_embed(model: XStars, args: argparse.Namespace, device: torch.device) -> tuple[list[str], float]:
    """model.embed on ``batch`` uint8 tiles vs the raw fp32 trunk forward on the same, normalised."""
    size = args.size
    images = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
    x = model.norms[SENSOR](torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device))
    flops = forward_flops(model, x)

    def raw() -> float:
        with torch.inference_mode():
            return seconds(lambda: model.trunk.forward_features(x), device)

    def embed(variant: str) -> Callable[[], float]:
        precision, context = run_as(variant)

        def once() -> float:
            with context():
                return seconds(lambda: model.embed(images, SENSOR, batch_size=args.batch, progress=False,
                                                   precision=precision), device)
        return once

    runs = {"raw": raw, **{p: embed(p) for p in variants(device, (*INFERENCE, AUTOCAST_ONLY))}}
    for run in runs.values():  # warm-up (and the int8 copy, made once per model)
        run()
    best = interleaved_best(runs, args.repeats)
    rate = lambda s: flops / s / 1e9  # noqa: E731
    lines = [
        f"| path (batch {args.batch} x {size} px) | ms | images/s | GFLOP/s | vs fp32 embed | vs raw fp32 forward |",
        "|---|---|---|---|---|---|",
        f"| raw fp32 trunk forward | {best['raw'] * 1e3:.1f} | {args.batch / best['raw']:.0f} | {rate(best['raw']):.0f} | | 1.00x |",
    ]
    for name in runs:
        if name == "raw":
            continue
        auto = model.resolve_precision("auto", device, tokens=(size // 8) ** 2, batch_size=args.batch)
        label = f"auto = {auto.name}" if name == "auto" else name
        lines.append(f"| embed, {label} | {best[name] * 1e3:.1f} | {args.batch / best[name]:.0f} | {rate(best[name]):.0f} | "
                     f"{best['fp32'] / best[name]:.2f}x | {best['raw'] / best[name]:.2f}x |")
    return lines, flops / args.batch


def bench_scene(model: XStars, args: argparse.Namespace, device: torch.device, flops_per_tile: float) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="xstars-bench-precision-") as folder:
        scene = Path(folder) / "scene.tif"
        write_scene(scene, args.scene, args.scene)
        results: dict[str, dict] = {}

        def run(variant: str) -> Callable[[], float]:
            precision, context = run_as(variant)

            def once() -> float:
                out = Path(folder) / f"{variant.replace(' ', '-')}.tif"
                out.unlink(missing_ok=True)
                with context():
                    result = embed_scene(model, scene, SENSOR, out=out, device=device, progress=False, resume=False,
                                         precision=precision)
                results[variant] = {"tiles": result.tiles, "precision": result.precision}
                return result.seconds
            return once

        runs = {p: run(p) for p in variants(device, (*INFERENCE, AUTOCAST_ONLY))}
        runs["fp32"]()  # warm-up: file cache, allocator
        best = interleaved_best(runs, args.scene_repeats)
    tiles = results["fp32"]["tiles"]
    # The scene's products have batch x tokens rows (16 x 65 for 64 px tiles); larger ones show
    # whether the hardware would do better with more rows.
    stem = model.check_sensor(SENSOR)
    per_batch = 16 * ((64 // stem.patch_size) ** 2 + model.trunk.num_prefix_tokens)
    peaks = {dtype: matmul_peak(model, (per_batch, 4 * per_batch, 16 * per_batch), device, dtype)
             for dtype in (torch.float32, torch.bfloat16)}
    lines = [
        f"| {args.scene} x {args.scene} px scene ({tiles} tiles of 64 px) | seconds | tiles/s | GFLOP/s | vs fp32 | "
        "% of fp32 matmul peak | % of bf16 matmul peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, value in best.items():
        label = f"auto = {results[name]['precision'].split(':')[0].split(' ')[0]}" if name == "auto" else name
        rate = tiles * flops_per_tile / value / 1e9
        lines.append(f"| {label} | {value:.2f} | {tiles / value:.0f} | {rate:.0f} | {best['fp32'] / value:.2f}x | "
                     f"{100 * rate / peaks[torch.float32][0]:.0f}% | {100 * rate / peaks[torch.bfloat16][0]:.0f}% |")
    lines.append(f"\nauto: {results['auto']['precision']}")
    for dtype, (peak, rows) in peaks.items():
        lines.append(f"{dtype} matmul peak on the trunk's Linear shapes: {peak:.0f} GFLOP/s ({rows} rows; "
                     f"{torch.get_num_threads()} threads)")
    return lines


def train_once(args: argparse.Namespace, device: torch.device, precision: str, steps: int) -> tuple[list[float], str]:
    """adapt(mode="full") (the setting of bench_train.py): the time at the end of each step, and
    the precision its training record says ran."""
    torch.manual_seed(0)
    base = XStars.new("vit_tiny_patch16_224", [SENSOR], patch_size=8, img_size=64)
    config = TrainConfig(steps=steps, batch_size=args.train_batch, alpha=0.1, dino_out_dim=4096, local_crops=4,
                         checkpoint_every=10**9, precision=precision)
    with tempfile.TemporaryDirectory() as run:
        trained = adapt(base, get_sensor("aerial_rgb").with_gsd(5.0, name="aerial"), SyntheticPairs(), mode="full",
                        config=config, out_dir=run, device=device, progress=False)
        times = [json.loads(line)["time_s"] for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    return times, trained.training_record["precision"]


def train_step_flops(args: argparse.Namespace, device: torch.device) -> int:
    with FlopCounterMode(display=False) as counter:
        train_once(args, device, "fp32", 1)
    return counter.get_total_flops()


def bench_train(args: argparse.Namespace, device: torch.device) -> list[str]:
    flops = train_step_flops(args, device)
    used: dict[str, str] = {}

    def run(precision: str) -> Callable[[], float]:
        def once() -> float:
            times, used[precision] = train_once(args, device, precision, args.train_steps)
            skip = 2  # warm-up steps
            return (times[-1] - times[skip]) / (len(times) - 1 - skip)  # seconds per step
        return once

    best = interleaved_best({p: run(p) for p in variants(device, TRAINING)}, args.train_repeats)
    lines = [
        f"| training step (adapt, ViT-Tiny patch 8, batch {args.train_batch}, 2 global + 4 local crops) | steps/s | "
        "GFLOP/s | vs fp32 |",
        "|---|---|---|---|",
    ]
    for name, value in best.items():
        label = f"auto = {used[name].split(':')[0].split(' ')[0]}" if name == "auto" else name
        lines.append(f"| {label} | {1 / value:.2f} | {flops / value / 1e9:.0f} | {best['fp32'] / value:.2f}x |")
    lines.append(f"\n(int8 is inference only; one fp32 step counts {flops / 1e9:.1f} GFLOP, forward and backward.)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="xstars-s2-aerial")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="tile side in pixels for the embed batch")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--scene", type=int, default=2000, help="scene side in pixels")
    parser.add_argument("--scene-repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=12, help="steps per run (at least 4; the first 2 are not timed)")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--skip-scene", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.train_steps < 4:
        parser.error(f"--train-steps must be at least 4 (2 warm-up steps are not timed), got {args.train_steps}")
    # A fresh calibration cache, so that the first "auto" below measures (and shows what that costs).
    os.environ["XSTARS_CACHE"] = tempfile.mkdtemp(prefix="xstars-bench-cache-")
    model = XStars.from_pretrained(args.model).to(device).eval()
    load_before = os.getloadavg()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, device "
          f"{args.device}; {date.today().isoformat()}; model {args.model}")
    started = time.perf_counter()
    auto = model.resolve_precision("auto", device)  # the default tile: what the scene runs use
    print(f"auto resolves to: {auto}; calibration took {time.perf_counter() - started:.2f} s\n")
    lines, flops_per_tile = bench_embed(model, args, device)
    print("\n".join(lines) + "\n", flush=True)
    if not args.skip_scene:
        print("\n".join(bench_scene(model, args, device, flops_per_tile)) + "\n", flush=True)
    if not args.skip_train:
        print("\n".join(bench_train(args, device)) + "\n", flush=True)
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
