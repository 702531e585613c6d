"""``xstars export``: a model for one sensor as an ONNX file that takes the sensor's digital numbers."""

from __future__ import annotations

import argparse
from typing import Any

from ..export import ONNX_INPUT_DTYPES, ONNX_OUTPUTS
from .flags import HelpFormatter


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write a model for one sensor as an ONNX file (raw digital numbers in)",
                       formatter_class=HelpFormatter)
    p.add_argument("model", help="registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument("path", help="the .onnx file to write")
    p.add_argument("--sensor", required=True, help="the model's sensor whose digital numbers the file takes")
    p.add_argument("--output", default="cls", choices=ONNX_OUTPUTS, help="what the graph returns")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18, the least that works)")
    p.add_argument("--int8", action="store_true", help="dynamically quantise the weights to int8")
    p.add_argument("--input-dtype", default="float32", choices=ONNX_INPUT_DTYPES,
                   help="element type of the graph's input: float32, or the raster's own uint8/uint16 (cast inside)")
    p.add_argument("--overwrite", action="store_true", help="replace the .onnx file if it exists (otherwise refused)")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from ..xstars import XStars

    model = XStars.from_pretrained(args.model, local_files_only=args.offline)
    record = model.export_onnx(args.path, sensor=args.sensor, output=args.output, opset=args.opset, int8=args.int8,
                               input_dtype=args.input_dtype, overwrite=args.overwrite)
    print(f"{args.path}: {args.sensor} -> {args.output}, {record.size} bytes, sha256 {record.sha256}")
    return 0
