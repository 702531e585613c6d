"""One prepared device check (issue #26): MSAD batched vs loop, a training step with and without
MSAD, embed / embed_scene throughput at fp32 and bf16 (with and without compile), peak GPU memory
and a short training run's loss curve, written as ONE markdown file (plus a PNG of the curve when
matplotlib is installed). Each part has a time budget in seconds; a part past its budget stops
early and says so in the markdown, so the whole check fits in about 8 minutes on one GPU.

    python bench/gpu_check.py [--device cuda|cpu] [--out FILE.md] [--tiny]

``--tiny`` (used by the test suite on CPU) shrinks every size so the whole run takes seconds.
Exits 2 with a one-line message when torch, the package or the requested device is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, help="markdown file (default $OUT/gpu_check.md or bench/gpu_check.md)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the whole run in seconds (tests, CPU)")
    args = parser.parse_args(argv)
    if args.out is None:
        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent
        args.out = folder / "gpu_check.md"
    return args


# Sizes and budgets (seconds) per part; the training run uses the training steps' batch so that
# their measured step time plans its step count. Tiny: a few seconds on two CPU cores.
# Budgets are checked between measurements, so one measurement (a compilation) can overrun its
# part: the full budgets add up to about 6 minutes to leave that margin.
FULL = dict(msad=(64, 197, 384, 5, 30), train=(16, 20, 50), embed=(256, 128, 5, 70), scene=(4096, 70),
            run=(16, 150))
TINY = dict(msad=(4, 9, 32, 2, 5), train=(2, 4, 10), embed=(8, 32, 2, 6), scene=(64, 6), run=(2, 2))


class Budget:
    """Seconds allowed for one part; ``over()`` once they are spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.stopped = seconds, time.perf_counter(), False

    def over(self) -> bool:
        """True (and remembered for ``note``) once the budget is spent: the caller skips the rest."""
        self.stopped = self.stopped or time.perf_counter() - self.start > self.seconds
        return self.stopped

    def note(self) -> str:
        return f"\n\n*Stopped early: over its budget of {self.seconds:.0f} s.*" if self.stopped else ""


def machine_lines(device: Any) -> list[str]:
    import torch
    from bench_scene import cpu_name

    flags = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Flags:"):
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                flags = " ".join(f for f in line.split()[1:] if f in wanted)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return [
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- device: {device.type}; GPU: {gpu}",
        f"- CPU: {cpu_name()}; flags of note: {flags or 'n/a'}; {torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'n/a'}",
    ]


def peak_memory(device: Any) -> str:
    import torch

    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"


def reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def msad_part(device: Any, sizes: tuple) -> str:
    import torch
    from bench_msad import per_position_loop, timed

    from xstars_models.losses import MSADLoss

    batch, tokens, dim, repeats, seconds = sizes
    budget = Budget(seconds)
    torch.manual_seed(0)
    z_a, z_b = torch.randn(batch, tokens, dim, device=device), torch.randn(batch, tokens, dim, device=device)
    loss = MSADLoss(dim, ["a", "b"]).to(device).eval()
    reset_peak(device)
    _, fast = timed(lambda a, b: loss(a, b, "a", "b"), z_a, z_b, repeats)
    rows = ["| batched ms | per-position loop ms | speed-up | peak GPU memory |", "|---|---|---|---|"]
    if budget.over():
        rows.append(f"| {statistics.mean(fast):.1f} | skipped | n/a | {peak_memory(device)} |")
    else:
        _, slow = timed(lambda a, b: per_position_loop(loss, a, b), z_a, z_b, repeats)
        f, s = statistics.mean(fast), statistics.mean(slow)
        rows.append(f"| {f:.1f} | {s:.1f} | {s / f:.2f}x | {peak_memory(device)} |")
    head = f"## MSAD: batched vs per-position loop\n\nB={batch}, N={tokens}, D={dim}, forward + backward, mean of {repeats}\n\n"
    return head + "\n".join(rows) + budget.note()


