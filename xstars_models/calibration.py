"""What ``precision="auto"`` measures on a CPU: the model's own forward (or training step) timed
at fp32 and bf16 (int8 too where it runs, for the record only), once per machine and workload,
and the verdict kept in a small JSON cache.

Why measure rather than read CPU flags: whether bf16 pays depends on more than one feature bit.
The flag rule ("bf16 only with AMX-BF16") held on this project's 2-core Xeon VM (bf16 autocast
0.67x of fp32 on a 2000 px scene when the VM exposed no AMX; 1.54x once it did), but on an AMD
EPYC with AVX512-BF16 and no AMX bf16 ran 1.81x *faster*, and the rule kept fp32 there. So the
first ``"auto"`` run for a given key (device, CPU model and flags, torch version, architecture,
embedding width, tokens per tile, inference or training) times a few repetitions of the forward
after a warm-up, on a batch like the one that will run (at most 8 images; 0.4 s for the bundled
model on that VM), bounded to a few seconds; bf16 is picked only when at least
:data:`~.precision.BF16_MIN_SPEEDUP` times faster than fp32, since its outputs move a little.

The cache lives in ``$XSTARS_CACHE/precision.json`` (default: ``$XDG_CACHE_HOME/xstars_models``
or ``~/.cache/xstars_models``). It is written atomically; a file that cannot be read or parsed
is not trusted: the key is measured again (with a warning) and the file rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .encoder import XStarsEncoder
from .errors import BackendUnavailableError
from .precision import BF16_MIN_SPEEDUP, cpu_flags, cpu_info, decide, inference_copy
from .serialization import atomic_write_bytes

__all__ = ["CACHE_ENV", "cache_path", "calibrate", "calibration_key", "model_runs", "time_runs"]

logger = logging.getLogger(__name__)

CACHE_ENV = "XSTARS_CACHE"
CACHE_VERSION = 1
# Calibration budget: a warm-up of each variant, then up to REPEATS timed rounds, fewer where the
# warm-up shows that they would take more than BUDGET_S seconds (one round at least).
REPEATS = 3
BUDGET_S = 3.0

# The clock the calibration reads; a module attribute so that tests can fake it.
clock: Callable[[], float] = time.perf_counter


def cache_path() -> Path:
    """``$XSTARS_CACHE/precision.json``, else ``$XDG_CACHE_HOME/xstars_models/precision.json``,
    else ``~/.cache/xstars_models/precision.json``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "precision.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "xstars_models" / "precision.json"


def _cpu_model() -> str:
    names = ("model name", "Model", "CPU part")
    found = next((value for key, value in cpu_info().items() if key in names), None)
    return found if found is not None else platform.processor() or platform.machine()


def calibration_key(device: torch.device, arch: str, embed_dim: int, tokens: int, training: bool) -> str:
    """The cache key: device type and index, CPU model and a hash of its flags, torch version,
    architecture and embedding width, tokens per tile, and inference or training."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    where = device.type if device.index is None else f"{device.type}:{device.index}"
    threads = torch.get_num_threads()
    parts = [where, _cpu_model(), f"flags {flags}", f"{threads} threads", f"torch {torch.__version__}",
             arch, f"dim {embed_dim}", f"{tokens} tokens", "train" if training else "infer"]
    return " | ".join(parts)


def time_runs(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best seconds of each run: one warm-up each, then as many timed rounds (the runs taken in
    turn, so that other load slows all alike) as fit in :data:`BUDGET_S` by the warm-up's
    duration, at least one and at most :data:`REPEATS`."""
    started = clock()
    for run in runs.values():
        run()
    warm_up = clock() - started
    rounds = max(1, min(REPEATS, int(BUDGET_S / max(warm_up, 1e-9))))
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = clock()
            run()
            best[name] = min(best[name], clock() - start)
    return best


