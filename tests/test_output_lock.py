"""One writer per output (issue 27, point 2): a run holds ``<out>.lock`` (fcntl.flock) from the first
file it touches to the final rename. A second run on the same output, in another process, fails at
once with one line naming the first (pid, host, start time); the first finishes with the output a
solo run writes. A lock file left by a killed process is taken over, and the lock file is removed
after success and after an error."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from xstars_models.cli import main
from xstars_models.errors import InvalidOptionError, OutputLockedError
from xstars_models.io import lock as lock_module
from xstars_models.io.lock import lock_path, output_lock, read_holder
from xstars_models.samples import sample_path
from xstars_models.scenes import embed_scene

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model
SAMPLE = sample_path("sentinel2_rgb_inland")  # 256 x 256 px, 3 x uint8, EPSG:32618, 10 m
# Run A: 2 strips of 2 tiles, one batch per strip.
A_OPTIONS = dict(tile=64, window=(0, 0, 128, 128), batch_size=2, progress=False, precision="fp32")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HOST = socket.gethostname()

# Run A, in its own process: embeds and, once its first strip is written and recorded, pauses in
# the middle of the output until the file ``go`` exists.
RUN_A = r"""
import os, sys, time
from pathlib import Path
from xstars_models import XStars

folder, scene, out, paused, go = sys.argv[1:6]
model = XStars.from_pretrained(folder, local_files_only=True)
forward, calls = model.forward_tokens, []

def pausing(x, *args, **kwargs):
    calls.append(len(x))
    if len(calls) == 2:  # strip 0 is in the partial output and its record
        Path(paused).write_text(str(os.getpid()))
        deadline = time.monotonic() + 300  # never left running if the test dies
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return forward(x, *args, **kwargs)

model.forward_tokens = pausing
result = model.embed_scene(scene, "sentinel2_rgb", out, tile=64, window=(0, 0, 128, 128), batch_size=2,
                           progress=False, precision="fp32")
print(result.path)
"""

# Holds the lock of an output until killed.
HOLD = r"""
import sys, time
from xstars_models.io.lock import output_lock

with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def read_map(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), src.tags()


def wait_for(path: Path, process: subprocess.Popen) -> None:
    """Until ``path`` exists; fails with the process's output if it ended first."""
    deadline = time.monotonic() + 300
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) first:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared")
        time.sleep(0.05)


