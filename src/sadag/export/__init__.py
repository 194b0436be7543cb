"""Deployable artefacts of a calibrated quantized model: a registry of formats (integer safetensors, ONNX QDQ)."""

from .onnx_export import export_onnx, onnx_int_type, verify_onnx
from .registry import Exporter, export_model, get_exporter, infer_exporter, list_exporters, register_exporter
from .safetensors_io import ExportFormatError, load_quantized, read_export, save_quantized

register_exporter("safetensors", save_quantized, suffix=".safetensors",
                  description="integer weights and quantizer parameters; sadag.export.load_quantized reads it")
register_exporter("onnx", export_onnx, suffix=".onnx", description="QDQ ONNX model for onnxruntime")

__all__ = [
    "ExportFormatError",
    "Exporter",
    "export_model",
    "export_onnx",
    "get_exporter",
    "infer_exporter",
    "list_exporters",
    "load_quantized",
    "onnx_int_type",
    "read_export",
    "register_exporter",
    "save_quantized",
    "verify_onnx",
]
