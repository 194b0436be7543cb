"""Quantizer modules. Every quantization parameter is a registered parameter or buffer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .primitives import (
    GAMMA,
    ZETA,
    clip_search,
    fake_quantize,
    fake_quantize_lsq,
    inverse_rectified_sigmoid,
    is_channels_last,
    keep_mask,
    rectified_sigmoid,
)


class _RoundingRegularizer(torch.autograd.Function):
    """sum(1 - |u|^beta) with u = 2h(V) - 1 and h the rectified sigmoid, in one pass each way.

    d/dV = -beta |u|^beta / u * 2 (ZETA - GAMMA) s (1 - s) where 0 < h < 1 (s = sigmoid(V)): the forward's
    |u|^beta is reused, so the backward needs no second pow (autograd's version computes |u|^(beta - 1)).
    """

    @staticmethod
    def forward(ctx, alpha: Tensor, beta: Tensor) -> Tensor:  # noqa: ANN001
        s = torch.sigmoid(alpha)
        h = s * (ZETA - GAMMA) + GAMMA
        u = h.clamp(0, 1).mul_(2).sub_(1)
        p = u.abs().pow_(beta)
        ctx.save_for_backward(s, u, p, beta)
        return (1 - p).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        s, u, p, beta = ctx.saved_tensors
        live = u.abs() < 1  # 0 < h < 1: where the clamp does not bite; u = 0 has a zero gradient (beta > 1)
        live &= u != 0
        d = p.div(torch.where(live, u, torch.ones_like(u))).mul_(s * (1 - s)).mul_(-2 * (ZETA - GAMMA) * beta * grad)
        return torch.where(live, d, torch.zeros_like(d)), None


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric weight quantizer with AdaRound and a learned step size (Genie).

    Modes: "nearest" (round to nearest), "soft" (AdaRound during calibration: the integer base
    floor(w / s0) is frozen, h(V) in [0, 1] is learned), "hard" (after calibration: V >= 0 rounds up).
    ``p`` is the clip-search exponent that picks the initial step size (QuantConfig.clip_search_p).
    """

    def __init__(self, weight: Tensor, bits: int, *, p: float) -> None:
        super().__init__()
        self.bits = bits
        self.qmax = 2**bits - 1
        self.mode = "nearest"
        scale, zero_point = clip_search(weight.detach(), self.qmax, p=p, dim=0)
        self.scale = nn.Parameter(scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("w_floor", torch.zeros_like(weight))
        self.alpha = nn.Parameter(torch.zeros_like(weight))  # AdaRound's V

    def start_adaround(self, weight: Tensor) -> None:
        """Freeze floor(w / s) and start V so that h(V) equals the fractional part."""
        with torch.no_grad():
            w = weight / self.scale
            self.w_floor.copy_(torch.floor(w))
            self.alpha.copy_(inverse_rectified_sigmoid(w - self.w_floor))
        self.mode = "soft"

    def rounding(self) -> Tensor:
        if self.mode == "hard":
            return (self.alpha >= 0).to(self.alpha.dtype)
        return rectified_sigmoid(self.alpha)

    def integer_weight(self, weight: Tensor) -> Tensor:
        """The unsigned integer weights in [0, qmax] that the forward pass uses (hard rounding)."""
        with torch.no_grad():
            if self.mode == "nearest":
                return torch.clamp(torch.round(weight / self.scale) + self.zero_point, 0, self.qmax)
            return torch.clamp(self.w_floor + (self.alpha >= 0) + self.zero_point, 0, self.qmax)

    def regularizer(self, beta: float | Tensor) -> Tensor:
        """AdaRound's push of h(V) to 0 or 1: sum(1 - |2h - 1|^beta), value and gradient in one pass each."""
        return _RoundingRegularizer.apply(self.alpha, torch.as_tensor(beta, dtype=self.alpha.dtype))

    def forward(self, weight: Tensor) -> Tensor:
        if self.mode == "nearest":
            return fake_quantize(weight, self.scale, self.zero_point, self.qmax)
        q = torch.clamp(self.w_floor + self.rounding() + self.zero_point, 0, self.qmax)
        return (q - self.zero_point) * self.scale

    def get_extra_state(self) -> dict:
        return {"mode": self.mode, "bits": self.bits}

    def set_extra_state(self, state: dict) -> None:
        self.mode = state["mode"]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with a learned step size (LSQ) and QDrop's random drop.

    Affine with an integer zero point: a non-negative input gets zero point 0 (unsigned grid),
    an input with negatives gets a zero point inside the grid. ``drop_prob`` > 0 keeps each
    element's quantized value with that probability and its FP value otherwise (calibration only).
    """

    def __init__(self, bits: int | None, *, p: float) -> None:
        super().__init__()
        self.bits = bits
        self.qmax = 2**bits - 1 if bits else 0
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.ready = False  # python mirror of `initialized`: no host sync in forward
        self.drop_prob = 0.0
        self.drop_draw = "bytes"  # how the drop mask is drawn (CalibConfig.drop_draw)
        self.active = True  # False turns the quantizer into the identity (FP reference copies)
        self.observing = False
        self.p = p  # clip-search exponent (QuantConfig.clip_search_p)
        self.symmetric = False  # QuantConfig.act_grid == "symmetric": Genie's signed grid for inputs with negatives
        # (this rank's rows, the whole minibatch's size) in data-parallel calibration: the drop mask is drawn for
        # the whole minibatch from the ranks' identically seeded RNG, and this rank keeps its rows
        self.rows: tuple[slice, int] | None = None

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def set_bits(self, bits: int | None) -> None:
        self.bits = bits
        self.qmax = 2**bits - 1 if bits else 0
        self.initialized.fill_(False)
        self.ready = False

    def observe_(self, x: Tensor) -> None:
        """Initialise scale and zero point by clip search on a calibration batch."""
        scale, zero_point = clip_search(x.detach(), self.qmax, p=self.p, dim=None, symmetric=self.symmetric)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
            self.initialized.fill_(True)
        self.ready = True

    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "drop_prob": self.drop_prob}

    def set_extra_state(self, state: dict) -> None:
        self.bits = state["bits"]
        self.qmax = 2**self.bits - 1 if self.bits else 0
        self.drop_prob = state["drop_prob"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.ready = bool(self.initialized)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits is None or not self.active:
            return x
        if self.observing:
            self.observe_(x)
        if not self.ready:
            return x
        keep = self._drop_mask(x) if self.drop_prob > 0 else None
        return fake_quantize_lsq(x, self.scale, self.zero_point, self.qmax, keep)

    def _drop_mask(self, x: Tensor) -> Tensor:
        layout = {"device": x.device, "channels_last": is_channels_last(x), "dtype": x.dtype}
        if self.rows is None:
            return keep_mask(x.shape, self.drop_prob, self.drop_draw, **layout)
        part, full = self.rows
        return keep_mask((full, *x.shape[1:]), self.drop_prob, self.drop_draw, **layout)[part]

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def unused_input_quantizers(model: nn.Module) -> set[str]:
    """Input quantizers of quantized layers that quantize()'s trace never reached (an auxiliary head):
    calibration leaves them uninitialised (find_units warns) and no forward pass runs them."""
    plan = getattr(model, "sadag_plan", None)
    if plan is None:
        return set()
    # a quantized layer is the parent of a WeightQuantizer (modules.is_quant_layer, which imports this module)
    layers = {n.rpartition(".")[0] for n, m in model.named_modules() if isinstance(m, WeightQuantizer)}
    return {f"{n}.input_quantizer" if n else "input_quantizer" for n in layers if n not in plan.layer_bits}


def uncalibrated_act_quantizers(model: nn.Module) -> list[str]:
    """Names of the switched-on activation quantizers with bits but no step size yet (straight from quantize()):
    they pass their input through in full precision, so the model is not what its bits say."""
    skip = unused_input_quantizers(model)
    return [n for n, m in model.named_modules()
            if isinstance(m, ActQuantizer) and m.bits is not None and m.active and not m.ready and n not in skip]


def check_act_quantizers_calibrated(model: nn.Module, action: str) -> None:
    """Refuse a model whose activation quantizers have bits but no step size (quantize() without reconstruct_):
    ``action`` ("the export", "the evaluation") would be labelled with activation bits it does not apply."""
    unset = uncalibrated_act_quantizers(model)
    if unset:
        raise ConfigError(
            f"activation quantizers {name_a_few(unset)} were never calibrated (no step size): {action} would run "
            "them in full precision, not at their bits; calibrate the model first with sadag.reconstruct_(qmodel, "
            "images, CalibConfig(...)) or `sadag run` (CalibConfig(iters=0) gives the round-to-nearest baseline: "
            "nearest-rounded weights, activation ranges from the first calibration minibatch)")


def name_a_few(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` names, and "..." when there are more (error messages)."""
    return f"{', '.join(names[:shown])}{' ...' if len(names) > shown else ''}"
