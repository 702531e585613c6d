"""The ``xstars`` command: a thin layer over the public API that turns errors into one-line
messages and a non-zero exit code. One module per group of subcommands; each adds its parsers
with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import XStarsError, api_setting
from . import archive, embedding, evaluating, exporting, models, publishing, search, training
from .flags import HelpFormatter

__all__ = ["build_parser", "main"]

EPILOG = """\
units: GSD in metres, wavelengths in micrometres, footprints in metres on the ground; imagery is
read as the sensor's digital numbers (uint8 for the *_rgb sensors, uint16 reflectance x 1e4 for
sentinel2).

examples:
  xstars list
  xstars info xstars-s2-aerial
  xstars download xstars-s2-aerial --to ./weights
  xstars verify ./weights
  xstars embed xstars-s2-aerial --sensor sentinel2_rgb scene1.tif scene2.png --out emb.npz --output map
  xstars embed-scene xstars-s2-aerial --sensor sentinel2_rgb scene.tif --out scene.map.tif
  xstars adapt xstars-s2-aerial --sensor spot67_rgb --new spot.tif --old s2.tif --out ./xstars-s2-spot
  xstars push ./xstars-s2-spot org/xstars-s2-spot
  xstars convert checkpoint.pth --arch vit_small --sensor sentinel2_rgb ./converted
  xstars eval xstars-s2-aerial --task landcover
  xstars export xstars-s2-aerial --sensor sentinel2_rgb --output cls s2.onnx

Run `xstars COMMAND --help` for each command's options.
"""

# What the API raises on purpose (XStarsError), and the builtins that mean bad input or an unusable
# environment rather than a bug: a bad value, a file that cannot be read or written, training on NaN
# pixels. Anything else (a torch RuntimeError, a stray KeyError or TypeError) is a bug and keeps its
# traceback.
USER_ERRORS = (XStarsError, ValueError, OSError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xstars",
        description="Pretrained X-STARS cross-sensor remote-sensing encoders.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__, help="print the package's version")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (models, embedding, archive, search, training, publishing, evaluating, exporting):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    try:
        return args.func(args)
    except Exception as err:
        message = _user_message(err, _command_flags(parser, args))
        if message is None:
            raise
        print(f"xstars {args.command}: error: {message}", file=sys.stderr)
        return 2


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line's arguments. A command whose positional list may be empty (``sources`` of
    ``embed-collection``, named by its parser's ``intermixed`` default) also takes list items after
    its options, as ``cp``-style commands do: argparse binds an empty ``nargs="*"`` list at the first
    positional and would refuse those later ones, and its ``parse_intermixed_args`` cannot be
    used with subcommands."""
    args, extra = parser.parse_known_args(argv)
    name = getattr(args, "intermixed", None)
    if name is not None:
        getattr(args, name).extend(item for item in extra if not item.startswith("-"))
        extra = [item for item in extra if item.startswith("-")]
    if extra:
        _command(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand ``args`` are for."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]


def _command_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Callable[[str, Any], str]:
    """How this command names an API setting: the flag that sets it (``--tile 256``, ``--restart``
    for ``resume=False``), or the keyword itself when the command has no such flag."""
    overrides: dict[tuple[str, Any], str] = dict(getattr(args, "setting_flags", {}))
    if hasattr(args, "offline"):
        overrides["local_files_only", True] = "--offline"
    by_dest = {a.dest: a for a in _command(parser, args)._actions if a.option_strings}

    def flag(name: str, value: Any) -> str:
        try:
            override = overrides.get((name, value))
        except TypeError:  # an unhashable value (a list of bounds) is never one of the overrides
            override = None
        if override is not None:
            return override
        action = by_dest.get(name)
        if action is None:
            return api_setting(name, value)
        option = max(action.option_strings, key=len)
        if action.nargs == 0:  # an on/off flag: given for its own value, left out for the other
            return option if value in (None, action.const) else f"no {option}"
        return f"{option} {value}"

    return flag


def _user_message(err: Exception, flag: Callable[[str, Any], str]) -> str | None:
    """The whole message of a user-facing error, naming settings by this command's flags, led by
    ``argument --flag:`` for the option at fault when the message does not name it; ``None`` for a
    bug."""
    from ..hub import NETWORK_ERRORS, describe_network_failure

    if isinstance(err, NETWORK_ERRORS) and not isinstance(err, USER_ERRORS):
        # A network failure the API did not turn into HubServerError: still one line, no traceback.
        return f"the Hub request failed: {describe_network_failure(err)}"
    if not (isinstance(err, USER_ERRORS) or _missing_dependency(err)):
        return None
    if not isinstance(err, XStarsError):
        return str(err) or type(err).__name__
    text = err.describe(flag) or type(err).__name__
    if err.field is not None:
        option = flag(err.field, None).split(" ")[0]
        if option.startswith("--") and option not in text:
            text = f"argument {option}: {text}"
    return text


def _missing_dependency(err: Exception) -> bool:
    """An optional third-party package that is not installed (the user's environment), as opposed
    to an import inside this package that fails (a bug)."""
    if not isinstance(err, ModuleNotFoundError) or not err.name:
        return False
    return err.name.split(".")[0] != __name__.split(".")[0]
