"""ONNX QDQ export of a calibrated quantized model, and its check against PyTorch with onnxruntime.

How: an export-time copy of the model replaces every weight / activation quantizer with a placeholder
autograd.Function whose ``symbolic`` emits a ``sadag::QWeight`` / ``sadag::QAct`` node; after the
TorchScript export those nodes are rewritten into integer initializers + DequantizeLinear (weights,
per output channel) and QuantizeLinear -> DequantizeLinear (activations, per tensor). The integer
tensors come from our own tables, never from torch's constant folding, so they are exact.

Types: 8-bit grids use UINT8, 4-bit UINT4 (opset >= 21), 2-bit UINT2 (opset >= 25); any other width
uses a UINT8 container holding [0, qmax], with a float Clip to the grid's range before QuantizeLinear
so that saturation happens where PyTorch's clamp does.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..files import write_atomically
from ..models import DataSpec
from ..quantization.quantizers import ActQuantizer, WeightQuantizer
from .registry import unwritable, writable_target
from .safetensors_io import ExportFormatError, check_frozen, quantized_parts

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 13, 25
ONNX_MIN_VERSION = "1.20"  # the first onnx with opset 25 and UINT2; pyproject's floor
TORCH_MAX_OPSET = 20  # the TorchScript exporter's newest opset; the graph is re-stamped afterwards
DOMAIN = "sadag"


@dataclass
class _QTensor:
    """One quantizer as the graph will hold it: integer grid [0, qmax], scale and zero point."""

    name: str
    bits: int
    scale: np.ndarray  # float32, (C,) for weights, () for activations
    zero_point: np.ndarray  # integer values, same shape as scale
    q: np.ndarray | None = None  # integer weights; None for activations


def onnx_int_type(bits: int, opset: int, *, activation: bool = False) -> int:
    """The ONNX element type holding a ``bits``-bit unsigned grid at ``opset`` (UINT8 as the container).
    UINT2 for weights only: onnxruntime's optimizer moves an activation's DequantizeLinear past ops such as
    the shortcut's Slice, which have no UINT2 kernel (a W2A2 ResNet-20 would not load)."""
    import onnx

    if bits == 4 and opset >= 21:
        return onnx.TensorProto.UINT4
    if bits == 2 and opset >= 25 and not activation:
        return onnx.TensorProto.UINT2
    return onnx.TensorProto.UINT8


class _Placeholder(torch.autograd.Function):
    """Identity in PyTorch; in the exported graph a custom node (QWeight or QAct) rewritten into QDQ later."""

    @staticmethod
    def forward(ctx, x: Tensor, op: str, index: int) -> Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g, x, op: str, index: int):
        out = g.op(f"{DOMAIN}::{op}", x, index_i=index)
        out.setType(x.type())
        return out


class _ExportWeightQuantizer(WeightQuantizer):
    sadag_onnx_index: int | None = None  # None: the layer keeps FP weights
    get_extra_state = nn.Module.get_extra_state  # the tracer only accepts tensor state

    def forward(self, weight: Tensor) -> Tensor:
        return weight if self.sadag_onnx_index is None else _Placeholder.apply(weight, "QWeight", self.sadag_onnx_index)


class _ExportActQuantizer(ActQuantizer):
    sadag_onnx_index: int | None = None  # None: the identity (FP input, inactive or uninitialised)
    get_extra_state = nn.Module.get_extra_state

    def forward(self, x: Tensor) -> Tensor:
        return x if self.sadag_onnx_index is None else _Placeholder.apply(x, "QAct", self.sadag_onnx_index)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@torch.no_grad()
def _export_copy(qmodel: nn.Module) -> tuple[nn.Module, list[_QTensor], list[_QTensor]]:
    """A CPU copy whose quantizers are placeholders, with the tables the placeholders index."""
    model = copy.deepcopy(qmodel).cpu().eval()
    layers, acts = quantized_parts(model)
    weights: list[_QTensor] = []
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        wq.__class__ = _ExportWeightQuantizer
        if not layer.quantize_weight:
            continue
        weights.append(_QTensor(name, wq.bits, _np(wq.scale).reshape(-1).astype(np.float32),
                                _np(wq.zero_point).reshape(-1), _np(wq.integer_weight(layer.weight))))
        wq.sadag_onnx_index = len(weights) - 1
    activations: list[_QTensor] = []
    for name, act in acts.items():
        act.__class__ = _ExportActQuantizer
        if act.bits is None or not act.active or not act.ready:
            continue  # the identity in PyTorch too
        activations.append(_QTensor(name, act.bits, _np(act.scale).reshape(()).astype(np.float32),
                                    _np(act.zero_point).reshape(())))
        act.sadag_onnx_index = len(activations) - 1
    return model, weights, activations