def test_a_second_run_on_the_same_output_fails_at_once_and_the_first_is_intact(model, folder, tmp_path):
    out = tmp_path / "out" / "same.map.tif"
    paused, go = tmp_path / "paused", tmp_path / "go"
    run_a = subprocess.Popen(
        [sys.executable, "-c", RUN_A, str(folder), str(SAMPLE), str(out), str(paused), str(go)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(paused, run_a)
        partial = json.loads(out.with_name(out.name + ".partial.json").read_text())
        assert partial["strips_done"] == 1, "A is not in the middle of its output"
        # Run B 'with other settings and --restart', as in the issue: refused before touching anything.
        run_b = subprocess.run(
            [sys.executable, "-m", "xstars_models.cli", "embed-scene", str(folder), str(SAMPLE), "--sensor", SENSOR,
             "--out", str(out), "--overlap", "16", "--restart", "--overwrite", "--tile", "64",
             "--window", "0", "0", "128", "128", "--no-progress", "--offline"],
            env=ENV, capture_output=True, text=True, timeout=300,
        )
        assert run_b.returncode == 2, run_b.stderr
        lines = run_b.stderr.strip().splitlines()
        assert len(lines) == 1, run_b.stderr
        assert f"{out} is being written by process {run_a.pid} on host {HOST} since " in lines[0]
        assert "Traceback" not in run_b.stderr and "--out" in lines[0]
        # B left A's lock and partial run alone.
        assert read_holder(out).pid == run_a.pid
        assert json.loads(out.with_name(out.name + ".partial.json").read_text()) == partial
    finally:
        go.write_text("")
        output = run_a.communicate(timeout=300)[0]
    assert run_a.returncode == 0, output
    values, tags = read_map(out)
    solo, solo_tags = read_map(embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "solo.tif", **A_OPTIONS).path)
    np.testing.assert_allclose(values, solo, rtol=0, atol=1e-5)
    assert tags["xstars_overlap_px"] == solo_tags["xstars_overlap_px"] == "0"
    assert sorted(p.name for p in out.parent.iterdir()) == ["same.map.tif"], "a lock or partial file left"


def test_a_lock_left_by_a_killed_process_is_taken_over(model, tmp_path):
    out = tmp_path / "map.tif"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert read_holder(out).pid == holder.pid and read_holder(out).host == HOST
        with pytest.raises(OutputLockedError, match=rf"being written by process {holder.pid} on host") as info:
            embed_scene(model, SAMPLE, SENSOR, out=out, **A_OPTIONS)
        assert info.value.field == "out"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif.lock"], "the refused run wrote something"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert read_holder(out).pid == holder.pid, "the killed process's lock file is left as it was"
    result = embed_scene(model, SAMPLE, SENSOR, out=out, **A_OPTIONS)
    assert result.embedded == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif"]


def test_the_lock_file_goes_after_an_error_and_an_interruption(model, tmp_path, monkeypatch):
    out = tmp_path / "map.tif"
    with pytest.raises(InvalidOptionError) as info:
        embed_scene(model, SAMPLE, SENSOR, out=out, bounds=(0, 0, 10, 10), progress=False)
    assert info.value.field == "bounds"
    assert not lock_path(out).exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "forward_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed_scene(model, SAMPLE, SENSOR, out=out, **A_OPTIONS)
    assert not lock_path(out).exists()
    assert not out.exists()


def test_output_lock_names_its_holder_refuses_a_second_writer_and_cleans_up(tmp_path):
    out = tmp_path / "new" / "folder" / "x.tif"
    with output_lock(out) as lock:
        assert lock == lock_path(out) == out.with_name("x.tif.lock")
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == HOST
        assert holder["started"].endswith("Z") and "T" in holder["started"]
        # A second writer in this very process is refused too, and leaves the lock alone.
        with pytest.raises(OutputLockedError) as info:
            with output_lock(out, field="path"):
                pytest.fail("two holders of one lock")
        assert info.value.field == "path"
        assert str(info.value) == (
            f"{out} is being written by process {os.getpid()} on host {HOST} since {holder['started']}; "
            "wait for it to finish or choose another output path."
        )
        assert json.loads(lock.read_text()) == holder
    assert not lock.exists()

    with pytest.raises(RuntimeError, match="boom"):
        with output_lock(out):
            raise RuntimeError("boom")
    assert not lock.exists()

    # Only our own lock file is removed: one that replaced it meanwhile is another run's.
    with output_lock(out) as lock:
        lock.unlink()
        lock.write_text("someone else's")
    assert lock.read_text() == "someone else's"
    lock.unlink()


def test_a_filesystem_without_locks_warns_and_writes_unlocked(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_locks)
    out = tmp_path / "x.tif"
    with pytest.warns(UserWarning, match="file locks are not available here"):
        with output_lock(out):
            out.write_text("written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]


def test_embed_and_export_refuse_an_output_another_run_holds(folder, tmp_path, capsys):
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((3, 64, 64), np.uint8))
    out = tmp_path / "emb.npz"
    with output_lock(out):
        code = main(["embed", str(folder), str(image), "--sensor", SENSOR, "--out", str(out), "--offline"])
        err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and f"by process {os.getpid()} on host {HOST}" in err
    assert "argument --out:" in err
    assert not out.exists() and not lock_path(out).exists()
    assert main(["embed", str(folder), str(image), "--sensor", SENSOR, "--out", str(out), "--offline"]) == 0
    assert not lock_path(out).exists()

    pytest.importorskip("onnx")
    onnx_path = tmp_path / "m.onnx"
    with output_lock(onnx_path, field="path"):
        code = main(["export", str(folder), str(onnx_path), "--sensor", SENSOR, "--offline"])
        err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and f"{onnx_path} is being written by process {os.getpid()}" in err
    assert not onnx_path.exists() and not lock_path(onnx_path).exists()
