"""MSAD: the batched (N x B x B) loss of ``xstars_models`` vs a per-position loop shaped like the
official code (one projection and one loss per token), on the same inputs and heads: forward +
backward time and value difference, as a markdown table. bf16 autocast on CUDA (the projection
heads; both versions keep the B x B part in float32).

    python bench/bench_msad.py [--device cpu|cuda] [--batch 64] [--tokens 197] [--dim 384] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from xstars_models.losses import MSADLoss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_position_loop(loss: MSADLoss, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """The official structure, with its defects 1 and 3 fixed (the per-token losses keep their
    autograd history; targets divided by tau): a Python loop over the token positions."""
    tau = loss.temperature
    values = []
    for i in range(z_a.shape[1]):
        e_a = loss.sensor_heads["a"](loss.shared(z_a[:, i]))
        e_b = loss.sensor_heads["b"](loss.shared(z_b[:, i]))
        with torch.autocast(z_a.device.type, enabled=False):
            e_a, e_b = e_a.float(), e_b.float()
            if loss.normalize:
                e_a, e_b = F.normalize(e_a, dim=-1), F.normalize(e_b, dim=-1)
            logits = e_b @ e_a.T / tau
            targets = F.softmax((e_a @ e_a.T + e_b @ e_b.T) / 2 / tau, dim=-1)
            ce_b = F.cross_entropy(logits, targets, label_smoothing=loss.label_smoothing)
            ce_a = F.cross_entropy(logits.T, targets.T, label_smoothing=loss.label_smoothing)
        values.append((ce_a + ce_b) / 2)
    return torch.stack(values).mean()


def timed(fn: LossFn, z_a: torch.Tensor, z_b: torch.Tensor, repeats: int) -> tuple[float, list[float]]:
    """Loss value and the wall-clock ms of each of ``repeats`` forward + backward passes, after
    one warm-up pass."""
    device = z_a.device

    def once() -> float:
        a, b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value = fn(a, b)
        value.backward()
        return float(value.detach())

    value = once()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()  # float() of the loss synchronises, but the backward pass does not
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return value, times


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=197, help="tokens per image, CLS included")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    z_a = torch.randn(args.batch, args.tokens, args.dim, device=device)
    z_b = torch.randn(args.batch, args.tokens, args.dim, device=device)
    print(f"{machine(device)}; torch {torch.__version__}; B={args.batch}, N={args.tokens}, D={args.dim}; "
          f"forward + backward, mean of {args.repeats} after one warm-up"
          f"{'; bf16 autocast' if device.type == 'cuda' else ''}\n")
    print("| setting | batched ms | per-position loop ms | speed-up | loss | value difference |")
    print("|---|---|---|---|---|---|")
    settings = (
        ("default (L2, learnable tau 0.1, width 256)", MSADLoss(args.dim, ["a", "b"])),
        ("reference (tau 1, no L2, smoothing 0.3, width 1024)", MSADLoss.reference(args.dim, ["a", "b"])),
    )
    for name, loss in settings:
        loss = loss.to(device).eval()  # no dropout: both versions see the same projections
        value, batched_ms = timed(lambda a, b: loss(a, b, "a", "b"), z_a, z_b, args.repeats)
        loop_value, loop_ms = timed(lambda a, b: per_position_loop(loss, a, b), z_a, z_b, args.repeats)
        fast, slow = statistics.mean(batched_ms), statistics.mean(loop_ms)
        print(f"| {name} | {fast:.1f} | {slow:.1f} | {slow / fast:.2f}x | {value:.3f} | {abs(value - loop_value):.1e} |")


if __name__ == "__main__":
    main()