_WHY_TORCHSCRIPT = ("sadag keeps torch.onnx's TorchScript exporter (dynamo=False) on purpose: its placeholders "
                    "are autograd.Functions with a `symbolic`, which the dynamo exporter cannot lower without "
                    "onnxscript (see docs/method.md, section 5)")
_logged: set[str] = set()


def _torch_export(model: nn.Module, spec: DataSpec, opset: int) -> bytes:
    example = torch.zeros(1, 3, spec.input_size, spec.input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _export_graph(model, example, buf, opset)
    for w in caught:  # the deprecation notice and constant-folding notes: known, not for the user to act on
        _log_once(f"{w.category.__name__}: {str(w.message).splitlines()[0]}")
    return buf.getvalue()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.debug("torch.onnx.export warned %r; %s", message, _WHY_TORCHSCRIPT)


def _export_graph(model: nn.Module, example: Tensor, buf: io.BytesIO, opset: int) -> None:
    torch.onnx.export(
        model, (example,), buf, dynamo=False, opset_version=min(opset, TORCH_MAX_OPSET),
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, custom_opsets={DOMAIN: 1},
    )


class _Lowering:
    """Rewrites the placeholder nodes into standard QDQ nodes, creating each initializer once."""

    def __init__(self, weights: list[_QTensor], acts: list[_QTensor], opset: int) -> None:
        self.weights, self.acts, self.opset = weights, acts, opset
        self.initializers: list[onnx.TensorProto] = []
        self.made: set[str] = set()

    def _init(self, name: str, array: np.ndarray, dtype: int | None = None) -> str:
        from onnx import helper, numpy_helper

        if name not in self.made:
            if dtype is not None:  # integer grids: numpy's ml_dtypes type packs 4-/2-bit values
                array = np.asarray(array).astype(np.uint8).astype(helper.tensor_dtype_to_np_dtype(dtype))
            self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
            self.made.add(name)
        return name

    def weight(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        from onnx import helper

        qt = self.weights[_index(node)]
        dtype = onnx_int_type(qt.bits, self.opset)
        inputs = [self._init(f"{qt.name}.weight_quantized", qt.q, dtype),
                  self._init(f"{qt.name}.weight_scale", qt.scale),
                  self._init(f"{qt.name}.weight_zero_point", qt.zero_point, dtype)]
        return [helper.make_node("DequantizeLinear", inputs, [node.output[0]], name=f"{qt.name}.weight_dq", axis=0)]

    def act(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        from onnx import TensorProto, helper

        qt = self.acts[_index(node)]
        dtype = onnx_int_type(qt.bits, self.opset, activation=True)
        x, out, nodes = node.input[0], node.output[0], []
        scale = self._init(f"{qt.name}.scale", qt.scale)
        zp = self._init(f"{qt.name}.zero_point", qt.zero_point, dtype)
        if dtype == TensorProto.UINT8 and qt.bits != 8:  # container wider than the grid: saturate first
            lo, hi = [np.float32((v - qt.zero_point) * qt.scale) for v in (0, 2**qt.bits - 1)]
            bounds = [self._init(f"{qt.name}.clip_min", lo), self._init(f"{qt.name}.clip_max", hi)]
            nodes.append(helper.make_node("Clip", [x, *bounds], [f"{out}_clipped"], name=f"{out}_clip"))
            x = f"{out}_clipped"
        nodes.append(helper.make_node("QuantizeLinear", [x, scale, zp], [f"{out}_q"], name=f"{out}_quantize"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{out}_q", scale, zp], [out], name=f"{out}_dequantize"))
        return nodes


def _index(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "index")


def _unfuse_clips(graph: onnx.GraphProto, low_bit: set[str]) -> list[onnx.NodeProto]:
    """Clip -> QuantizeLinear with a 4/2-bit zero point crashes onnxruntime's ClipQuantFusion (1.32):
    write such a Clip (e.g. ReLU6) as Max -> Min, which means the same and matches no fusion."""
    from onnx import helper

    feeds_low_bit = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[2] in low_bit}
    nodes = []
    for node in graph.node:
        if node.op_type != "Clip" or node.output[0] not in feeds_low_bit:
            nodes.append(node)
            continue
        x, lo, hi = (list(node.input) + ["", ""])[:3]
        if lo:
            out = f"{node.output[0]}_max" if hi else node.output[0]
            nodes.append(helper.make_node("Max", [x, lo], [out], name=f"{node.name}_max"))
            x = out
        if hi:
            nodes.append(helper.make_node("Min", [x, hi], [node.output[0]], name=f"{node.name}_min"))
        if not lo and not hi:
            nodes.append(helper.make_node("Identity", [x], [node.output[0]], name=node.name))
    return nodes


def _lower(model: onnx.ModelProto, weights: list[_QTensor], acts: list[_QTensor], opset: int) -> onnx.ModelProto:
    """Replace placeholders, drop the FP weights they consumed, re-stamp opset and IR version."""
    from onnx import TensorProto, helper

    lowering = _Lowering(weights, acts, opset)
    nodes = []
    for node in model.graph.node:
        if node.domain == DOMAIN:
            nodes.extend(lowering.weight(node) if node.op_type == "QWeight" else lowering.act(node))
        else:
            nodes.append(node)
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    low_bit = {t.name for t in lowering.initializers if t.data_type in (TensorProto.UINT4, TensorProto.UINT2)}
    nodes = _unfuse_clips(graph, low_bit)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used and t.name not in lowering.made]
    del graph.initializer[:]
    graph.initializer.extend(kept + lowering.initializers)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    return model


def export_onnx(qmodel: nn.Module, path: str | Path, spec: DataSpec | None = None, *, opset: int = 21) -> Path:
    """Write ``qmodel`` (calibrated, frozen) as an ONNX QDQ model with a dynamic batch dimension.

    Input ``input`` (N, 3, S, S) normalised as ``spec`` says (default: the spec ``load_model`` attached to
    the model); output ``logits``. ``opset`` 21 gives UINT4 for 4-bit grids, 25 also UINT2 for 2-bit grids;
    other widths use a UINT8 container.
    """
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"ONNX opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    _check_onnx_version(onnx)
    spec = spec or getattr(qmodel, "sadag_spec", None)
    if spec is None:
        raise ConfigError("export_onnx needs the model's DataSpec: pass spec=..., or load the model with "
                          "sadag.load_model, which attaches it")
    check_frozen(qmodel)
    path = Path(path)
    writable_target(path)
    model, weights, acts = _export_copy(qmodel)
    proto = _lower(onnx.load_from_string(_torch_export(model, spec, opset)), weights, acts, opset)
    onnx.checker.check_model(proto, full_check=True)
    try:
        write_atomically(Path(path), lambda tmp: onnx.save_model(proto, tmp))
    except OSError as e:
        raise unwritable(path, e) from e
    log.info("exported %d quantized weights and %d activation quantizers to %s (opset %d)",
             len(weights), len(acts), path, opset)
    return path


def _check_onnx_version(onnx: ModuleType) -> None:
    """An older onnx (installed around pyproject's floor) lacks UINT2: say so, not an AttributeError mid-export."""
    if onnx.defs.onnx_opset_version() < MAX_OPSET or not hasattr(onnx.TensorProto, "UINT2"):
        raise ConfigError(f"sadag's ONNX export needs onnx>={ONNX_MIN_VERSION} (opset {MAX_OPSET}, UINT2); found "
                          f"onnx {onnx.__version__}: pip install -U 'onnx>={ONNX_MIN_VERSION}'")


def _onnx_logits(path: str | Path, images: Tensor, batch_size: int) -> Tensor:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise ExportFormatError(f"onnxruntime cannot load {path}: {e}") from e
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: _np(b).astype(np.float32)})[0] for b in images.split(batch_size)]
    return torch.from_numpy(np.concatenate(outs))


