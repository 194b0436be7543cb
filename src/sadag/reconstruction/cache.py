"""Capture a unit's inputs and outputs over the calibration set, stopping the forward early."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_unit_io(
    model: nn.Module, unit: str, images: Tensor, batch_size: int, want_output: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Run ``model`` over ``images`` and return the unit's (inputs, outputs), each (N, ...).

    The forward pass stops right after the unit, so later layers cost nothing. The input is
    taken before any input quantizer of the unit (quantizers run inside the unit's forward).
    """
    module = dict(model.named_modules())[unit]
    ins: list[Tensor] = []
    outs: list[Tensor] = []

    def pre_hook(_m: nn.Module, args: tuple) -> None:
        ins.append(args[0].detach())
        if not want_output:
            raise _StopForward

    def post_hook(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        outs.append(out.detach())
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
