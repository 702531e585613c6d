"""The random streams of a training run. Every random draw of a run comes from its
``TrainConfig.seed``: the initial weights of what the run creates (a new stem, the DINO and MSAD
heads, LoRA updates, the iBOT mask token) and the draws of its steps (iBOT masks, dropout,
drop-path), so the same settings on the same data give the same files, bit for bit. The draws
happen in a private copy of torch's global streams (the CPU's, and the training GPU's): the
caller's own random state is the same after a run as before it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["seed_streams", "seeded", "step_seed"]


def _gpu_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def seed_streams(seed: int, device: torch.device) -> None:
    """Seed torch's global CPU stream and ``device``'s (CUDA or MPS) with ``seed``; the streams of
    other GPUs are left alone (``torch.manual_seed`` would seed them all)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[_gpu_index(device)].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def step_seed(seed: int, rank: int) -> int:
    """The seed of the steps' draws on process ``rank``: a stream of its own, apart from the one
    the initial weights came from, and different on every process (each draws its own masks)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0])


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Within the block, torch's global CPU stream and ``device``'s start from ``seed``; on
    leaving (also through an exception), both are back where the caller had them."""
    cpu = torch.get_rng_state()
    gpu: torch.Tensor | None = None
    if device.type == "cuda":
        gpu = torch.cuda.get_rng_state(_gpu_index(device))
    elif device.type == "mps":
        gpu = torch.mps.get_rng_state()
    try:
        seed_streams(seed, device)
        yield
    finally:
        torch.set_rng_state(cpu)
        if device.type == "cuda" and gpu is not None:
            torch.cuda.set_rng_state(gpu, _gpu_index(device))
        elif device.type == "mps" and gpu is not None:
            torch.mps.set_rng_state(gpu)
