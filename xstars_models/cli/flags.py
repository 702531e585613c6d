"""What every ``xstars`` subcommand shares: the help layout (epilogs as written, each option's
default after its help) and the ``--device`` flag with its one default."""

from __future__ import annotations

import argparse

import torch

from ..devices import DEVICE_AUTO, check_device

__all__ = ["HelpFormatter", "add_device_flag", "chosen_device", "shows_default"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and epilogs as written (their examples keep their lines), and ``(default:
    X)`` after the help of each option that has a default. Left out where there is none to show:
    on/off flags (``--overwrite``, ``--no-progress``: the flag's name says what it changes),
    options that default to nothing (``None`` or ``""``: their help says what happens then, often
    as ``default: ...``) and help that already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not shows_default(action) or "default" in text:
            return text
        return super()._get_help_string(action)


def shows_default(action: argparse.Action) -> bool:
    """Whether ``action`` has a default worth showing in its help (see :class:`HelpFormatter`)."""
    on_off = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
    return not on_off and action.default not in (None, "", argparse.SUPPRESS)


def add_device_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, where: str = "") -> None:
    """Add ``--device`` (default :data:`DEVICE_AUTO`) to ``parser``; ``where`` completes its help
    (e.g. ``" on each worker"``)."""
    parser.add_argument(
        "--device", default=DEVICE_AUTO, metavar="DEVICE",
        help=f"where to compute{where}: cpu, cuda, cuda:N (a GPU's index, from 0), mps, or auto: cuda when "
             "this machine has a CUDA GPU, else cpu",
    )


def chosen_device(args: argparse.Namespace) -> torch.device:
    """The device ``--device`` names, ``auto`` resolved, checked before any work.

    Raises:
        InvalidOptionError: (``field="device"``, which the command names ``--device``) a device
            this machine lacks or a name that is no device; the message says what to use instead.
    """
    return check_device(args.device)
