"""ONNX Runtime against PyTorch for the bundled model's CLS embedding of a batch of tiles:
PyTorch fp32 (and its int8, dynamic quantisation of the trunk's Linear layers) beside ONNX Runtime
fp32 and int8 (``quantize_dynamic``), on the CPU, with each output's cosine to PyTorch fp32.

Interleaved repeats, best kept, so that other work on a shared machine slows all alike.

    python bench/bench_onnx.py [--model xstars-s2-aerial] [--sensor sentinel2_rgb] [--batch 32]
        [--size 224] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from xstars_models import XStars


def best(runs: dict[str, Callable[[], np.ndarray]], repeats: int) -> dict[str, float]:
    times = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="xstars-s2-aerial")
    parser.add_argument("--sensor", default="sentinel2_rgb")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="tile side in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = XStars.from_pretrained(args.model, local_files_only=True)
    bands = model.sensors[args.sensor].spec.num_bands
    x = np.random.default_rng(0).integers(0, 256, (args.batch, bands, args.size, args.size)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as folder:
        sessions = {}
        for name, int8 in (("fp32", False), ("int8", True)):
            path = Path(folder, f"{name}.onnx")
            model.export_onnx(path, sensor=args.sensor, output="cls", int8=int8)
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tensor = torch.from_numpy(x)

        def torch_run(precision: str) -> Callable[[], np.ndarray]:
            return lambda: model.embed(tensor, args.sensor, batch_size=args.batch, precision=precision,
                                       progress=False).numpy()

        def ort_run(name: str) -> Callable[[], np.ndarray]:
            return lambda: sessions[name].run(None, {"digital_numbers": x})[0]

        runs = {"PyTorch fp32": torch_run("fp32"), "PyTorch int8": torch_run("int8"),
                "ONNX Runtime fp32": ort_run("fp32"), "ONNX Runtime int8": ort_run("int8")}
        reference = runs["PyTorch fp32"]()
        cosines = {name: cosine(run(), reference) for name, run in runs.items()}
        times = best(runs, args.repeats)
    print(f"{args.model}, {args.sensor}, {args.batch} tiles of {args.size} x {args.size} px, CLS, "
          f"{args.threads} threads, best of {args.repeats}, {date.today()}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}\n")
    print("| runtime | seconds | tiles/s | vs PyTorch fp32 | min CLS cosine to PyTorch fp32 |")
    print("|---|---|---|---|---|")
    base = times["PyTorch fp32"]
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {args.batch / seconds:.1f} | {base / seconds:.2f}x | {cosines[name]:.5f} |")


if __name__ == "__main__":
    main()
