"""Find the dataflow between layers by running the model once and comparing tensor identities.

This works without torch.fx, so it handles any model whose forward is plain Python: a module's
input "is" another module's output exactly when the second feeds the first with no op between.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..modes import eval_mode

log = logging.getLogger(__name__)


@dataclass
class Trace:
    order: list[str] = field(default_factory=list)  # traced module names, first call order
    producer: dict[str, str] = field(default_factory=dict)  # module -> module whose output is its input
    consumers: dict[str, list[str]] = field(default_factory=dict)  # module -> modules taking its output
    calls: dict[str, int] = field(default_factory=dict)  # module -> times the forward called it


@torch.no_grad()
def trace_modules(model: nn.Module, example: Tensor, names: list[str]) -> Trace:
    """Record call order and direct producer/consumer links among the named modules."""
    modules = dict(model.named_modules())
    trace = Trace()
    outputs: dict[int, str] = {}
    keep: list[Tensor] = []  # keeps traced tensors alive so ids are not reused

    def pre_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in trace.order:
                trace.order.append(name)
            trace.calls[name] = trace.calls.get(name, 0) + 1
            if args and isinstance(args[0], Tensor) and id(args[0]) in outputs:
                src = outputs[id(args[0])]
                trace.producer.setdefault(name, src)
                trace.consumers.setdefault(src, [])
                if name not in trace.consumers[src]:
                    trace.consumers[src].append(name)
            if args and isinstance(args[0], Tensor):
                keep.append(args[0])
        return hook

    def post_hook(name: str):
        def hook(_module: nn.Module, _args: tuple, out: object) -> None:
            if isinstance(out, Tensor):
                outputs[id(out)] = name
                keep.append(out)
        return hook

    handles = []
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(pre_hook(name)))
        handles.append(modules[name].register_forward_hook(post_hook(name)))
    try:
        with eval_mode(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    return trace


def warn_reused(trace: Trace, units: list[str]) -> None:
    """Warn about traced units and layers that one forward pass calls more than once (a module reused, e.g. one
    block applied twice): nothing fails, but calibration fits them to part of what they see."""
    repeated = [n for n, count in trace.calls.items() if count > 1]
    blocks = [n for n in repeated if n in units]
    layers = [n for n in repeated if not any(n == u or n.startswith(u + ".") for u in blocks)]
    if blocks:
        log.warning("units called more than once per forward pass: %s: reconstruction fits each to the inputs and "
                    "outputs of its first call only, and every call shares its quantizers; give each use its own "
                    "module (a copy) to calibrate them separately", _counts(trace, blocks))
    if layers:
        log.warning("quantized layers called more than once per forward pass: %s: every call shares one weight "
                    "rounding and one input quantizer (a step size fitted to all calls' inputs); give each use its "
                    "own module (a copy) to quantize them separately", _counts(trace, layers))


def _counts(trace: Trace, names: list[str]) -> str:
    return ", ".join(f"{n} ({trace.calls[n]} calls)" for n in names)


def block_input_consumers(model: nn.Module, example: Tensor, block: str, layers: list[str]) -> list[str]:
    """Layers inside ``block`` whose input is exactly the block's input tensor (e.g. conv1 and the shortcut)."""
    modules = dict(model.named_modules())
    seen: dict[str, Tensor] = {}
    found: list[str] = []

    def block_hook(_m: nn.Module, args: tuple) -> None:
        seen["input"] = args[0]

    def layer_hook(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            if args and args[0] is seen.get("input") and name not in found:
                found.append(name)
        return hook

    handles = [modules[block].register_forward_pre_hook(block_hook)]
    handles += [modules[n].register_forward_pre_hook(layer_hook(n)) for n in layers]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return found
