"""Fixtures for tests against a failing loopback Hub (import them into a test module)."""

from __future__ import annotations

import time
import types

import pytest


@pytest.fixture()
def faults(hub_server):
    """The loopback Hub, its injected faults removed after the test."""
    yield hub_server
    hub_server.clear_faults()


@pytest.fixture()
def fast_client(monkeypatch):
    """The Hub client's retry back-off without the waiting (the sleeps are recorded in the list
    returned), and 0.5 s timeouts instead of 10 s and 60 s, so a failing server fails a test in
    seconds."""
    from huggingface_hub import constants, file_download
    from huggingface_hub.utils import _http

    sleeps: list[float] = []
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = sleeps.append
    monkeypatch.setattr(_http, "time", fake_time)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.setattr(file_download, "_ETAG_RETRY_TIMEOUT", 0.5)
    return sleeps
