"""Exporting piip models to other runtimes: ONNX (:func:`export_onnx`)."""
from .onnx import MissingOnnxPackages, OnnxCheck, OnnxExport, OnnxExportError, export_onnx

__all__ = ["MissingOnnxPackages", "OnnxCheck", "OnnxExport", "OnnxExportError", "export_onnx"]