def model_runs(
    model: XStarsEncoder, device: torch.device, tokens: int, batch: int, training: bool,
) -> dict[str, Callable[[], object]]:
    """One batch of ``model`` at fp32 and bf16 (and int8 for inference on a CPU whose torch has
    the kernels), each as it would really run (inference: :func:`~.precision.inference_copy`
    under its autocast), on random digital numbers of its primary sensor, ``tokens`` tokens per
    image: a forward, or for ``training`` a forward and the gradients of its trainable weights
    (``autograd.grad``, so no ``.grad`` is touched). Run in eval mode, with a private random
    generator."""
    stem = model.check_sensor(model.primary_sensor)
    side = max(1, round(tokens**0.5)) * stem.patch_size
    x = torch.rand(batch, len(stem.spec.bands), side, side, generator=torch.Generator().manual_seed(0)).to(device)
    # The input takes part in the gradients too: when only another sensor's stem trains (adapt in
    # stem mode), no trainable weight is on this path, and the backward through the trunk is still
    # what a step costs.
    x.requires_grad_(training)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]

    def run(encoder: XStarsEncoder, dtype: torch.dtype | None) -> Callable[[], object]:
        def once() -> object:
            autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            was_training = encoder.training
            encoder.eval()
            try:
                with autocast, torch.set_grad_enabled(training):
                    out = encoder.forward_tokens(x, encoder.primary_sensor, [])[0]
                    if training:  # other sensors' stems take no part: their gradients are None
                        return torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
                    return out
            finally:
                encoder.train(was_training)

        return once

    if training:  # training keeps fp32 weights under autocast: that is what a bf16 step runs
        return {"fp32": run(model, None), "bf16": run(model, torch.bfloat16)}
    runs = {"fp32": run(model, None), "bf16": run(inference_copy(model, "bf16"), torch.bfloat16)}
    if device.type == "cpu":
        with contextlib.suppress(BackendUnavailableError):  # int8 is only reported: skip it where it cannot run
            runs["int8"] = run(inference_copy(model, "int8"), None)
    return runs


def _read_cache(path: Path) -> dict[str, Any] | None:
    """The cache's entries; ``{}`` when there is no file, ``None`` when it cannot be trusted."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.warn(f"Unreadable precision cache {path} ({err}); measuring again.", stacklevel=3)
        return None
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
    if not isinstance(entries, dict):
        warnings.warn(f"Precision cache {path} is not in the expected format; measuring again.", stacklevel=3)
        return None
    return entries


def _valid(entry: Any) -> bool:
    return (isinstance(entry, dict) and entry.get("choice") in ("fp32", "bf16")
            and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0 for k in ("fp32", "bf16")))


def calibrate(key: str, make_runs: Callable[[], dict[str, Callable[[], object]]]) -> tuple[str, str]:
    """The precision to run for ``key`` (``"fp32"`` or ``"bf16"``) and why: from the cache, or
    measured with the runs that ``make_runs()`` returns (``"fp32"``, ``"bf16"`` and optionally
    ``"int8"``: each one batch; made only when measuring, as an int8 copy costs a model copy) and
    then cached.

    Returns:
        ``(name, reason)``, e.g. ``("bf16", "measured: bf16 1.80x fp32 ...")``.
    """
    path = cache_path()
    entries = _read_cache(path)
    entry = None if entries is None else entries.get(key)
    if entry is not None and not _valid(entry):
        warnings.warn(f"Precision cache {path} has a malformed entry for this machine; measuring again.", stacklevel=2)
        entry = None
    if entry is not None:
        name, summary = decide(entry)
        return name, f"cached: {summary} (measured {entry.get('measured_at', '?')}; {path})"
    started = clock()
    seconds = time_runs(make_runs())
    name, summary = decide(seconds)
    entry = {**seconds, "choice": name, "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    entries = {} if entries is None else entries  # an untrusted file is replaced, not merged
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1).encode())
    except OSError as err:
        warnings.warn(f"Could not save the precision measurement to {path} ({err}); it will be measured again.",
                      stacklevel=2)
    logger.info("precision calibration (%s) took %.1f s: %s", key, clock() - started, summary)
    return name, f"measured: {summary} (bf16 needs >= {BF16_MIN_SPEEDUP}x)"
