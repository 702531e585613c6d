"""The strip runner: reads a scene one row of tiles (a *strip*) at a time, embeds its tiles in
batches and hands them to a writer (:class:`~.writers.StripWriter`), committing after each strip."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..inputs import dn_tensor
from .failures import add_note
from .options import SceneOptions
from .partial import Partial, Progress
from .reading import Scene
from .tiling import Plan
from .writers import StripWriter

if TYPE_CHECKING:
    from ..model import XStarsBase


def run_strips(
    encoder: XStarsBase,
    scene: Scene,
    plan: Plan,
    writer: StripWriter,
    partial: Partial | None,
    progress: Progress,
    *,
    sensor: str,
    options: SceneOptions,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    stop: int | None = None,
) -> None:
    """Embed strips ``progress.strips_done`` to ``stop`` (excluded; default: the last strip of
    ``plan``) with ``encoder`` on ``device`` (under ``autocast``), handing each batch to
    ``writer``; after each strip, commit it to ``writer`` and record it in ``partial`` (``None``:
    a run that keeps nothing on disk, e.g. into memory). ``progress`` counts what was done, also
    when interrupted.

    Uses the options ``batch_size``, ``max_nodata``, ``compile`` and ``progress``.

    After any failure (an exception, Ctrl-C) the partial output is either resumable (the data, the
    record of the strips done and the carry it names) or, when no strip was ever recorded, gone;
    an :class:`~xstars_models.errors.InputReadError` or
    :class:`~xstars_models.errors.OutputWriteError` then also says which.

    Raises:
        InputReadError: reading a strip failed (names the input's rows and the cause).
        OutputWriteError: writing a strip failed (names the cause, e.g. ENOSPC, and the file)."""
    p, (th, tw) = plan.patch_px, plan.tile_tokens
    width = plan.grid_tokens[1]
    cuda = device.type == "cuda"

    def read(i: int) -> tuple[torch.Tensor, np.ndarray]:
        strip, missing = scene.read(plan.row_starts[i] * p, th * p, width * p)
        fraction = missing.reshape(th, p, width, p).mean(axis=(1, 3), dtype=np.float32)
        pixels = dn_tensor(strip)
        # Page-locked memory lets the copy to the GPU overlap with compute.
        return (pixels.pin_memory() if cuda else pixels), fraction

    def encode(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return encoder.forward_tokens(x, sensor, [])[0]

    forward = torch.compile(encode) if options.compile else encode
    starts = plan.col_starts
    strips, per_strip = len(plan.row_starts), len(starts)
    stop = strips if stop is None else stop
    was_training = encoder.training
    encoder.eval()
    bar = tqdm(total=stop * per_strip, initial=progress.strips_done * per_strip, desc=f"embed {Path(scene.what).name}",
               unit="tile", disable=not options.progress)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
            # Read the next strip while this one is embedded.
            pending = pool.submit(read, progress.strips_done) if progress.strips_done < stop else None
            for i in range(progress.strips_done, stop):
                assert pending is not None  # submitted for every strip of the loop
                pixels, fraction = pending.result()
                pending = pool.submit(read, i + 1) if i + 1 < stop else None
                pixels = pixels.to(device, non_blocking=True)
                tile_missing = np.array([fraction[:, c : c + tw].mean() for c in starts])
                keep = [j for j, f in enumerate(tile_missing) if f <= options.max_nodata and f < 1]
                writer.begin_strip(torch.from_numpy(fraction).to(device), tile_missing)
                for b in range(0, len(keep), options.batch_size):
                    chunk = keep[b : b + options.batch_size]
                    x = torch.stack([pixels[:, :, starts[j] * p : (starts[j] + tw) * p] for j in chunk]).float()
                    if cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    writer.add(i, chunk, forward(x).float())
                    progress.embedded += len(chunk)
                    bar.update(len(chunk))
                progress.skipped += per_strip - len(keep)
                bar.update(per_strip - len(keep))
                carry = writer.commit(i)
                progress.strips_done = i + 1
                if partial is not None:
                    partial.commit(progress, carry)
    except BaseException as err:
        # Keep the strips recorded so far for a rerun, or, before the first, nothing of this run.
        if partial is not None:
            add_note(err, partial.failure_note(partial.keep_resumable(), strips))
        raise
    finally:
        bar.close()
        encoder.train(was_training)