def train_part(device: Any, sizes: tuple) -> tuple[str, float]:
    from bench_train import steps_per_second

    batch, steps, seconds = sizes
    budget = Budget(seconds)
    args = argparse.Namespace(device=str(device), steps=steps, batch=batch, local_crops=2)
    rows = ["| loss | ms/step | peak GPU memory |", "|---|---|---|"]
    step_s = 0.0
    for name, alpha in (("DINO only (alpha = 0)", 0.0), ("DINO + 0.1 MSAD", 0.1)):
        if budget.over():
            rows.append(f"| {name} | skipped | n/a |")
            continue
        reset_peak(device)
        rate = steps_per_second(alpha, args)
        step_s = max(step_s, 1 / rate)
        rows.append(f"| {name} | {1000 / rate:.1f} | {peak_memory(device)} |")
    head = (f"## Training step with and without MSAD\n\nadapt(mode='full'), ViT-Tiny patch 8, batch {batch}, "
            f"2 global + 2 local crops, {steps} steps (warm-up excluded)\n\n")
    return head + "\n".join(rows) + budget.note(), step_s


def embed_model(device: Any, tiny: bool) -> Any:
    import torch

    from xstars_models import XStars

    torch.manual_seed(0)
    if tiny:
        model = XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], patch_size=8, img_size=32)
    else:
        model = XStars.from_pretrained("xstars-s2-aerial")  # bundled with the package: no download
    return model.to(device).eval()


def best_seconds(fn: Callable[[], Any], device: Any, repeats: int) -> float:
    from bench_scene import seconds

    fn()  # warm-up (and compilation)
    return min(seconds(fn, device) for _ in range(repeats))


def embed_part(device: Any, sizes: tuple, tiny: bool) -> str:
    import numpy as np
    import torch

    batch, size, repeats, seconds = sizes
    budget = Budget(seconds)
    model = embed_model(device, tiny)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    rows = ["| precision | compile | tiles/s | peak GPU memory |", "|---|---|---|---|"]
    for compiled in (False, True):
        if compiled and tiny:
            rows.append("| fp32, bf16 | yes | skipped (--tiny: compiling takes minutes on CPU) | n/a |")
            continue
        if compiled:
            # embed() has no compile option; it runs each batch through forward_tokens, which is
            # what embed_scene(compile=True) compiles too.
            model.forward_tokens = torch.compile(model.forward_tokens)
        for precision in ("fp32", "bf16"):
            if budget.over():
                rows.append(f"| {precision} | {'yes' if compiled else 'no'} | skipped | n/a |")
                continue
            reset_peak(device)
            def run(p: str = precision) -> Any:
                return model.embed(images, "sentinel2_rgb", batch_size=batch, progress=False, precision=p)

            t = best_seconds(run, device, repeats)
            rows.append(f"| {precision} | {'yes' if compiled else 'no'} | {batch / t:.1f} | {peak_memory(device)} |")
    head = f"## embed throughput\n\n{batch} uint8 tiles of {size} px, sentinel2_rgb, best of {repeats}\n\n"
    return head + "\n".join(rows) + budget.note()


