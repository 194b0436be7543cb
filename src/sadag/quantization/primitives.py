"""Pure tensor math of uniform affine quantization (no nn.Module state)."""

from __future__ import annotations

import math

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
    """fake_quantize with QDrop's elementwise keep-mask, fused: autograd's values and gradients (to rounding) in
    fewer passes over memory (5 forward, 9 backward: elementwise ops set the pace on a CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int, keep: Tensor | None) -> Tensor:  # noqa: ANN001
        u = x / scale
        # the integer level minus the zero point; round(u) is an integer, so clamping it to [-zp, qmax - zp] is
        # exactly clamp(round(u) + zp, 0, qmax) - zp
        q = torch.round(u).clamp_(-zero_point, qmax - zero_point)
        out = q.mul(scale)
        if keep is not None:  # keep = 1: quantized, 0: full precision; lerp is exact at 0 and 1 (and 5x a bool where)
            out = torch.lerp(x, out, keep)
        ctx.save_for_backward(u, q, keep)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        u, q, keep = ctx.saved_tensors
        inside = (q - u).abs_().le_(0.5)  # 1 where the clamp did not bite (floats 0/1)
        grad_scale = None
        if ctx.needs_input_grad[1]:  # frozen models (SADAG refinement) skip the step-size gradient
            d_scale = torch.addcmul(q, u, inside, value=-1)  # LSQ: round(u) - u inside the range, the level outside
            if keep is not None:
                d_scale.mul_(keep)
            grad_scale = d_scale.mul_(grad).sum().reshape(())
        grad_x = inside.mul_(grad)  # the straight-through estimate where quantized; all of grad where kept in FP
        if keep is not None:
            grad_x = torch.lerp(grad, grad_x, keep)
        return grad_x, grad_scale, None, None, None


def fake_quantize_lsq(x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int, keep: Tensor | None = None) -> Tensor:
    """Per-tensor fake quantization with LSQ/STE gradients; ``keep`` (0/1 floats) mixes in FP values (QDrop)."""
    return _FakeQuantizeLSQ.apply(x, scale, zero_point, qmax, keep)


def keep_mask(shape: tuple[int, ...], prob: float, draw: str = "bytes", *, generator: torch.Generator | None = None,
              device: torch.device | str | None = None, channels_last: bool = False,
              dtype: torch.dtype = torch.bool) -> Tensor:
    """QDrop's mask: 1 (True) with probability ``prob`` in each element, independently, else 0.

    draw "uniform": float32 uniforms below ``prob``. "bytes": each element reads the fewest random bytes that
    represent ``prob`` exactly (one for multiples of 1/256 such as QDrop's 0.5, two for 1/65536; otherwise four,
    ``prob`` rounded to 2^-32, finer than float32 uniforms' 2^-24). A generator draw gives 8 random bytes where
    a uniform costs one draw: the cheaper mask on a CPU, and another random stream.
    ``channels_last`` (4-d shapes): the mask is drawn in that memory order, so that mixing it with channels_last
    activations reads all three tensors in one order (a mixed-layout elementwise op is several times slower).
    ``dtype``: the comparison writes it directly (a float mask for lerp, without a bool mask and its conversion).
    """
    if channels_last:
        n, c, h, w = shape
        return keep_mask((n, h, w, c), prob, draw, generator=generator, device=device,
                         dtype=dtype).permute(0, 3, 1, 2)
    out = torch.empty(shape, dtype=dtype, device=device)
    if draw == "uniform":
        return torch.lt(torch.rand(shape, generator=generator, device=device), prob, out=out)
    nbytes = next((b for b in (1, 2) if (prob * 2 ** (8 * b)).is_integer()), 4)
    levels, word = 2 ** (8 * nbytes), {1: torch.int8, 2: torch.int16, 4: torch.int32}[nbytes]
    k = round(prob * levels)
    if k in (0, levels):
        return out.fill_(k > 0)
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, (-(-n * nbytes // 8),), dtype=torch.int64, generator=generator,
                          device=device)
    # a signed view of uniform bytes is uniform on [-levels/2, levels/2): below the threshold with prob k/levels
    return torch.lt(words.view(word)[:n], k - levels // 2, out=out.view(-1)).view(shape)


def is_channels_last(x: Tensor) -> bool:
    """A 4-d tensor stored channels_last (and not also plainly contiguous, as when C or H * W is 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def affine_params(x_min: Tensor, x_max: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point covering [x_min, x_max] (the range always contains 0)."""
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    scale = ((x_max - x_min) / qmax).clamp_min(1e-8)
    zero_point = torch.round(-x_min / scale).clamp(0, qmax)
    return scale, zero_point


def clip_search(x: Tensor, qmax: int, *, p: float, dim: int | None = 0, steps: int = 100,
                symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Choose scale and zero point by searching clipping ratios 1.00, 0.99, ... 0.01 of the range.

    Minimises mean |x - Q(x)|^p, per slice along ``dim`` (per output channel for weights) or over the
    whole tensor when ``dim`` is None. Returns (scale, zero_point) shaped for broadcasting against x.
    ``symmetric``: a slice with negative values searches [-max|x|, max|x|] (Genie's signed activation grid: the
    zero point is then round(qmax / 2) = 2^(b-1), the levels -2^(b-1) .. 2^(b-1) - 1 times the scale).
    """
    if dim is None:
        flat = x.reshape(1, -1)
    else:
        flat = x.transpose(0, dim).reshape(x.shape[dim], -1)
    x_min = flat.min(dim=1).values
    x_max = flat.max(dim=1).values
    signed = x_min < 0 if symmetric else torch.zeros_like(x_min, dtype=torch.bool)
    x_max = torch.where(signed, torch.maximum(x_max, -x_min), x_max)
    x_min = torch.where(signed, -x_max, x_min)
    best_err = torch.full_like(x_min, float("inf"))
    best_scale = torch.ones_like(x_min)
    best_zp = torch.zeros_like(x_min)
    for i in range(steps):
        ratio = 1.0 - i / steps
        scale, zp = affine_params(x_min * ratio, x_max * ratio, qmax)
        zp = torch.where(signed, float((qmax + 1) // 2), zp)  # round(qmax / 2) exactly, whatever the rounding
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
