"""Capture a unit's inputs and outputs over the calibration set, stopping the forward early."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _StopForward(BaseException):
    """Not an Exception: a model's own ``try/except Exception`` around a unit call must not swallow it."""


def in_layout(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """A 4-d tensor in that memory format (no copy when it already is); other tensors unchanged."""
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


@torch.no_grad()
def capture_unit_io(
    model: nn.Module, unit: str, images: Tensor, batch_size: int, want_output: bool = True,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Tensor, Tensor | None]:
    """Run ``model`` over ``images`` and return the unit's (inputs, outputs), each (N, ...), 4-d ones stored
    in ``memory_format``.

    The forward pass stops right after the unit, so later layers cost nothing. The input is
    taken before any input quantizer of the unit (quantizers run inside the unit's forward).
    """
    module = dict(model.named_modules())[unit]
    ins: list[Tensor] = []
    outs: list[Tensor] = []

    def pre_hook(_m: nn.Module, args: tuple) -> None:
        ins.append(in_layout(args[0].detach(), memory_format))
        if not want_output:
            raise _StopForward

    def post_hook(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        outs.append(in_layout(out.detach(), memory_format))
        raise _StopForward

    # prepend so the unit's own input-quantizer pre-hook runs after this one
    handles = [module.register_forward_pre_hook(pre_hook, prepend=True), module.register_forward_hook(post_hook)]
    try:
        for start in range(0, images.shape[0], batch_size):
            try:
                model(images[start : start + batch_size])
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(ins), (torch.cat(outs) if want_output else None)
