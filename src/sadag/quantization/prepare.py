"""quantize(): a fake-quantized copy of a model, ready for reconstruction."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import ConfigError
from .fold import fold_bn_
from .modules import is_quant_layer, quant_class_for
from .quantizers import ActQuantizer, WeightQuantizer
from .trace import block_input_consumers, trace_modules, warn_reused
from .units import find_units, unit_layers

log = logging.getLogger(__name__)


@dataclass
class QuantPlan:
    """What quantize() decided; stored on the model as ``model.sadag_plan``."""

    config: dict
    units: list[str]
    folded: list[tuple[str, str]] = field(default_factory=list)
    layer_bits: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # layer -> (W, A at its input)
    block_inputs: dict[str, list[str]] = field(default_factory=dict)  # block -> layers reading its input
    fp_layers: list[str] = field(default_factory=list)  # conv/linear subclasses with their own forward, no twin

    def to_dict(self) -> dict:
        return asdict(self)


def _quantize_block_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: one quantizer for a block's input, shared by its first conv and its shortcut."""
    return (module.sadag_input_quantizer(args[0]), *args[1:])


def quantize(model: nn.Module, cfg: QuantConfig, example: Tensor | None = None, *,
             folded: list[tuple[str, str]] | None = None) -> nn.Module:
    """Return a fake-quantized deep copy of ``model`` (the original is not modified).

    Args:
        model: an FP classifier.
        cfg: bits, bit policy, BN folding and unit override.
        example: one input batch, e.g. ``torch.zeros(1, 3, S, S)``, used to trace the dataflow; by default a
            zero image of the input size in the spec that ``sadag.load_model`` attached to the model.
        folded: with ``cfg.fold_bn``, the (conv, BatchNorm) pairs to fold, e.g. an export's ``plan.folded``
            (each must be a direct conv -> BN pair); by default :func:`fold_bn_` picks them, with a test on the
            model's outputs that a rebuilt model with other weights may decide differently.
    """
    cfg.validate()
    if example is None:
        example = _example_of(model)
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    folded = _fold(qmodel, cfg, example, folded)
    units = find_units(qmodel, example, cfg.units)
    skipped = _swap_layers(qmodel, cfg)
    units = _drop_float_units(qmodel, units)
    modules = dict(qmodel.named_modules())
    layers = [n for n, m in modules.items() if is_quant_layer(m)]
    trace = trace_modules(qmodel, example, list(dict.fromkeys(units + layers)))  # a unit may be a layer
    warn_reused(trace, units)
    order = [n for n in trace.order if is_quant_layer(modules[n])]
    plan = QuantPlan(config=asdict(cfg), units=units, folded=folded, fp_layers=skipped)
    feeding: dict[str, ActQuantizer | None] = {n: modules[n].input_quantizer for n in layers}
    for unit in units:
        inner = unit_layers(qmodel, unit)
        if unit in inner:  # a single-layer unit quantizes its own input
            continue
        consumers = block_input_consumers(qmodel, example, unit, inner)
        quantizer = ActQuantizer(cfg.a_bits, p=cfg.clip_search_p)
        modules[unit].add_module("sadag_input_quantizer", quantizer)
        modules[unit].register_forward_pre_hook(_quantize_block_input)
        for name in consumers:
            modules[name].input_quantizer = None
            feeding[name] = quantizer
        plan.block_inputs[unit] = consumers
    _apply_bit_policy(modules, order, feeding, cfg)
    for m in qmodel.modules():  # read when each is initialised on its first calibration minibatch
        if isinstance(m, ActQuantizer):
            m.symmetric = cfg.act_grid == "symmetric"
    plan.layer_bits = {
        n: (modules[n].weight_quantizer.bits, feeding[n].bits if feeding[n] is not None else None) for n in order
    }
    qmodel.sadag_plan = plan
    return qmodel.to(example.device)  # the new quantizers were built on the CPU


