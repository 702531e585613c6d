"""The one training loop: optimiser, schedules, teacher EMA, gradient sync across processes,
atomic checkpoints with resume, JSON-lines metrics, progress bar, and a hard stop on a
non-finite loss. What a step computes is the recipe's business (:mod:`.recipes`)."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..distributed import is_distributed, rank, world_size
from ..errors import user_stacklevel
from ..model import XStarsBase
from ..precision import Precision, resolve_precision
from ..serialization import atomic_write_bytes, state_dict_mismatch
from .checkpoint import (
    CheckpointExistsError,
    ResumeMismatchError,
    check_resume_config,
    checkpoint_path,
    load_checkpoint,
    remove_partial_saves,
    save_checkpoint,
)
from .config import TrainConfig
from .schedules import cosine, ema_initial_weight, warmup_cosine

__all__ = ["train_loop"]

StepFn = Callable[[dict[str, Any], int], tuple[torch.Tensor, dict[str, float]]]


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        # Biases, norms, tokens and temperatures are not decayed (as in DINO/CLIP).
        (no_decay if param.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _sync_gradients(params: list[nn.Parameter]) -> None:
    """Average gradients over processes with one all-reduce. Done by hand rather than with
    DistributedDataParallel because a step runs the student several times (global, local and
    paired views of several sensors), which DDP's one-forward-per-backward contract forbids."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _broadcast_state(module: nn.Module) -> None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def _monitor_postfix(scalars: dict[str, float]) -> dict[str, str]:
    """The collapse monitors the recipes log, for the progress bar (the rank only on the steps
    that compute it)."""
    names = {"teacher_entropy": "H_t", "cls_spread": "spread", "rank": "rank"}
    return {short: f"{scalars[key]:.3g}" for key, short in names.items() if key in scalars}


@torch.no_grad()
def _ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    # Frozen parameters are skipped: t * m + t * (1 - m) is not bit-exact, and frozen weights
    # (the trunk when only a stem is adapted) must stay exactly the base model's.
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        if s.requires_grad:
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def _warn_if_teacher_lags(config: TrainConfig, has_teacher: bool) -> None:
    """The recipes return the EMA teacher, which DINO's momentum (0.996 -> 1, tuned for
    hundreds of epochs) keeps close to its initial weights in a short run."""
    momentum = config.dino.teacher_momentum
    kept = ema_initial_weight(config.steps, momentum)
    if has_teacher and kept > 0.5:
        warnings.warn(
            f"dino.teacher_momentum={momentum} over {config.steps} steps: the returned EMA teacher "
            f"keeps {kept:.0%} of its initial weights. For a short run lower dino.teacher_momentum "
            "(e.g. 0.9 for a few hundred steps) or train for more steps.",
            stacklevel=user_stacklevel(),
        )


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random streams a step draws from (dropout, drop-path): the CPU's, and the device's
    when training on CUDA."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(checkpoint: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(checkpoint["rng"])
    # A CUDA run resumed on the CPU (or the reverse) cannot repeat its random draws anyway.
    if device.type == "cuda" and "cuda_rng" in checkpoint:
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)


def _resume_state(modules: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: dict[str, Any], path: Path) -> None:
    """Load the checkpoint's weights and optimizer state, or say why they do not fit."""
    report = state_dict_mismatch(modules.state_dict(), checkpoint["modules"], given_label="checkpoint")
    if report:
        raise ResumeMismatchError(
            "\n".join([
                f"Cannot resume from {path}: it holds the weights of another model:",
                *report,
                "Resume with the model (architecture, sensors, adapt mode) the run started with, "
                "or start a new run in another folder.",
            ])
        )
    modules.load_state_dict(checkpoint["modules"])
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as err:  # torch's words for parameter groups of other sizes
        raise ResumeMismatchError(
            f"Cannot resume from {path}: its optimizer state covers other trainable parameters than "
            f"this run's ({err}). Resume with the settings (e.g. adapt mode) the run started with, "
            "or start a new run in another folder."
        ) from err


def _keep_metrics_until(path: Path, step: int) -> tuple[dict[str, Any], float]:
    """Drop the lines of ``metrics.jsonl`` past ``step``: the steps after the last checkpoint
    are about to run again. A line cut short by a kill is dropped too. Returns the record of
    ``step`` (without its time), so that a resumed run's summary starts from it: a run resumed
    at its last step runs nothing and must still report its final scalars and monitors; and the
    training seconds up to ``step``, from which a resumed run's clock continues."""
    if not path.is_file():
        return {}, 0.0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    if len(kept) < len(lines):
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
    last = json.loads(kept[-1]) if kept else {}
    if last.get("step") != step:
        return {}, 0.0
    return {k: v for k, v in last.items() if k != "time_s"}, float(last.get("time_s", 0.0))


def _training_precision(modules: nn.Module, precision: str, device: torch.device) -> Precision:
    """``precision`` for training on ``device``: ``"auto"`` times a training step (forward and
    backward) of the trained model among ``modules`` at fp32 and bf16, as inference does."""
    trained = next((m for m in modules.modules() if isinstance(m, XStarsBase)
                    and any(p.requires_grad for p in m.parameters())), None)
    if trained is None:  # nothing of ours to time: the CPU's features decide
        return resolve_precision(precision, device, training=True)
    if not is_distributed():
        return trained.resolve_precision(precision, device, training=True)
    # Each rank would time itself and ranks could disagree; all must run the same arithmetic, so
    # rank 0 decides for all.
    decided = [trained.resolve_precision(precision, device, training=True) if rank() == 0 else None]
    torch.distributed.broadcast_object_list(decided, src=0)
    return cast(Precision, decided[0])


