"""Files the package writes: permissions from the umask, and a failed write (file size limit,
standing in for a full disk) that names the file and leaves nothing half-written."""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys

import numpy as np
import pytest

from factories import tiny_model
from xstars_models.publish import write_manifest_entry
from xstars_models.samples import sample_path
from xstars_models.serialization import atomic_write_bytes


@pytest.fixture()
def umask():
    """Set a umask for the test and restore the previous one."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_models_manifests_and_embeddings_respect_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    folder = tiny_model(extra_sensors=("aerial",)).save_pretrained(tmp_path / "model")
    for name in ("config.json", "model.safetensors", "stem-aerial.safetensors"):
        assert mode(folder / name) == expected, name
    manifest = tmp_path / "manifest.json"
    entry = {"arch": "vit_tiny_patch16_224", "sensors": ["sentinel2_rgb"], "source": {"bundled": "x"},
             "files": {"config.json": {"sha256": "0" * 64, "size": 1}}, "license": "MIT"}
    write_manifest_entry(manifest, "m", entry)
    assert mode(manifest) == expected
    out = tmp_path / "emb.npz"
    from xstars_models.cli import main

    assert main(["embed", str(folder), "--sensor", "sentinel2_rgb", str(sample_path("sentinel2_rgb_coast")),
                 "--out", str(out)]) == 0
    assert mode(out) == expected
    assert not list(tmp_path.rglob("*.tmp"))


def test_replacing_a_file_gives_the_new_file_the_umask_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    path.chmod(0o600)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o644


def _limit_file_size() -> None:
    # Python ignores SIGXFSZ, so writing past the limit fails with EFBIG, as a full disk fails with ENOSPC.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path):
    folder = tiny_model(extra_sensors=()).save_pretrained(tmp_path / "model")
    out = tmp_path / "emb.npy"
    out.write_bytes(b"previous result")
    image = tmp_path / "big.npy"
    np.save(image, np.zeros((256, 256, 3), np.uint8))  # created before the limit applies
    argv = [sys.executable, "-m", "xstars_models.cli", "embed", str(folder), "--sensor", "sentinel2_rgb",
            str(image), "--out", str(out), "--output", "patch", "--overwrite"]  # 1024 tokens x 32 floats = 128 KiB
    proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"xstars embed: error: [Errno {27}] {out}: File too large; nothing was written" in proc.stderr
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy", "emb.npy", "model"]
