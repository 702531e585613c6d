"""Runs a tiny training job in its own process: killed mid-run by the resume tests (at a random
moment, at a chosen step, or between writing a checkpoint and renaming it into place), and
launched on two ranks with torchrun by the distributed test.

usage: train_worker.py RUN_DIR STEPS [--resume] [--checkpoint-every N] [--kill-at-step S]
                       [--kill-in-save N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from factories import tiny_model  # noqa: E402
from toy_data import ToyPairs  # noqa: E402
from xstars_models.distributed import init_distributed, rank  # noqa: E402
from xstars_models.training import TrainConfig, loop, pretrain  # noqa: E402


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(step: int) -> None:
    """SIGKILL this process when step ``step`` (0-based) begins, i.e. with ``step`` steps done:
    the loop computes each step's learning rate before anything else of that step."""
    schedule = loop.warmup_cosine

    def checked(current: int, *args: float) -> float:
        if current == step:
            _sigkill()
        return schedule(current, *args)

    loop.warmup_cosine = checked


def kill_in_save(nth: int) -> None:
    """SIGKILL this process during its ``nth`` checkpoint save, after the temporary file is
    complete but before it is renamed to ``last.pt`` (what a kill mid-save leaves behind)."""
    save = loop.save_checkpoint
    calls = 0

    def saving(run_dir: Path, state: dict) -> Path:
        nonlocal calls
        calls += 1
        if calls == nth:
            os.replace = lambda *args, **kwargs: _sigkill()
        return save(run_dir, state)

    loop.save_checkpoint = saving


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    args = parser.parse_args()
    if args.kill_at_step is not None:
        kill_at_step(args.kill_at_step)
    if args.kill_in_save is not None:
        kill_in_save(args.kill_in_save)
    init_distributed()
    torch.set_num_threads(1)
    model = tiny_model(seed=0, extra_sensors=("aerial",))
    config = TrainConfig(
        steps=args.steps, batch_size=4, lr=1e-3, warmup_steps=1, dino_out_dim=64, local_crops=2,
        checkpoint_every=args.checkpoint_every, teacher_momentum=0.5,
    )
    trained = pretrain(model, ToyPairs(16), config, out_dir=args.run_dir, resume=args.resume, device="cpu", progress=False)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trained.parameters())).hexdigest()
    Path(args.run_dir, f"result-rank{rank()}.json").write_text(
        json.dumps({"digest": digest, "steps": trained.training_record["steps"], "resumed_from": trained.training_record["resumed_from"]})
    )


if __name__ == "__main__":
    main()