def scene_part(device: Any, sizes: tuple, tiny: bool) -> str:
    import numpy as np

    from xstars_models.scenes import embed_scene

    side, seconds = sizes
    budget = Budget(seconds)
    model = embed_model(device, tiny)
    scene = np.random.default_rng(0).integers(0, 256, (3, side, side), dtype=np.uint8)
    rows = ["| precision | compile | tiles | seconds | tiles/s | peak GPU memory |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="xstars-gpu-check-") as folder:
        for compiled in (False, True):
            for precision in ("fp32", "bf16"):
                tag = "yes" if compiled else "no"
                if compiled and tiny:
                    rows.append(f"| {precision} | yes | skipped (--tiny) | | | n/a |")
                    continue
                if budget.over():
                    rows.append(f"| {precision} | {tag} | skipped | | | n/a |")
                    continue
                def run(name: str, p: str = precision, c: bool = compiled) -> Any:
                    return embed_scene(model, scene, "sentinel2_rgb", out=Path(folder, f"{name}.tif"),
                                       device=str(device), progress=False, resume=False, compile=c, precision=p)

                if compiled:
                    run("warm-up")  # the compilation, not timed
                reset_peak(device)
                result = run(f"{precision}{tag}")
                rows.append(f"| {precision} | {tag} | {result.tiles} | {result.seconds:.2f} | "
                            f"{result.tiles / result.seconds:.1f} | {peak_memory(device)} |")
    head = (f"## embed_scene throughput\n\n{side} x {side} px synthetic uint8 scene (numpy), sentinel2_rgb; "
            "compiled rows after one untimed call\n\n")
    return head + "\n".join(rows) + budget.note()


def run_part(device: Any, sizes: tuple, step_s: float, out: Path) -> str:
    import torch
    from bench_train import SyntheticPairs

    from xstars_models import XStars, get_sensor
    from xstars_models.training import TrainConfig, adapt

    batch, seconds = sizes
    # The step count that fills the budget at the measured step time (a fifth kept for start-up).
    steps = max(4, int(seconds * 0.8 / step_s)) if step_s > 0 else 4
    torch.manual_seed(0)
    base = XStars.new("vit_tiny_patch16_224", ["sentinel2_rgb"], patch_size=8, img_size=64)
    config = TrainConfig(steps=steps, batch_size=batch, alpha=0.1, dino_out_dim=4096, local_crops=2,
                         checkpoint_every=10**9)
    reset_peak(device)
    with tempfile.TemporaryDirectory(prefix="xstars-gpu-check-") as run:
        adapt(base, get_sensor("aerial_rgb").with_gsd(5.0, name="aerial"), SyntheticPairs(), mode="full",
              config=config, out_dir=run, device=str(device), progress=False)
        logged = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    every = max(1, len(logged) // 12)
    shown = logged[::every] + ([logged[-1]] if (len(logged) - 1) % every else [])
    rows = ["| step | loss | seconds |", "|---|---|---|"]
    rows += [f"| {m['step']} | {m['loss']:.4f} | {m['time_s']:.1f} |" for m in shown]
    plot = ""
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot([m["step"] for m in logged], [m["loss"] for m in logged])
        axis.set_xlabel("step")
        axis.set_ylabel("loss (DINO + 0.1 MSAD)")
        png = out.with_suffix(".png")
        figure.tight_layout()
        figure.savefig(png, dpi=100)
        plt.close(figure)
        plot = f"\n\n![loss curve]({png.name})"
    head = (f"## Training run: loss curve\n\n{steps} steps (planned for {seconds} s), batch {batch}, "
            f"DINO + 0.1 MSAD, peak GPU memory {peak_memory(device)}\n\n")
    return head + "\n".join(rows) + plot


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        fail("torch is not installed in this Python; install the package first (pip install -e .)")
    if importlib.util.find_spec("xstars_models") is None:
        fail("xstars_models is not importable; run `pip install -e .` (or `pip install -e . --no-deps` offline)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked but CUDA is not available here; use --device cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benches, reused
    device = torch.device(args.device)
    sizes = TINY if args.tiny else FULL
    args.out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    title = "# xstars_models device check" + (" (--tiny)" if args.tiny else "")
    sections = [title, "## Machine\n\n" + "\n".join(machine_lines(device))]
    timings: list[str] = []

    def timed_part(name: str, part: Callable[[], str]) -> None:
        print(f"gpu_check: {name}...", flush=True)
        start = time.perf_counter()
        sections.append(part())
        timings.append(f"{name} {time.perf_counter() - start:.1f} s")

    step_s = 0.0

    def train() -> str:
        nonlocal step_s
        text, step_s = train_part(device, sizes["train"])
        return text

    timed_part("MSAD", lambda: msad_part(device, sizes["msad"]))
    timed_part("embed", lambda: embed_part(device, sizes["embed"], args.tiny))
    timed_part("embed_scene", lambda: scene_part(device, sizes["scene"], args.tiny))
    timed_part("training steps", train)
    timed_part("training run", lambda: run_part(device, sizes["run"], step_s, args.out))
    sections.append(f"Wall time: {time.perf_counter() - began:.1f} s in all ({'; '.join(timings)})")
    args.out.write_text("\n\n".join(sections) + "\n")
    print(f"gpu_check: wrote {args.out}")


if __name__ == "__main__":
    main()
