"""The export-format registry: a new format is one writer and one registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sadag.config import QuantConfig
from sadag.errors import ConfigError
from sadag.export import export_model, get_exporter, list_exporters, register_exporter
from sadag.quantization.prepare import quantize


def write_bit_widths(qmodel: nn.Module, path: Path, *, indent: int | None = None) -> Path:
    """A tiny format: each layer's (weight bits, input activation bits) as JSON."""
    path.write_text(json.dumps(qmodel.sadag_plan.layer_bits, indent=indent))
    return path


def test_a_new_format_is_one_writer_and_one_registration(tiny_net: nn.Module, tmp_path: Path) -> None:
    register_exporter("bitwidths", write_bit_widths, suffix=".bits.json", description="layer bit widths")
    qmodel = quantize(tiny_net, QuantConfig(w_bits=3, a_bits=4), torch.zeros(1, 3, 16, 16))
    out = export_model(qmodel, tmp_path / "model.bits.json", indent=1)  # format from the suffix
    assert json.loads(out.read_text())["fc"] == [8, 8] and json.loads(out.read_text())["block.conv2"] == [3, 4]
    assert export_model(qmodel, tmp_path / "other.txt", "bitwidths").is_file()
    assert "bitwidths" in [e.name for e in list_exporters()] and get_exporter("bitwidths").suffix == ".bits.json"
    with pytest.raises(ConfigError, match="its options are: indent"):
        export_model(qmodel, tmp_path / "x.bits.json", opset=3)
    with pytest.raises(ValueError, match="registered twice"):
        register_exporter("bitwidths", write_bit_widths, suffix=".json")


def test_builtin_formats_and_unknown_names(tiny_net: nn.Module, tmp_path: Path) -> None:
    assert {"onnx", "safetensors"} <= {e.name for e in list_exporters()}
    with pytest.raises(ConfigError, match="unknown export format 'tflite'; valid formats: .*onnx"):
        export_model(tiny_net, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ConfigError, match="cannot tell the export format from 'm.tflite'"):
        export_model(tiny_net, tmp_path / "m.tflite")
    with pytest.raises(ConfigError, match="'safetensors'.*missing a required argument: 'model_name'"):
        export_model(tiny_net, tmp_path / "m.safetensors")
