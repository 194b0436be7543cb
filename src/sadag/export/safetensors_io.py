"""Save a calibrated quantized model as integer weights + quantizer states in one .safetensors file.

Layout (tensor names):
  ``w.<layer>.q``           uint8, the integer weights in [0, qmax] (same shape as the layer's weight)
  ``w.<layer>.scale``       float32 (C,), per output channel step size
  ``w.<layer>.zero_point``  uint8 (C,), per output channel integer zero point
  ``a.<quantizer>.scale`` / ``a.<quantizer>.zero_point``  float32 / uint8 scalars of each activation quantizer
  ``fp.<state_dict key>``   every other tensor the model needs (biases, BatchNorm params and buffers)
The JSON string under metadata key "sadag" holds the model name, bits, plan, QuantConfig and DataSpec.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import ConfigError, ModelError
from ..models import DataSpec, load_model
from ..quantization.modules import is_quant_layer
from ..quantization.prepare import quantize
from ..quantization.quantizers import ActQuantizer, WeightQuantizer

FORMAT = "sadag-quantized"
FORMAT_VERSION = 1
META_KEY = "sadag"


class ExportFormatError(ModelError):
    """A file that is not a sadag export, or whose tensors do not fit the model it describes."""


def sadag_version() -> str:
    try:
        return importlib_metadata.version("sadag")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def quantized_parts(qmodel: nn.Module) -> tuple[dict[str, nn.Module], dict[str, ActQuantizer]]:
    """Quantized layers and activation quantizers of a model, by module name."""
    layers = {n: m for n, m in qmodel.named_modules() if is_quant_layer(m)}
    acts = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer)}
    return layers, acts


def check_frozen(qmodel: nn.Module) -> None:
    """Soft (AdaRound) rounding is not integer: only a calibrated, frozen model can be exported."""
    soft = [n for n, m in qmodel.named_modules() if isinstance(m, WeightQuantizer) and m.mode == "soft"]
    if soft:
        raise ConfigError(f"weight quantizers of {soft[:3]} are still in soft rounding mode; "
                          f"finish calibration (reconstruct_ / freeze_) before exporting")


def _owned_keys(qmodel: nn.Module) -> set[str]:
    """state_dict keys replaced by the integer representation (weights and quantizer states)."""
    owned = set()
    for name, module in qmodel.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (WeightQuantizer, ActQuantizer)):
            owned.update(prefix + k for k in module.state_dict())
        elif is_quant_layer(module) and module.quantize_weight:
            owned.add(prefix + "weight")
    return owned


def _fp_tensors(qmodel: nn.Module) -> dict[str, Tensor]:
    owned = _owned_keys(qmodel)
    return {k: v for k, v in qmodel.state_dict().items()
            if k not in owned and isinstance(v, Tensor) and not k.endswith("_extra_state")}


def _layer_tensors(name: str, layer: nn.Module) -> dict[str, Tensor]:
    wq: WeightQuantizer = layer.weight_quantizer
    return {
        f"w.{name}.q": wq.integer_weight(layer.weight).to(torch.uint8),
        f"w.{name}.scale": wq.scale.detach().reshape(-1).float(),
        f"w.{name}.zero_point": wq.zero_point.reshape(-1).to(torch.uint8),
    }


def _act_tensors(name: str, act: ActQuantizer) -> dict[str, Tensor]:
    return {f"a.{name}.scale": act.scale.detach().reshape(()).float(),
            f"a.{name}.zero_point": act.zero_point.reshape(()).to(torch.uint8)}


def _normalise(obj: Any) -> Any:
    """JSON round trip, so tuples compare equal to the lists read back from a file."""
    return json.loads(json.dumps(obj))


def save_quantized(qmodel: nn.Module, path: str | Path, *, model_name: str, spec: DataSpec,
                   quant_config: QuantConfig, extra: dict | None = None) -> Path:
    """Write the calibrated ``qmodel`` (from quantize + reconstruct_) to ``path`` (.safetensors).

    ``model_name`` must rebuild the architecture with :func:`sadag.models.load_model`; ``quant_config``
    must be the config ``qmodel`` was quantized with. ``extra`` is stored as JSON (e.g. accuracy).
    """
    plan = getattr(qmodel, "sadag_plan", None)
    if plan is None:
        raise ConfigError("the model has no sadag_plan: export a model returned by sadag quantize()")
    if _normalise(asdict(quant_config)) != _normalise(plan.config):
        raise ConfigError(f"quant_config {asdict(quant_config)} differs from the one the model was "
                          f"quantized with {plan.config}")
    check_frozen(qmodel)
    layers, acts = quantized_parts(qmodel)
    tensors = {f"fp.{k}": v for k, v in _fp_tensors(qmodel).items()}
    layer_meta, act_meta = {}, {}
    for name, layer in layers.items():
        layer_meta[name] = {"bits": layer.weight_quantizer.bits, "quantize_weight": layer.quantize_weight}
        tensors.update(_layer_tensors(name, layer))
    for name, act in acts.items():
        act_meta[name] = {"bits": act.bits, "active": act.active, "initialized": act.ready}
        if act.bits is not None and act.ready:
            tensors.update(_act_tensors(name, act))
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sadag_version": sadag_version(),
        "model_name": model_name, "w_bits": quant_config.w_bits, "a_bits": quant_config.a_bits,
        "quant_config": asdict(quant_config), "spec": spec.to_dict(), "plan": plan.to_dict(),
        "layers": layer_meta, "act_quantizers": act_meta, "extra": extra or {},
    }
    try:
        text = json.dumps(meta)
    except TypeError as e:
        raise ConfigError(f"extra metadata must be JSON-serialisable: {e}") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
    save_file(tensors, str(path), metadata={META_KEY: text})
    return path


def read_export(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The tensors and the parsed "sadag" metadata of an export file, with format checks."""
    path = Path(path)
    if not path.is_file():
        raise ExportFormatError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise ExportFormatError(f"{path} is not a readable .safetensors file ({e})") from e
    if raw is None:
        raise ExportFormatError(f"{path} is a safetensors file but not a sadag export (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ExportFormatError(f"{path}: the sadag metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportFormatError(f"{path} is not a sadag export (metadata format {meta.get('format')!r})"
                                if isinstance(meta, dict) else f"{path}: malformed sadag metadata")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise ExportFormatError(f"{path} has format version {meta.get('format_version')!r}; this sadag reads up to "
                                f"{FORMAT_VERSION}: upgrade sadag")
    return tensors, meta


def _take(tensors: dict[str, Tensor], key: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    if key not in tensors:
        raise ExportFormatError(f"tensor {key!r} is missing from the export")
    t = tensors[key]
    if t.numel() != int(torch.Size(shape).numel()):
        raise ExportFormatError(f"tensor {key!r} has shape {tuple(t.shape)}, the model needs {tuple(shape)}")
    return t.reshape(shape)


@torch.no_grad()
def _fill_layer(name: str, layer: nn.Module, tensors: dict[str, Tensor], info: dict) -> None:
    """Hard rounding with w_floor = q - zp and alpha < 0 makes the forward reproduce q exactly."""
    wq: WeightQuantizer = layer.weight_quantizer
    if info.get("bits") != wq.bits:
        raise ExportFormatError(f"layer {name}: the file has {info.get('bits')}-bit weights, the rebuilt "
                                f"model {wq.bits}-bit")
    q = _take(tensors, f"w.{name}.q", layer.weight.shape).to(layer.weight.device, layer.weight.dtype)
    if q.numel() and q.max() > wq.qmax:
        raise ExportFormatError(f"layer {name}: integer weights exceed qmax={wq.qmax}")
    wq.scale.copy_(_take(tensors, f"w.{name}.scale", wq.scale.shape))
    wq.zero_point.copy_(_take(tensors, f"w.{name}.zero_point", wq.zero_point.shape))
    wq.w_floor.copy_(q - wq.zero_point)
    wq.alpha.fill_(-1.0)
    wq.mode = "hard"
    layer.weight.copy_((q - wq.zero_point) * wq.scale)
    layer.quantize_weight = bool(info.get("quantize_weight", True))


@torch.no_grad()
def _fill_act(name: str, act: ActQuantizer, tensors: dict[str, Tensor], info: dict) -> None:
    if info.get("bits") != act.bits:
        raise ExportFormatError(f"activation quantizer {name}: the file has bits {info.get('bits')}, "
                                f"the rebuilt model {act.bits}")
    act.active = bool(info.get("active", True))
    if act.bits is None or not info.get("initialized", False):
        return
    act.scale.copy_(_take(tensors, f"a.{name}.scale", ()))
    act.zero_point.copy_(_take(tensors, f"a.{name}.zero_point", ()))
    act.initialized.fill_(True)
    act.ready = True


@torch.no_grad()
def _fill_fp(qmodel: nn.Module, tensors: dict[str, Tensor]) -> None:
    current = _fp_tensors(qmodel)  # state_dict tensors share storage with the model
    unknown = sorted(k[3:] for k in tensors if k.startswith("fp.") and k[3:] not in current)
    if unknown:
        raise ExportFormatError(f"the export holds tensors the model does not have: {unknown[:5]}")
    for key, target in current.items():
        target.copy_(_take(tensors, f"fp.{key}", target.shape))


def _check_structure(qmodel: nn.Module, meta: dict) -> None:
    layers, acts = quantized_parts(qmodel)
    if set(layers) != set(meta.get("layers", {})) or set(acts) != set(meta.get("act_quantizers", {})):
        raise ExportFormatError(f"the quantized layers of the rebuilt {meta.get('model_name')!r} do not match "
                                f"the export: was it made from another architecture?")
    if _normalise(qmodel.sadag_plan.to_dict()) != meta.get("plan"):
        raise ExportFormatError("the rebuilt quantization plan differs from the exported one (another "
                                "architecture or sadag version?)")


def load_quantized(path: str | Path, model: nn.Module | None = None, *,
                   allow_import: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the quantized model of an export; returns (qmodel in eval mode, metadata).

    ``model``: the FP architecture to quantize (its weights are overwritten); default: the registered
    model named in the file, built without pretrained weights.
    """
    tensors, meta = read_export(path)
    try:
        spec = DataSpec.from_dict(meta["spec"])
        cfg = QuantConfig(**meta["quant_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportFormatError(f"{path}: incomplete sadag metadata ({e})") from e
    if model is None:
        model, _ = load_model(meta["model_name"], pretrained=False)
    example = torch.zeros(1, 3, spec.input_size, spec.input_size, device=next(model.parameters()).device)
    qmodel = quantize(model, cfg, example)
    _check_structure(qmodel, meta)
    layers, acts = quantized_parts(qmodel)
    for name, layer in layers.items():
        _fill_layer(name, layer, tensors, meta["layers"][name])
    for name, act in acts.items():
        _fill_act(name, act, tensors, meta["act_quantizers"][name])
    _fill_fp(qmodel, tensors)
    qmodel.sadag_spec = spec
    return qmodel.eval(), meta
