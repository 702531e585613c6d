"""MSAD: one batched (N x B x B) computation vs the official per-position loop (one projection and
one loss per token), same inputs and heads; forward + backward time and value difference.

    python bench/bench_msad.py [--device cpu|cuda] [--batch 64] [--tokens 197] [--dim 384]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from xstars_models.losses import MSADLoss


def per_position_loop(loss: MSADLoss, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """The official code's structure (with its defects fixed): a Python loop over positions."""
    tau = loss.temperature
    values = []
    for i in range(z_a.shape[1]):
        e_a = loss.sensor_heads["a"](loss.shared(z_a[:, i]))
        e_b = loss.sensor_heads["b"](loss.shared(z_b[:, i]))
        if loss.normalize:
            e_a, e_b = F.normalize(e_a, dim=-1), F.normalize(e_b, dim=-1)
        logits = e_b @ e_a.T / tau
        targets = F.softmax((e_a @ e_a.T + e_b @ e_b.T) / 2 / tau, dim=-1)
        targets = (1 - loss.label_smoothing) * targets + loss.label_smoothing / len(targets)
        ce_b = (-targets * F.log_softmax(logits, dim=-1)).sum(1).mean()
        ce_a = (-targets.T * F.log_softmax(logits.T, dim=-1)).sum(1).mean()
        values.append((ce_a + ce_b) / 2)
    return torch.stack(values).mean()


def timed(fn, z_a, z_b, repeats: int, device: torch.device) -> tuple[float, float]:
    def once() -> float:
        a, b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value = fn(a, b)
        value.backward()
        return float(value.detach())

    value = once()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return value, (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    z_a = torch.randn(args.batch, args.tokens, args.dim, device=device)
    z_b = torch.randn(args.batch, args.tokens, args.dim, device=device)
    print(f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"B={args.batch}, N={args.tokens}, D={args.dim}, fwd+bwd, mean of {args.repeats}\n")
    print("| setting | batched ms | per-position loop ms | speed-up | value difference |")
    print("|---|---|---|---|---|")
    for name, loss in (
        ("default (L2, learnable tau)", MSADLoss(args.dim, ["a", "b"])),
        ("reference (official)", MSADLoss.reference(args.dim, ["a", "b"])),
    ):
        loss = loss.to(device).eval()
        batched_value, batched_ms = timed(lambda a, b: loss(a, b, "a", "b"), z_a, z_b, args.repeats, device)
        loop_value, loop_ms = timed(lambda a, b: per_position_loop(loss, a, b), z_a, z_b, args.repeats, device)
        print(f"| {name} | {batched_ms:.1f} | {loop_ms:.1f} | {loop_ms / batched_ms:.2f}x | "
              f"{abs(batched_value - loop_value):.2e} |")


if __name__ == "__main__":
    main()