@torch.no_grad()
def _torch_logits(qmodel: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    device = next(qmodel.parameters()).device
    qmodel.eval()
    return torch.cat([qmodel(b.to(device)).float().cpu() for b in images.split(batch_size)])


def verify_onnx(path: str | Path, qmodel: nn.Module, images: Tensor, labels: Tensor | None = None,
                *, batch_size: int = 256) -> dict:
    """Compare onnxruntime (CPU) with the PyTorch fake-quantized model on ``images``.

    Returns max / mean absolute logit difference, top-1 agreement, the fraction of images whose logits
    match to 1e-5 (relative, for logits above 1) and, with ``labels``, the top-1 accuracy of both. PyTorch's
    and onnxruntime's convs round differently in the last bit, which can push a value across a rounding tie of the next
    quantizer: a few images then differ by one grid step somewhere, never the whole output.
    """
    ours = _torch_logits(qmodel, images, batch_size)
    theirs = _onnx_logits(path, images, batch_size)
    diff = (ours - theirs).abs()
    pred_t, pred_o = ours.argmax(1), theirs.argmax(1)
    report = {
        "num_images": len(images),
        "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.numel() else 0.0,
        "top1_agreement": float((pred_t == pred_o).float().mean()),
        # images whose logits all agree to 1e-5 (relative to the image's largest logit where that exceeds 1): the
        # rest met a rounding tie that went the other way
        "matching_images": float((diff.amax(1) <= 1e-5 * ours.abs().amax(1).clamp_min(1.0)).float().mean())
        if diff.numel() else 1.0,
    }
    if labels is not None:
        labels = labels.cpu()
        report["top1_torch"] = float((pred_t == labels).float().mean())
        report["top1_onnx"] = float((pred_o == labels).float().mean())
    return report
