"""What the xstars command says about itself: --version, each option's default in --help, and one
--device flag (with one default) wherever a command computes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch

import xstars_models
from xstars_models.cli import build_parser, main
from xstars_models.cli.flags import chosen_device, shows_default
from xstars_models.devices import DEVICE_AUTO
from xstars_models.errors import InvalidOptionError
from xstars_models.samples import load_sample, sample_path

SENSOR = "sentinel2_rgb"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_prints_the_package_version(capsys):
    proc = subprocess.run([sys.executable, "-m", "xstars_models.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == xstars_models.__version__
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == xstars_models.__version__


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_help_shows_the_default_of_every_option_that_has_one(command):
    parser = subcommands()[command]
    text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
    shown = 0
    for action in parser._actions:
        if not shows_default(action):
            continue  # nothing to show: an on/off flag, or an option whose help says what happens without it
        # What the shared formatter appends, or the same written into the help by hand.
        stated = f"default {action.default}" in " ".join((action.help or "").split())
        assert stated or f"(default: {action.default})" in text, f"{command} {action.option_strings}: no default shown"
        shown += 1
    if command in ("embed", "embed-scene", "adapt", "eval", "export", "push", "convert"):
        assert shown > 0  # these commands have options with defaults: the check above ran


def test_every_device_flag_has_one_default_and_embed_has_one():
    with_device = {name: p for name, p in subcommands().items() if any(a.dest == "device" for a in p._actions)}
    assert {"embed", "embed-scene", "adapt"} <= set(with_device)
    for name, parser in with_device.items():
        action = next(a for a in parser._actions if a.dest == "device")
        assert action.default == DEVICE_AUTO, name
        assert "(default: auto)" in " ".join(parser.format_help().split()), name


def test_auto_means_cuda_when_there_is_one_else_cpu(monkeypatch):
    args = argparse.Namespace(device="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert chosen_device(args) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert chosen_device(args) == torch.device("cuda")
    assert chosen_device(argparse.Namespace(device="cpu")) == torch.device("cpu")


def test_embed_runs_on_the_device_given(model, folder, tmp_path):
    out = tmp_path / "emb.npy"
    argv = ["embed", str(folder), "--sensor", SENSOR, str(sample_path("sentinel2_rgb_coast")), "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    expected = model.embed(load_sample("sentinel2_rgb_coast"), SENSOR, progress=False)[0].numpy()
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)


@pytest.mark.parametrize("device, message", [
    ("cuda:99", "cuda:99"),  # no machine here has 100 GPUs, and most none
    ("gpu-please", "is not a device: use 'cpu', 'cuda', 'cuda:N'"),
])
def test_a_bad_device_is_the_typed_error_named_by_its_flag(folder, tmp_path, capsys, device, message):
    out = tmp_path / "emb.npy"
    argv = ["embed", str(folder), "--sensor", SENSOR, str(sample_path("sentinel2_rgb_coast")), "--out", str(out),
            "--device", device]
    args = build_parser().parse_args(argv)
    with pytest.raises(InvalidOptionError) as info:
        args.func(args)
    assert info.value.field == "device" and message in str(info.value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars embed: error: ") and "--device" in err and err.count("\n") == 1
    assert not out.exists()