def train_loop(
    modules: nn.ModuleDict,
    ema_pairs: list[tuple[nn.Module, nn.Module]],
    step_fn: StepFn,
    batches: Callable[[int], Iterable[dict[str, Any]]],
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | None = None,
    last_layer_params: list[nn.Parameter] | None = None,
) -> dict[str, Any]:
    """Train ``modules`` for ``config.steps`` steps.

    Args:
        modules: everything whose state a checkpoint must hold; its parameters with
            ``requires_grad`` are optimised.
        ema_pairs: (teacher, student) modules; the teacher follows the student by EMA.
        step_fn: ``(batch, step) -> (loss, scalars to log)``.
        batches: ``start_step -> iterable of batches`` for steps ``start_step .. steps - 1``.
        run_dir: where ``last.pt`` and ``metrics.jsonl`` live.
        resume: continue from ``run_dir/last.pt`` if it exists. Without it, an existing
            checkpoint is an error rather than being silently overwritten. Only the settings in
            :data:`~.checkpoint.RESUMABLE_CHANGES` may differ from the checkpoint's (``steps``
            only upward). Steps logged past the checkpoint are dropped from ``metrics.jsonl``,
            and temporary files of a save that never finished are deleted.
        last_layer_params: parameters frozen for ``config.optim.freeze_last_layer_steps`` steps.
        device: where ``modules`` and the batches live (default: the CPU).

    Returns:
        A summary: steps run, final logged scalars, wall time, and whether it resumed.

    Raises:
        FloatingPointError: the loss became NaN or infinite (the last checkpoint is kept).
        CheckpointExistsError: ``run_dir`` holds a checkpoint and ``resume`` is off (a
            ``FileExistsError``).
        ResumeMismatchError: the checkpoint was written with other settings or another model.
        CheckpointUnreadableError: ``last.pt`` is truncated, corrupt or not a checkpoint.
    """
    device = device or torch.device("cpu")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _warn_if_teacher_lags(config, bool(ema_pairs))
    optim = config.optim
    optimizer = torch.optim.AdamW(_param_groups(modules, optim.weight_decay), lr=optim.lr)
    is_main = rank() == 0
    start = 0
    path = checkpoint_path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None and not resume:
        raise CheckpointExistsError(
            f"{run_dir} already holds a checkpoint at step {checkpoint['step']}; pass {{resume}} "
            "to continue it, or choose a new output folder.",
            field="resume", settings={"resume": True},
        )
    if checkpoint is not None:
        start = int(checkpoint["step"])
        check_resume_config(checkpoint["config"], config, start, path)
        _resume_state(modules, optimizer, checkpoint, path)
        _restore_rng(checkpoint, device)
    saved_at = start if checkpoint is not None else None
    if is_distributed():
        _broadcast_state(modules)
    params = [p for p in modules.parameters() if p.requires_grad]
    precision = _training_precision(modules, config.precision, device)
    metrics_path = run_dir / "metrics.jsonl"
    logged: dict[str, float] = {}
    earlier_s = 0.0
    if is_main:
        remove_partial_saves(run_dir)
        logged, earlier_s = _keep_metrics_until(metrics_path, start)
    metrics_file = metrics_path.open("a", encoding="utf-8") if is_main else None
    # Times (metrics' time_s, the summary's wall_time_s) count training seconds since step 0,
    # across resumed sessions, up to the last checkpoint each one resumed from.
    began = time.perf_counter() - earlier_s
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not (progress and is_main))
    try:
        for step, batch in zip(range(start, config.steps), batches(start)):
            lr = warmup_cosine(step, config.steps, optim.lr, optim.min_lr, optim.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with precision.autocast():
                loss, scalars = step_fn(batch, step)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                kept = (
                    f"The last good checkpoint (step {saved_at}) is {path}."
                    if saved_at is not None
                    else f"There is no checkpoint to resume from (none was written in {run_dir} before this step)."
                )
                raise FloatingPointError(
                    f"The training loss became {loss_value} at step {step} ({scalars}); stopping. {kept} "
                    f"Lower the learning rate (now {lr:.2e}) or check the inputs for extreme values."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if is_distributed():
                _sync_gradients(params)
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            if last_layer_params and step < optim.freeze_last_layer_steps:
                for p in last_layer_params:
                    p.grad = None
            optimizer.step()
            momentum = cosine(step, config.steps, config.dino.teacher_momentum, 1.0)
            for teacher, student in ema_pairs:
                _ema(teacher, student, momentum)
            logged = {"step": step + 1, "loss": loss_value, "lr": lr, "momentum": momentum, **scalars}
            if metrics_file is not None:
                metrics_file.write(json.dumps({**logged, "time_s": round(time.perf_counter() - began, 3)}) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", **_monitor_postfix(scalars))
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                if is_main:
                    save_checkpoint(
                        run_dir,
                        {
                            "step": step + 1,
                            "modules": modules.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            **_rng_state(device),
                            "config": config.to_dict(),
                        },
                    )
                saved_at = step + 1
                if is_distributed():
                    dist.barrier()
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return {
        "steps": config.steps,
        "resumed_from": start,
        "final": logged,
        "wall_time_s": round(time.perf_counter() - began, 1),
        "precision": str(precision),
    }