def _fold(qmodel: nn.Module, cfg: QuantConfig, example: Tensor,
          pairs: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if not cfg.fold_bn:
        if pairs:
            raise ConfigError(f"BatchNorm pairs to fold were given ({pairs[:3]}) with fold_bn=False: set "
                              "QuantConfig.fold_bn=True, or give none")
        return []
    return fold_bn_(qmodel, example, pairs)


def _swap_layers(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Swap every conv/linear for its quantized twin; returns the layers left in FP (subclasses with their own
    forward and no registered twin)."""
    skipped: dict[str, str] = {}  # name -> class name
    for name, module in list(model.named_modules()):
        if is_quant_layer(module) or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        cls = quant_class_for(module)
        if cls is None:
            skipped[name] = type(module).__name__
            continue
        cls.from_float(module, cfg.w_bits, cfg.a_bits, p=cfg.clip_search_p)
    if skipped:
        log.warning("left in full precision: %s: a Conv2d/Linear subclass that overrides forward (or _conv_forward), "
                    "with no quantized twin registered for it (sadag.quantization.modules.register_quantized_twin)",
                    ", ".join(f"{n} ({c})" for n, c in skipped.items()))
    return list(skipped)


def _drop_float_units(model: nn.Module, units: list[str]) -> list[str]:
    """The units holding a quantized layer: one whose layers are all left in FP has nothing to calibrate."""
    modules = dict(model.named_modules())
    kept = [u for u in units if any(is_quant_layer(modules[n]) for n in unit_layers(model, u))]
    if dropped := [u for u in units if u not in kept]:
        log.warning("not calibrated: %s (every layer in it is left in full precision)", ", ".join(dropped))
    return kept


def _apply_bit_policy(
    modules: dict[str, nn.Module], order: list[str], feeding: dict[str, ActQuantizer | None], cfg: QuantConfig
) -> None:
    """First layer W8 with FP input; second layer's input A8; last layer W8A8 (Genie / SADAG)."""
    if not cfg.first_last_8bit or not order:
        return
    first, last = order[0], order[-1]
    modules[first].set_weight_bits(8, p=cfg.clip_search_p)
    modules[last].set_weight_bits(8, p=cfg.clip_search_p)
    if feeding[first] is not None:
        feeding[first].set_bits(None)
    if cfg.a_bits is None:
        return
    for name in order[1:2] + [last]:
        if feeding[name] is not None:
            feeding[name].set_bits(8)


def _example_of(model: nn.Module) -> Tensor:
    spec = getattr(model, "sadag_spec", None)
    if spec is None:
        raise ConfigError("quantize() needs an example input batch (e.g. torch.zeros(1, 3, S, S)) for a model that "
                          "was not loaded with sadag.load_model (which attaches its input size)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros(1, 3, spec.input_size, spec.input_size, device=device)


def quantizers(model: nn.Module) -> tuple[list[WeightQuantizer], list[ActQuantizer]]:
    ws = [m for m in model.modules() if isinstance(m, WeightQuantizer)]
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    return ws, acts


def set_quant_state_(model: nn.Module, weights: bool = True, acts: bool = True) -> nn.Module:
    """Switch weight / activation quantization on or off everywhere (in place)."""
    for m in model.modules():
        if is_quant_layer(m):
            m.quantize_weight = weights
        if isinstance(m, ActQuantizer):
            m.active = acts
    return model


def float_copy(qmodel: nn.Module) -> nn.Module:
    """An FP copy of a quantized model (BN folded if it was): the reconstruction target."""
    fp = copy.deepcopy(qmodel)
    return set_quant_state_(fp, weights=False, acts=False)


@torch.no_grad()
def freeze_(qmodel: nn.Module) -> nn.Module:
    """After calibration: hard rounding, no QDrop dropping, no gradients."""
    ws, acts = quantizers(qmodel)
    for w in ws:
        if w.mode == "soft":
            w.mode = "hard"
    for a in acts:
        a.drop_prob = 0.0
    for p in qmodel.parameters():
        p.requires_grad_(False)
    return qmodel
