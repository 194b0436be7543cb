"""Pure tensor math of uniform affine quantization (no nn.Module state)."""

from __future__ import annotations

import torch
from torch import Tensor

# AdaRound's rectified sigmoid stretches sigmoid(V) to [GAMMA, ZETA] then clips to [0, 1].
GAMMA, ZETA = -0.1, 1.1


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int) -> Tensor:
    """Quantize to the integer grid [0, qmax] and back; gradients flow to x and scale (LSQ/STE)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


class _FakeQuantizeLSQ(torch.autograd.Function):
    """fake_quantize with QDrop's elementwise keep-mask, fused: the same gradients, half the memory passes."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int, keep: Tensor | None) -> Tensor:  # noqa: ANN001
        u = x / scale
        q = torch.round(u).add_(zero_point).clamp_(0, qmax).sub_(zero_point)  # integer level minus zero point
        out = q * scale
        if keep is not None:  # keep = 1: quantized, 0: full precision
            out.sub_(x).mul_(keep).add_(x)
        ctx.save_for_backward(u, q, keep)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        u, q, keep = ctx.saved_tensors
        inside = (q - u).abs_().le_(0.5).to(grad.dtype)  # 1 where the clamp did not bite
        grad_scale = None
        if ctx.needs_input_grad[1]:  # frozen models (SADAG refinement) skip the step-size gradient
            d_scale = u.mul(inside).neg_().add_(q)  # LSQ: round(u) - u inside the range, the clamped level outside
            grad_scale = (grad * d_scale if keep is None else grad * keep * d_scale).sum().reshape(())
        if keep is not None:
            grad_x = inside.sub_(1).mul_(keep).add_(1).mul_(grad)
        else:
            grad_x = inside.mul_(grad)
        return grad_x, grad_scale, None, None, None


def fake_quantize_lsq(x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int, keep: Tensor | None = None) -> Tensor:
    """Per-tensor fake quantization with LSQ/STE gradients; ``keep`` (0/1 floats) mixes in FP values (QDrop)."""
    return _FakeQuantizeLSQ.apply(x, scale, zero_point, qmax, keep)


def affine_params(x_min: Tensor, x_max: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point covering [x_min, x_max] (the range always contains 0)."""
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    scale = ((x_max - x_min) / qmax).clamp_min(1e-8)
    zero_point = torch.round(-x_min / scale).clamp(0, qmax)
    return scale, zero_point


def clip_search(x: Tensor, qmax: int, *, p: float, dim: int | None = 0, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Choose scale and zero point by searching clipping ratios 1.00, 0.99, ... 0.01 of the range.

    Minimises mean |x - Q(x)|^p, per slice along ``dim`` (per output channel for weights) or over the
    whole tensor when ``dim`` is None. Returns (scale, zero_point) shaped for broadcasting against x.
    """
    if dim is None:
        flat = x.reshape(1, -1)
    else:
        flat = x.transpose(0, dim).reshape(x.shape[dim], -1)
    x_min = flat.min(dim=1).values
    x_max = flat.max(dim=1).values
    best_err = torch.full_like(x_min, float("inf"))
    best_scale = torch.ones_like(x_min)
    best_zp = torch.zeros_like(x_min)
    for i in range(steps):
        ratio = 1.0 - i / steps
        scale, zp = affine_params(x_min * ratio, x_max * ratio, qmax)
        q = torch.clamp(torch.round(flat / scale[:, None]) + zp[:, None], 0, qmax)
        err = ((q - zp[:, None]) * scale[:, None] - flat).abs().pow(p).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    if dim is None:
        return best_scale.reshape(()), best_zp.reshape(())
    shape = [1] * x.dim()
    shape[dim] = -1
    return best_scale.reshape(shape), best_zp.reshape(shape)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """AdaRound's h(V) in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(frac: Tensor) -> Tensor:
    """V such that h(V) equals ``frac`` (used to start AdaRound at the FP weights)."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)
