"""Deployable artefacts of a calibrated quantized model: integer safetensors and ONNX QDQ."""

from .onnx_export import export_onnx, onnx_int_type, verify_onnx
from .safetensors_io import ExportFormatError, load_quantized, read_export, save_quantized

__all__ = [
    "ExportFormatError",
    "export_onnx",
    "load_quantized",
    "onnx_int_type",
    "read_export",
    "save_quantized",
    "verify_onnx",
]
