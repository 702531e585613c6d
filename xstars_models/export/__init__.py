"""Exporting a model to files other runtimes load: ONNX (:func:`export_onnx`)."""

from .onnx import ONNX_INPUT, ONNX_INPUT_DTYPES, ONNX_OUTPUTS, export_onnx

__all__ = ["ONNX_INPUT", "ONNX_INPUT_DTYPES", "ONNX_OUTPUTS", "export_onnx"]
