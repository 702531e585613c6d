"""The ``xstars`` command: a thin layer over the public API that turns errors into one-line
messages and a non-zero exit code. One module per group of subcommands; each adds its parsers
with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import embedding, evaluating, models, publishing, training

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

Run `xstars COMMAND --help` for each command's options.
"""

# What the API raises for bad input or an unusable environment; anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError, KeyError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xstars",
        description="Pretrained X-STARS cross-sensor remote-sensing encoders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (models, embedding, training, publishing, evaluating):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        message = text.splitlines()[0] if text else type(err).__name__
        print(f"xstars {args.command}: error: {message}", file=sys.stderr)
        return 2
