"""ONNX export: one sensor's stem, its value scaling and normalisation, the trunk and one pooling
in a single graph that takes the sensor's raw digital numbers, for ONNX Runtime (QGIS plugins,
machines without PyTorch).

The graph's input ``digital_numbers`` is B x C x H x W in the sensor's digital numbers, float32 by
default or uint8/uint16 (``input_dtype``: the raster's own type, cast inside the graph, so a QGIS
plugin can hand over the bytes it read); batch, H and W are dynamic (H and W whole multiples of
the sensor's patch size; the position embeddings are interpolated inside the graph)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FileRecord
from ..encoder import pool_tokens
from ..errors import InvalidOptionError, MissingExtraError
from ..io.lock import output_lock
from ..io.outputs import refuse_existing_output
from ..model import XStarsBase
from ..serialization import atomic_write_bytes

__all__ = ["ONNX_INPUT", "ONNX_INPUT_DTYPES", "ONNX_OUTPUTS", "export_onnx"]

ONNX_INPUT = "digital_numbers"
ONNX_OUTPUTS = ("cls", "mean", "map")
ONNX_INPUT_DTYPES = ("float32", "uint8", "uint16")
# Opset 18: LayerNormalization as one node, and Resize with antialiasing (the position embeddings'
# bicubic interpolation, as timm does it); ONNX Runtime 1.20+ runs both.
DEFAULT_OPSET = 18


class _Pooled(nn.Module):
    """Digital numbers -> one ``output`` of the model, as :meth:`XStarsBase.embed` gives it at fp32."""

    def __init__(self, model: XStarsBase, sensor: str, output: str) -> None:
        super().__init__()
        self.model = model
        self.sensor = sensor
        self.output = output
        self.patch = model.sensors[sensor].patch_size
        self.prefix = int(model.trunk.num_prefix_tokens)

    def forward(self, digital_numbers: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_tokens(digital_numbers, self.sensor, indices=[])[0]
        # The grid from the input's own shape, so that the graph keeps it dynamic.
        grid = (digital_numbers.shape[-2] // self.patch, digital_numbers.shape[-1] // self.patch)
        return pool_tokens(tokens, self.output, grid, self.prefix)


def export_onnx(
    model: XStarsBase,
    path: str | Path,
    sensor: str,
    output: str = "cls",
    opset: int | None = None,
    size: int | None = None,
    int8: bool = False,
    input_dtype: str = "float32",
    overwrite: bool = False,
) -> FileRecord:
    """Write ``model`` for ``sensor`` as an ONNX file (atomically: the old file or the whole new
    one) and return its record. While it is written, ``<path>.lock`` refuses a second writer
    (:mod:`xstars_models.io.lock`).

    Args:
        path: the ``.onnx`` file to write.
        sensor: which of the model's sensors the graph takes (``model.sensors``).
        output: ``"cls"`` (B x D), ``"mean"`` of patch tokens (B x D) or ``"map"`` (B x D x h x w,
            h and w = pixels / patch size); the graph's output has that name.
        opset: ONNX opset, at least 18 (the default).
        size: side in pixels of the example image traced (default: 2 x the patch of a
            non-pretraining grid, so that the position-embedding interpolation is in the graph).
        int8: dynamically quantise the MatMul weights to int8 (ONNX Runtime's
            ``quantize_dynamic``): smaller and faster on CPUs, outputs move slightly.
        input_dtype: the input's element type: ``"float32"``, ``"uint8"`` or ``"uint16"``
            (digital numbers as the raster stores them, cast to float32 inside the graph).
        overwrite: replace ``path`` if it exists; without it an existing file is refused.

    The file's metadata properties hold the sensor, its band names, GSD (metres), units, scale,
    offset, patch size, the output, the model id and revision, and this package's version.

    Raises:
        InvalidOptionError: an unknown ``sensor``, ``output`` or ``input_dtype``, a ``path`` that is not
            ``.onnx`` or is a folder, a ``size`` that is not a multiple of the patch size, a ``path``
            that exists without ``overwrite=True``.
        OutputLockedError: (``field="path"``) another process is writing ``path``.
        MissingExtraError: ``onnx`` (or ``onnxruntime`` for ``int8``) is not installed.
    """
    stem = model.check_sensor(sensor)
    if output not in ONNX_OUTPUTS:
        raise InvalidOptionError(f"output must be one of {ONNX_OUTPUTS}, got {output!r}.", field="output")
    if input_dtype not in ONNX_INPUT_DTYPES:
        raise InvalidOptionError(
            f"input_dtype must be one of {tuple(ONNX_INPUT_DTYPES)}, got {input_dtype!r}.", field="input_dtype"
        )
    target = Path(path)
    if target.suffix != ".onnx" or target.is_dir():
        raise InvalidOptionError(f"{target}: the ONNX file name must end in .onnx.", field="path")
    patch = stem.patch_size
    side = size if size is not None else patch * (int(model.trunk.patch_embed.grid_size[0]) + 2)
    if side < patch or side % patch:
        raise InvalidOptionError(f"size {side} px is not a whole multiple of the patch size {patch}.", field="size")
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < DEFAULT_OPSET:
        raise InvalidOptionError(
            f"opset {opset} has no antialiased Resize, which the position embeddings need; use {DEFAULT_OPSET} or later.",
            field="opset",
        )
    onnx = _require("onnx")
    with output_lock(target, field="path"):
        refuse_existing_output(target, overwrite, field="path")
        return _write(model, target, sensor, output, opset, side, int8, input_dtype, onnx)


def _write(
    model: XStarsBase, target: Path, sensor: str, output: str, opset: int, side: int, int8: bool, input_dtype: str,
    onnx: Any,
) -> FileRecord:
    """Trace the graph (an example of ``side`` x ``side`` pixels) and write it to ``target``."""
    stem = model.sensors[sensor]
    # timm interpolates the position embeddings with antialiased bicubic, which the TorchScript
    # exporter has no symbolic for; it is ONNX's Resize(cubic, a=-0.5, antialias=1).
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _bicubic_aa, opset)
    example = torch.full((1, stem.spec.num_bands, side, side), 100.0)
    axes = {0: "batch", 2: "token_rows", 3: "token_columns"} if output == "map" else {0: "batch"}
    # Traced on the CPU in eval mode; the model goes back where it was, in the mode it was in.
    device, was_training = model.device, model.training
    pooled = _Pooled(model, sensor, output).cpu().eval()
    try:
        graph = _trace(pooled, example, output, axes, opset, onnx)
    finally:
        model.to(device).train(was_training)
    if input_dtype != "float32":
        _cast_input(graph, input_dtype, onnx)
    for key, value in _metadata(model, sensor, output, input_dtype).items():
        graph.metadata_props.add(key=key, value=value)
    data = graph.SerializeToString()
    if int8:
        data = _quantize(data)
    return atomic_write_bytes(target, data)


def _trace(pooled: _Pooled, example: torch.Tensor, output: str, axes: dict[int, str], opset: int, onnx: Any) -> Any:
    with tempfile.TemporaryDirectory() as folder, torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python int taken from a shape; the shapes are traced as dynamic.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch deprecates this (TorchScript) exporter for the torch.export one, which needs the
        # onnxscript package; this one runs offline on torch alone and its outputs are tested.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            pooled, (example,), Path(folder, "graph.onnx"), input_names=[ONNX_INPUT], output_names=[output],
            dynamic_axes={ONNX_INPUT: {0: "batch", 2: "height", 3: "width"}, output: axes},
            opset_version=opset, dynamo=False,
        )
        return onnx.load(Path(folder, "graph.onnx"))


def _cast_input(graph: Any, dtype: str, onnx: Any) -> None:
    """Make the traced float32 graph take ``dtype`` (uint8/uint16) and cast it to float32 first.

    Done on the ONNX graph rather than by tracing an integer example: torch's TorchScript exporter
    has no uint16 type (``ScalarType UInt16 is an unexpected tensor scalar type``)."""
    cast_name = f"{ONNX_INPUT}_float32"
    for node in graph.graph.node:
        node.input[:] = [cast_name if name == ONNX_INPUT else name for name in node.input]
    graph.graph.node.insert(0, onnx.helper.make_node("Cast", [ONNX_INPUT], [cast_name], to=onnx.TensorProto.FLOAT))
    graph.graph.input[0].type.tensor_type.elem_type = {"uint8": onnx.TensorProto.UINT8, "uint16": onnx.TensorProto.UINT16}[dtype]


def _bicubic_aa(g: Any, x: Any, output_size: Any, align_corners: Any, *scales: Any) -> Any:
    if torch.onnx.symbolic_helper._maybe_get_const(align_corners, "b"):
        raise InvalidOptionError("ONNX export of align_corners=True bicubic interpolation is not supported.", field="model")
    leading = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([0])),
                   g.op("Constant", value_t=torch.tensor([2])))
    sizes = g.op("Concat", leading, g.op("Cast", output_size, to_i=7), axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", x, empty, empty, sizes, mode_s="cubic", cubic_coeff_a_f=-0.5, antialias_i=1,
                coordinate_transformation_mode_s="half_pixel", exclude_outside_i=1)


def _metadata(model: XStarsBase, sensor: str, output: str, input_dtype: str) -> dict[str, str]:
    stem = model.sensors[sensor]
    spec = stem.spec
    try:
        version = importlib.metadata.version("xstars-models")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        version = "unknown"
    return {
        "xstars.sensor": sensor,
        "xstars.bands": json.dumps([band.name for band in spec.bands]),
        "xstars.gsd_m": repr(spec.gsd_m),
        "xstars.units": spec.units,
        "xstars.dtype": spec.dtype,
        "xstars.scale": repr(spec.scale),
        "xstars.offset": repr(spec.offset),
        "xstars.patch_size": str(stem.patch_size),
        "xstars.input": f"{ONNX_INPUT}: {input_dtype} B x C x H x W digital numbers, H and W multiples of the patch size",
        "xstars.output": output,
        "xstars.model_id": model.name_or_path or "",
        "xstars.revision": model.revision or "",
        "xstars.arch": model.arch,
        "xstars.package_version": version,
    }


def _quantize(data: bytes) -> bytes:
    quantization = _require("onnxruntime.quantization", "onnxruntime")
    with tempfile.TemporaryDirectory() as folder:
        source, quantized = Path(folder, "fp32.onnx"), Path(folder, "int8.onnx")
        source.write_bytes(data)
        # quantize_dynamic advises shape pre-processing on the root logger for every call; the
        # dynamic (weights-only) quantisation here has no use for it.
        hush = _DropFrom("onnxruntime")
        logging.getLogger().addFilter(hush)
        try:
            quantization.quantize_dynamic(source, quantized, weight_type=quantization.QuantType.QInt8)
        finally:
            logging.getLogger().removeFilter(hush)
        return quantized.read_bytes()


class _DropFrom(logging.Filter):
    """Drops the records logged from files under a folder named ``package``."""

    def __init__(self, package: str) -> None:
        super().__init__()
        self.part = package

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in Path(record.pathname).parts


def _require(module: str, package: str | None = None) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"ONNX export needs {package or module}: pip install 'xstars-models[onnx]'."
        ) from None
