"""Runs a tiny training job in its own process: killed mid-run by the resume test, and launched
on two ranks with torchrun by the distributed test.

usage: train_worker.py RUN_DIR STEPS [--resume] [--recipe pretrain|adapt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from factories import tiny_model  # noqa: E402
from toy_data import ToyPairs  # noqa: E402
from xstars_models.distributed import init_distributed, rank  # noqa: E402
from xstars_models.training import TrainConfig, pretrain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=2)
    args = parser.parse_args()
    init_distributed()
    torch.set_num_threads(1)
    model = tiny_model(seed=0, extra_sensors=("aerial",))
    config = TrainConfig(
        steps=args.steps, batch_size=4, lr=1e-3, warmup_steps=1, dino_out_dim=64, local_crops=2,
        checkpoint_every=args.checkpoint_every,
    )
    trained = pretrain(model, ToyPairs(16), config, out_dir=args.run_dir, resume=args.resume, device="cpu", progress=False)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trained.parameters())).hexdigest()
    Path(args.run_dir, f"result-rank{rank()}.json").write_text(
        json.dumps({"digest": digest, "steps": trained.training_record["steps"], "resumed_from": trained.training_record["resumed_from"]})
    )


if __name__ == "__main__":
    main()
