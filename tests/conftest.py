"""Session-wide test setup: every Hub call goes to a local in-memory Hub server.

huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HUB_OFFLINE and the cache paths once, at
import time, so the server starts and the environment is set here at module level, before any test
module imports huggingface_hub (or xstars_models, which imports it).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from hub_server import HubServer

if "huggingface_hub" in sys.modules:  # too late: the client would already point at huggingface.co
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could configure it")

TEST_TOKEN = "hf_test_token"
_SERVER = HubServer(valid_tokens={TEST_TOKEN})
_HF_HOME = tempfile.mkdtemp(prefix="xstars-hf-home-")
os.environ.update({
    "HF_ENDPOINT": _SERVER.start(),
    "HF_HUB_DISABLE_XET": "1",  # Xet uploads/downloads cannot be served locally
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_TOKEN": TEST_TOKEN,
    "HF_HOME": _HF_HOME,
    "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),
})
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("TRANSFORMERS_OFFLINE", None)
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
# precision="auto" would time each model on its first use (seconds per model and tile size) and
# depend on this host's speed; the suite runs fp32 instead, deterministically. Tests of the
# calibration delete XSTARS_PRECISION themselves. Its cache goes to a temporary folder, never
# the user's.
os.environ["XSTARS_PRECISION"] = "fp32"
os.environ["XSTARS_CACHE"] = os.path.join(_HF_HOME, "xstars-cache")
atexit.register(_SERVER.stop)


@pytest.fixture()
def hub_server() -> HubServer:
    """The session's Hub server, with its request log cleared for this test."""
    _SERVER.clear_log()
    return _SERVER


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty Hub cache for this test; returns the HF_HUB_CACHE directory.

    huggingface_hub 2.4 copies HF_HUB_CACHE into `huggingface_hub.constants` at import and reads that
    attribute (not the environment) whenever `cache_dir` is omitted, so both are pointed here; the
    environment variables are for subprocesses.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture()
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode as HF_HUB_OFFLINE=1 gives it: the client checks a constant set at import, so patch both."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def published(tmp_path, hub_server):
    """``(model, folder, repo_id, commit)``: the tiny model saved with save_pretrained and committed
    to a fresh repo on the loopback Hub, with the request log cleared."""
    import uuid

    from factories import tiny_model

    model = tiny_model()
    folder = model.save_pretrained(tmp_path / "model")
    repo_id = f"org/tiny-{uuid.uuid4().hex[:8]}"
    commit = hub_server.seed_repo(repo_id, folder)
    hub_server.clear_log()
    return model, folder, repo_id, commit


@pytest.fixture(scope="module")
def model():
    """The tiny test model (``factories.tiny_model()``), made once per test module; a module that
    needs another model defines its own ``model``."""
    from factories import tiny_model

    return tiny_model()


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    """``model`` saved with ``save_pretrained``, for the command line and subprocesses."""
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")
