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
import math
from dataclasses import asdict, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import ConfigError, ExportFormatError, ModelError, NumericalError
from ..files import write_atomically
from ..models import DataSpec, get_model_info, load_model
from ..models.registry import is_import_path
from ..quantization.modules import is_quant_layer
from ..quantization.prepare import quantize
from ..quantization.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    check_act_quantizers_calibrated,
    name_a_few,
    unused_input_quantizers,
)
from .registry import unwritable, writable_target

FORMAT = "sadag-quantized"
FORMAT_VERSION = 1
META_KEY = "sadag"
MAX_INPUT_SIZE = 2048  # a larger image side in a file's spec is damage, not a model: refuse before allocating
MAX_CLASSES = 1_000_000


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
    """Soft (AdaRound) rounding is not integer: only a calibrated, frozen model can be exported, and only with
    its quantization switched on (the export is labelled with the plan's bits)."""
    soft = [n for n, m in qmodel.named_modules() if isinstance(m, WeightQuantizer) and m.mode == "soft"]
    if soft:
        raise ConfigError(f"weight quantizers of {soft[:3]} are still in soft rounding mode; "
                          f"finish calibration (reconstruct_ / freeze_) before exporting")
    layers, acts = quantized_parts(qmodel)
    off = [n for n, m in layers.items() if m.weight_quantizer.bits is not None and not m.quantize_weight]
    off += [n for n, a in acts.items() if a.bits is not None and not a.active]
    if off:
        raise ConfigError(f"quantization is switched off in {name_a_few(off)}: the export would carry their bits and "
                          "run them in full precision; switch it on (sadag.quantization.prepare.set_quant_state_("
                          "model)) before exporting")
    check_act_quantizers_calibrated(qmodel, "the export")


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
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # the loader would refuse the file: never write one
        raise NumericalError(f"cannot export: {name_a_few(bad, 5)} hold NaN or "
                             "infinite values (a diverged calibration); nothing was written")
    _check_scales_to_write(tensors)
    return _write(Path(path), tensors, text)


def _check_scales_to_write(tensors: dict[str, Tensor]) -> None:
    """The loader's step-size checks, so that sadag never writes a file it would refuse."""
    bad = [k for k, v in tensors.items() if k.endswith(".scale") and not _scale_ok(v, signed=k.startswith("w."))]
    if bad:
        raise ExportFormatError(f"cannot export: {name_a_few(bad)} hold step sizes that are zero (weights) or not "
                                "positive (activations), which load_quantized refuses; re-run the calibration. "
                                "Nothing was written")


def _write(path: Path, tensors: dict[str, Tensor], text: str) -> Path:
    """Through a temporary file (safetensors before 0.8 truncates the target first): a failed write leaves an
    earlier export intact and no partial one."""
    writable_target(path)
    try:
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: text}))
    except (OSError, SafetensorError) as e:
        raise unwritable(path, e) from e
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
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser allows
        raise ExportFormatError(f"{path}: the sadag metadata is not valid JSON ({type(e).__name__}: "
                                f"{str(e)[:200]}): the file is damaged or was not made by sadag") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportFormatError(f"{path} is not a sadag export (metadata format {meta.get('format')!r})"
                                if isinstance(meta, dict) else f"{path}: malformed sadag metadata")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise ExportFormatError(f"{path} has format version {meta.get('format_version')!r}; this sadag reads up to "
                                f"{FORMAT_VERSION}: upgrade sadag")
    return tensors, meta


def _take(tensors: dict[str, Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The tensor stored under ``key``, which must have exactly this shape and dtype."""
    if key not in tensors:
        raise ExportFormatError(f"tensor {key!r} is missing from the export")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ExportFormatError(f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, the model needs {dtype} "
                                f"{tuple(shape)}: the file was modified or made for another model")
    return t


def _scale_ok(scale: Tensor, signed: bool) -> bool:
    """Step sizes must be finite and non-zero; activation ones positive. A learned weight step size can
    cross zero during reconstruction and the layer stays exact ((q - zp) * scale), so its sign is free."""
    bad = ~torch.isfinite(scale) | (scale == 0 if signed else scale <= 0)
    return not bool(bad.any())


def _check_scale(key: str, scale: Tensor, signed: bool) -> None:
    if not _scale_ok(scale, signed):
        what = "finite and non-zero" if signed else "finite and positive"
        raise ExportFormatError(f"tensor {key!r} holds step sizes that are not {what}: the file is damaged")


def _check_integers(key: str, q: Tensor, qmax: int) -> None:
    if q.numel() and int(q.max()) > qmax:
        raise ExportFormatError(f"tensor {key!r} holds values up to {int(q.max())}, above qmax={qmax} of its "
                                f"bit width")


@torch.no_grad()
def _fill_layer(name: str, layer: nn.Module, tensors: dict[str, Tensor], info: dict) -> None:
    """Hard rounding with w_floor = q - zp and alpha < 0 makes the forward reproduce q exactly."""
    wq: WeightQuantizer = layer.weight_quantizer
    if info.get("bits") != wq.bits:
        raise ExportFormatError(f"layer {name}: the file has {info.get('bits')}-bit weights, the rebuilt "
                                f"model {wq.bits}-bit")
    channels = (wq.scale.numel(),)
    q = _take(tensors, f"w.{name}.q", tuple(layer.weight.shape), torch.uint8)
    scale = _take(tensors, f"w.{name}.scale", channels, torch.float32)
    zero_point = _take(tensors, f"w.{name}.zero_point", channels, torch.uint8)
    _check_integers(f"w.{name}.q", q, wq.qmax)
    _check_integers(f"w.{name}.zero_point", zero_point, wq.qmax)
    _check_scale(f"w.{name}.scale", scale, signed=True)
    if info.get("quantize_weight", True) is not True:  # the exporter refuses to write it (check_frozen)
        raise ExportFormatError(f"layer {name} is declared {wq.bits}-bit with its quantization switched off, "
                                "which sadag never writes: the metadata was changed")
    _check_uses_its_bits(name, q, wq.bits)
    q = q.to(layer.weight.device, layer.weight.dtype)
    wq.scale.copy_(scale.reshape(wq.scale.shape))
    wq.zero_point.copy_(zero_point.reshape(wq.zero_point.shape))
    wq.w_floor.copy_(q - wq.zero_point)
    wq.alpha.fill_(-1.0)
    wq.mode = "hard"
    layer.weight.copy_((q - wq.zero_point) * wq.scale)
    layer.quantize_weight = True


def _check_uses_its_bits(name: str, q: Tensor, bits: int) -> None:
    """Clip search spreads each channel over its whole grid; integers that all fit a grid of one bit
    less mean the layer was relabelled (e.g. a 4-bit layer declared 8-bit). All equal (span 0: an all-zero or
    constant layer, which every grid holds exactly) is a genuine export."""
    span = int(q.max()) - int(q.min()) if q.numel() else 0
    if bits > 1 and 0 < span < 2 ** (bits - 1):
        raise ExportFormatError(f"layer {name} is declared {bits}-bit but its integer weights span only "
                                f"{span + 1} levels, which fit in {bits - 1} bits: the metadata was changed")


@torch.no_grad()
def _fill_act(name: str, act: ActQuantizer, tensors: dict[str, Tensor], info: dict, called: bool) -> None:
    """``called``: the forward pass runs it, so a quantizer with bits must have its step size (check_frozen)."""
    if info.get("bits") != act.bits:
        raise ExportFormatError(f"activation quantizer {name}: the file has bits {info.get('bits')}, "
                                f"the rebuilt model {act.bits}")
    if act.bits is not None and info.get("active", True) is not True:  # the exporter refuses to write it
        raise ExportFormatError(f"activation quantizer {name} is declared {act.bits}-bit and switched off, "
                                "which sadag never writes: the metadata was changed")
    if act.bits is not None and called and info.get("initialized") is not True:
        raise ExportFormatError(f"activation quantizer {name} is declared {act.bits}-bit but not initialized (no "
                                "step size), which sadag never writes: the metadata was changed")
    act.active = True
    if act.bits is None or info.get("initialized") is not True:
        return
    scale = _take(tensors, f"a.{name}.scale", (), torch.float32)
    zero_point = _take(tensors, f"a.{name}.zero_point", (), torch.uint8)
    _check_scale(f"a.{name}.scale", scale, signed=False)
    _check_integers(f"a.{name}.zero_point", zero_point, act.qmax)
    act.scale.copy_(scale)
    act.zero_point.copy_(zero_point)
    act.initialized.fill_(True)
    act.ready = True


@torch.no_grad()
def _fill_fp(qmodel: nn.Module, tensors: dict[str, Tensor]) -> None:
    current = _fp_tensors(qmodel)  # state_dict tensors share storage with the model
    for key, target in current.items():
        value = _take(tensors, f"fp.{key}", tuple(target.shape), target.dtype)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ExportFormatError(f"tensor 'fp.{key}' holds NaN or infinite values: the file is damaged")
        target.copy_(value)


def _expected_keys(qmodel: nn.Module, meta: dict) -> set[str]:
    layers, _ = quantized_parts(qmodel)
    keys = {f"fp.{k}" for k in _fp_tensors(qmodel)}
    keys.update(f"w.{n}.{part}" for n in layers for part in ("q", "scale", "zero_point"))
    keys.update(f"a.{n}.{part}" for n, info in meta["act_quantizers"].items()
                if info.get("bits") is not None and info.get("initialized") is True for part in ("scale", "zero_point"))
    return keys


def _check_structure(qmodel: nn.Module, meta: dict, tensors: dict[str, Tensor]) -> None:
    layers, acts = quantized_parts(qmodel)
    if set(layers) != set(meta.get("layers", {})) or set(acts) != set(meta.get("act_quantizers", {})):
        raise ExportFormatError(f"the quantized layers of the rebuilt {meta.get('model_name')!r} do not match "
                                f"the export: was it made from another architecture?")
    rebuilt, exported = _normalise(qmodel.sadag_plan.to_dict()), meta.get("plan")
    if rebuilt != exported:
        raise ExportFormatError(f"the rebuilt quantization plan differs from the exported one in "
                                f"{_plan_diff(rebuilt, exported)} (another architecture or sadag version?)")
    unknown = sorted(set(tensors) - _expected_keys(qmodel, meta))
    if unknown:
        raise ExportFormatError(f"the export holds tensors the model does not have: {unknown[:5]}")


def _plan_diff(rebuilt: dict, exported: object) -> str:
    """The differing fields, the first one's two values shortened."""
    exported = exported if isinstance(exported, dict) else {}
    keys = [k for k in {**rebuilt, **exported} if rebuilt.get(k) != exported.get(k)]
    first = keys[0]
    return (f"{', '.join(keys)} ({first}: rebuilt {str(rebuilt.get(first))[:150]}, file "
            f"{str(exported.get(first))[:150]})")


def _read_folded(meta: dict, path: Path) -> list[tuple[str, str]]:
    """The (conv, BatchNorm) pairs the exporter folded: the rebuilt model folds exactly these."""
    plan = meta.get("plan")
    folded = plan.get("folded") if isinstance(plan, dict) else None
    if not isinstance(folded, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in folded):
        raise ExportFormatError(f"{path}: malformed plan in the metadata (plan.folded must be a list of [conv, "
                                f"BatchNorm] name pairs, got {str(folded)[:150]})")
    return [(c, b) for c, b in folded]


def _int_in(x: object, low: int, high: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high


def _three_floats_in(x: object, low: float, high: float) -> bool:
    return isinstance(x, list) and len(x) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high for v in x)


def _read_spec(raw: object, path: Path) -> DataSpec:
    """The file's DataSpec, every field in a sane range before anything is allocated from it."""
    d = raw if isinstance(raw, dict) else {}
    checks = {
        "input_size": _int_in(d.get("input_size"), 1, MAX_INPUT_SIZE),
        "num_classes": _int_in(d.get("num_classes"), 1, MAX_CLASSES),
        "mean": _three_floats_in(d.get("mean"), -1e3, 1e3),
        "std": _three_floats_in(d.get("std"), 1e-6, 1e3),
        "resize": d.get("resize") is None or _int_in(d.get("resize"), 1, 4 * MAX_INPUT_SIZE),
    }
    bad = [f"{k}={d.get(k)!r}" for k, ok in checks.items() if not ok]
    if bad:
        raise ExportFormatError(f"{path}: the metadata's input spec is out of range ({', '.join(bad)}; input_size "
                                f"must be in 1..{MAX_INPUT_SIZE}): the file is damaged or was not made by sadag")
    return DataSpec.from_dict(d)


def _quant_types_ok(raw: dict) -> bool:
    units, p = raw.get("units"), raw.get("clip_search_p", 2.4)
    return (raw.get("act_grid", "affine") in ("affine", "symmetric")
            and all(isinstance(raw.get(k, True), bool) for k in ("first_last_8bit", "fold_bn"))
            and isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p > 0
            and (units is None or isinstance(units, list) and all(isinstance(u, str) for u in units)))


def _read_quant_config(raw: object, meta: dict, path: Path) -> QuantConfig:
    names = {f.name for f in fields(QuantConfig)}
    if not isinstance(raw, dict) or not set(raw) <= names or not _quant_types_ok(raw):
        raise ExportFormatError(f"{path}: malformed quant_config in the metadata ({raw!r})")
    cfg = QuantConfig(**raw)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ExportFormatError(f"{path}: invalid quant_config in the metadata: {e}") from e
    if (meta.get("w_bits"), meta.get("a_bits")) != (cfg.w_bits, cfg.a_bits):
        raise ExportFormatError(f"{path}: the metadata's bits W{meta.get('w_bits')}A{meta.get('a_bits')} differ "
                                f"from its quant_config W{cfg.w_bits}A{cfg.a_bits}: the file was modified")
    return cfg


def _architecture(meta: dict, path: Path, allow_import: bool, spec: DataSpec) -> tuple[nn.Module, DataSpec | None]:
    """The FP model a file names: a registered zoo model, or a module:factory only with ``allow_import``."""
    name = meta.get("model_name")
    if not isinstance(name, str):
        raise ExportFormatError(f"{path}: the metadata names no model")
    if is_import_path(name):
        if not allow_import:
            raise ExportFormatError(
                f"{path} names the model {name!r}, a Python module:function: rebuilding it would import that "
                f"module and run that function, i.e. run code chosen by whoever wrote the file. Pass the FP "
                f"architecture yourself (load_quantized(path, model=...)), or allow_import=True "
                f"(--allow-import) only if you trust the file and that module")
        return load_model(name, pretrained=False, spec=spec)[0], None  # the file's spec: the factory may have none
    try:
        info = get_model_info(name)
    except ModelError as e:
        raise ExportFormatError(f"{path} names the model {name!r}, which is not in sadag's model zoo (sadag "
                                f"models lists them); pass the architecture with model=") from e
    return load_model(name, pretrained=False)[0], info.spec


def _check_spec_fits(spec: DataSpec, expected: DataSpec | None, path: Path) -> None:
    if expected is not None and (spec.input_size, spec.num_classes) != (expected.input_size, expected.num_classes):
        raise ExportFormatError(f"{path}: the metadata says {spec.input_size}x{spec.input_size} inputs and "
                                f"{spec.num_classes} classes, the model {expected.input_size}x{expected.input_size} "
                                f"and {expected.num_classes}: the file was modified or made for another model")


def load_quantized(path: str | Path, model: nn.Module | None = None, *,
                   allow_import: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the quantized model of an export; returns (qmodel in eval mode, metadata).

    ``model``: the FP architecture to quantize; it is deep-copied and left unchanged (its weights do not
    matter: the file's replace them in the copy); default: the registered model named in the file, built
    without pretrained weights. A file naming a ``module:factory`` model needs ``model`` or
    ``allow_import=True``: importing it runs that module's code.

    Before the model is built, the metadata is checked (input spec ranges, bits, quantization config, folded
    pairs); the model is then quantized with the file's folded BatchNorm pairs, its plan must equal the file's,
    and every tensor is checked against it before it is copied in (exact shapes and dtypes, integers within
    each layer's bit width, finite non-zero scales, initialised activation quantizers, finite FP tensors).
    """
    path = Path(path)
    tensors, meta = read_export(path)
    spec = _read_spec(meta.get("spec"), path)
    cfg = _read_quant_config(meta.get("quant_config"), meta, path)
    sections = [meta.get("layers"), meta.get("act_quantizers")]
    if not all(isinstance(x, dict) and all(isinstance(v, dict) for v in x.values()) for x in sections):
        raise ExportFormatError(f"{path}: incomplete sadag metadata (no layers / act_quantizers)")
    if model is None:
        model, expected = _architecture(meta, path, allow_import, spec)
    else:
        expected = getattr(model, "sadag_spec", None)
    _check_spec_fits(spec, expected, path)
    example = torch.zeros(1, 3, spec.input_size, spec.input_size, device=next(model.parameters()).device)
    try:
        qmodel = quantize(model, cfg, example, folded=_read_folded(meta, path))
    except ConfigError as e:  # e.g. its folded pairs or units do not fit the model
        raise ExportFormatError(f"{path}: cannot rebuild the quantized model the file describes: {e}") from e
    _check_structure(qmodel, meta, tensors)
    layers, acts = quantized_parts(qmodel)
    for name, layer in layers.items():
        _fill_layer(name, layer, tensors, meta["layers"][name])
    skip = unused_input_quantizers(qmodel)
    for name, act in acts.items():
        _fill_act(name, act, tensors, meta["act_quantizers"][name], called=name not in skip)
    _fill_fp(qmodel, tensors)
    qmodel.sadag_spec = spec
    return qmodel.eval(), meta
