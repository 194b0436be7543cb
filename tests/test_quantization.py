"""Quantizer math, module swapping, bit policy, BN folding, unit detection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import R20_WEIGHTS, BasicBlock, TinyNet, needs_shared, randomize_bn_
from sadag.config import CalibConfig, QuantConfig, parse_bits
from sadag.errors import ConfigError
from sadag.quantization.fold import fold_bn_
from sadag.quantization.prepare import float_copy, quantize, quantizers
from sadag.quantization.primitives import (
    clip_search,
    fake_quantize,
    fake_quantize_lsq,
    inverse_rectified_sigmoid,
    keep_mask,
    rectified_sigmoid,
)
from sadag.quantization.quantizers import ActQuantizer, WeightQuantizer
from sadag.quantization.units import find_units, register_unit_type
from sadag.reconstruction.reconstruct import reconstruct_

X = torch.zeros(2, 3, 16, 16)
P = QuantConfig().clip_search_p


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_on_grid_and_within_bounds(bits: int) -> None:
    x = torch.randn(1000) * 3
    qmax = 2**bits - 1
    scale, zp = clip_search(x, qmax, p=P, dim=None)
    y = fake_quantize(x, scale, zp, qmax)
    levels = y / scale + zp
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.min() >= -1e-4 and levels.max() <= qmax + 1e-4
    assert len(torch.unique(levels.round())) <= 2**bits
    # a round trip of an on-grid tensor is exact
    assert torch.allclose(fake_quantize(y, scale, zp, qmax), y, atol=1e-6)


def test_clip_search_is_per_channel_and_beats_minmax() -> None:
    w = torch.randn(6, 4, 3, 3)
    w[0] *= 10  # one channel with a much wider range
    w[1, 0, 0, 0] = 8.0  # an outlier: clipping it pays off
    scale, zp = clip_search(w, 15, p=P, dim=0)
    assert scale.shape == (6, 1, 1, 1)
    assert scale[0] > 5 * scale[2]
    err = (fake_quantize(w, scale, zp, 15) - w).abs().pow(P).mean()
    mn, mx = w.amin(dim=(1, 2, 3), keepdim=True), w.amax(dim=(1, 2, 3), keepdim=True)
    s_mm = (mx - mn) / 15
    err_mm = (fake_quantize(w, s_mm, torch.round(-mn / s_mm), 15) - w).abs().pow(P).mean()
    assert err < err_mm


def test_rectified_sigmoid_inverse() -> None:
    frac = torch.rand(100) * 0.98 + 0.01
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(frac)), frac, atol=1e-5)


def test_adaround_starts_at_fp_weights_and_hard_rounding_is_on_grid() -> None:
    w = torch.randn(4, 3, 3, 3)
    q = WeightQuantizer(w, bits=4, p=P)
    q.start_adaround(w)
    soft = q(w)
    inside = (w / q.scale + q.zero_point > 0) & (w / q.scale + q.zero_point < 15)
    assert torch.allclose(soft[inside], w[inside], atol=1e-5)  # h(V) = fractional part: no error yet
    q.mode = "hard"
    hard = q(w)
    ints = q.integer_weight(w)
    assert torch.equal(ints, ints.round()) and ints.min() >= 0 and ints.max() <= 15
    assert torch.allclose(hard, (ints - q.zero_point) * q.scale)
    # with V untouched, hard rounding is round-to-nearest
    nearest = WeightQuantizer(w, bits=4, p=P)
    nearest.scale.data.copy_(q.scale.data)
    assert torch.allclose(hard, nearest(w), atol=1e-6)


def test_act_quantizer_signed_and_unsigned_grids_and_drop() -> None:
    a = ActQuantizer(4, p=P)
    a.observe_(torch.rand(64) * 2)
    assert a.zero_point == 0  # non-negative input: unsigned grid
    b = ActQuantizer(4, p=P)
    b.observe_(torch.randn(64))
    assert 0 < b.zero_point < 15  # negatives: the grid straddles zero
    x = torch.randn(10_000)
    b.drop_prob = 0.5
    y = b(x)
    kept_fp = (y == x).float().mean()
    assert 0.4 < kept_fp < 0.65  # about half the elements stay FP (plus the few already on the grid)
    b.drop_prob = 0.0
    assert not torch.equal(b(x), x)


@pytest.mark.parametrize("draw", ["bytes", "uniform"])
@pytest.mark.parametrize("prob", [0.5, 0.3, 1000 / 65536, 0.0, 1.0])  # one, four and two bytes per element
def test_keep_mask_frequency_and_reproducibility(draw: str, prob: float) -> None:
    def mask(seed: int) -> torch.Tensor:
        return keep_mask((64, 3, 33, 17), prob, draw, generator=torch.Generator().manual_seed(seed))

    m = mask(0)
    assert m.dtype == torch.bool and m.shape == (64, 3, 33, 17)
    assert abs(m.float().mean().item() - prob) <= 5 * (prob * (1 - prob) / m.numel()) ** 0.5  # 5 sigma
    assert torch.equal(m, mask(0)) and (prob in (0.0, 1.0) or not torch.equal(m, mask(1)))


def test_keep_mask_from_bytes_is_uncorrelated_within_a_word() -> None:
    m = keep_mask((80_000,), 0.5, generator=torch.Generator().manual_seed(0)).float().view(-1, 8)
    assert torch.allclose(m.mean(0), torch.full((8,), 0.5), atol=0.015)  # each byte of a word is fair ...
    corr = torch.corrcoef(m.T) - torch.eye(8)
    assert corr.abs().max() < 0.05  # ... and independent of its neighbours


def test_bits_parsing_and_range_errors() -> None:
    assert parse_bits("4/4") == (4, 4) and parse_bits("W2A4") == (2, 4) and parse_bits("4/fp") == (4, None)
    for bad in ["1/4", "9/8", "4/1", "4", "x/y"]:
        with pytest.raises(ConfigError):
            parse_bits(bad)


def test_bit_policy_first_second_last(tiny_net: nn.Module) -> None:
    q = quantize(tiny_net, QuantConfig(w_bits=3, a_bits=2), X)
    bits = q.sadag_plan.layer_bits
    assert bits["stem.0"] == (8, None)  # first layer: W8, FP input
    assert bits["block.conv1"] == (3, 8)  # second layer: input A8 (shared with the identity path)
    assert bits["block.conv2"] == (3, 2) and bits["head.0"] == (3, 2)
    assert bits["fc"] == (8, 8)  # last layer W8A8
    assert q.sadag_plan.block_inputs == {"block": ["block.conv1"]}
    assert q.block.conv1.input_quantizer is None and q.block.sadag_input_quantizer.bits == 8
    flat = quantize(tiny_net, QuantConfig(w_bits=3, a_bits=2, first_last_8bit=False), X).sadag_plan.layer_bits
    assert flat["stem.0"] == (3, 2) and flat["fc"] == (3, 2)
    wonly = quantize(tiny_net, QuantConfig(w_bits=4, a_bits=None), X)
    assert all(a.bits is None for a in quantizers(wonly)[1])


def test_quantize_does_not_touch_the_original_and_float_copy_matches(tiny_net: nn.Module) -> None:
    x = torch.randn(4, 3, 16, 16)
    ref = tiny_net(x)
    q = quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4), X)
    assert torch.equal(tiny_net(x), ref)
    assert type(tiny_net.fc) is nn.Linear
    assert torch.allclose(float_copy(q)(x), ref, atol=1e-5)
    assert not torch.allclose(q(x), ref, atol=1e-3)  # weights are quantized


def test_fold_bn_keeps_outputs(tiny_net: nn.Module) -> None:
    x = torch.randn(4, 3, 16, 16)
    ref = tiny_net(x)
    folded = randomize_bn_(TinyNet())
    folded.load_state_dict(tiny_net.state_dict())
    pairs = fold_bn_(folded, X)
    assert ("stem.0", "stem.1") in pairs and ("block.conv2", "block.bn2") in pairs and len(pairs) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), ref, atol=1e-5)
    q = quantize(tiny_net, QuantConfig(w_bits=8, a_bits=None, fold_bn=True), X)
    assert len(q.sadag_plan.folded) == 4


class _ConvUsedTwice(nn.Module):
    """conv -> BN, plus the conv output read again by a functional add: invisible to the module trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean((2, 3)))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),  # changed in place first
    _ConvUsedTwice,
])
def test_fold_bn_leaves_a_bn_whose_fold_would_change_the_model(make, caplog) -> None:
    model = randomize_bn_(make()).eval()
    x = torch.randn(4, 3, 16, 16)
    ref = model(x.clone())
    with caplog.at_level("WARNING"):
        assert fold_bn_(model, X) == []
    assert "not folding BatchNorm" in caplog.text
    assert torch.equal(model(x.clone()), ref) and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_units_tiny_and_override(tiny_net: nn.Module) -> None:
    assert find_units(tiny_net, X) == ["stem.0", "block", "head.0", "fc"]
    units = find_units(tiny_net, X, ["stem", "block"])
    assert units == ["stem", "block", "head.0", "fc"]  # uncovered layers become their own units
    with pytest.raises(ConfigError, match="unknown unit"):
        find_units(tiny_net, X, ["nope"])
    with pytest.raises(ConfigError, match="'block.conv1' lies inside unit 'block'"):
        find_units(tiny_net, X, ["block", "block.conv1"])  # would quantize the block's input twice
    with pytest.raises(ConfigError, match="twice"):
        find_units(tiny_net, X, ["block", "block"])


class WithUnusedLayer(TinyNet):
    """TinyNet holding a layer its forward never calls (an auxiliary head, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(16, 3)


def test_unit_never_called_is_left_out_or_refused(caplog: pytest.LogCaptureFixture) -> None:
    model = randomize_bn_(WithUnusedLayer())
    with caplog.at_level("WARNING"):
        assert find_units(model, X) == ["stem.0", "block", "head.0", "fc"]
    assert "not calibrated: aux" in caplog.text
    with pytest.raises(ConfigError, match="aux are never called"):
        find_units(model, X, ["block", "aux"])  # a unit the user names is honoured or refused
    # and calibration runs through (a unit without inputs used to end it, after all the others, in torch.cat)
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4), X)
    reconstruct_(q, torch.randn(16, 3, 16, 16), CalibConfig(iters=2, batch_size=8))
    assert q.sadag_plan.units == ["stem.0", "block", "head.0", "fc"]


class Sequential2(nn.Module):
    """A plain CNN of unknown type: every layer becomes a unit (the fallback)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def test_units_fallback_for_unknown_architecture() -> None:
    assert find_units(Sequential2().eval(), X) == ["features.0", "features.3", "classifier"]


@register_unit_type
class InvertedResidual(nn.Module):
    """Shaped like torchvision's MobileNetV2 block (a test-local class: registered here)."""

    def __init__(self, c: int, res: bool):
        super().__init__()
        self.res = res
        self.conv = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                                  nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), nn.BatchNorm2d(2 * c),
                                  nn.ReLU6(), nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.res else self.conv(x)


class MobileNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6()),
                                      InvertedResidual(4, False), InvertedResidual(4, True),
                                      nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU6()))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def test_units_mobilenet_shape_and_depthwise_quantization() -> None:
    model = randomize_bn_(MobileNetLike())
    assert find_units(model, X) == ["features.0.0", "features.1", "features.2", "features.3.0", "classifier.1"]
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4), X)
    assert q.sadag_plan.block_inputs["features.2"] == ["features.2.conv.0"]
    assert q(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@needs_shared
def test_units_cifar_resnets_and_option_a_shortcut_shares_the_input_quantizer() -> None:
    from sadag.models import load_model

    model, spec = load_model("resnet20_cifar10", weights=str(R20_WEIGHTS))
    x = torch.zeros(1, 3, 32, 32)
    units = find_units(model, x)
    assert units == ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["linear"]
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4), x)
    assert q.sadag_plan.block_inputs["layer2.0"] == ["layer2.0.conv1"]
    model56, _ = load_model("resnet56_cifar10", pretrained=False)
    assert len(find_units(model56, x)) == 2 + 27


def test_units_pytorchcv_resnet_with_conv_shortcut() -> None:
    from sadag.models import load_model

    model, _ = load_model("resnet20_cifar100", pretrained=False)
    x = torch.zeros(1, 3, 32, 32)
    units = find_units(model, x)
    assert len(units) == 11 and units[0] == "features.init_block.conv" and units[-1] == "output"
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4), x)
    assert sorted(q.sadag_plan.block_inputs["features.stage2.unit1"]) == [
        "features.stage2.unit1.body.conv1.conv", "features.stage2.unit1.identity_conv.conv"]


def test_units_efficientnet_lite() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from sadag.models import load_model

    model, spec = load_model("efficientnet_lite0", pretrained=False)
    x = torch.zeros(1, 3, 224, 224)
    units = find_units(model, x)
    assert len(units) == 16 + 3  # stem, 16 MBConv blocks, head conv, classifier
    assert units[0] == "_conv_stem" and units[-1] == "_fc"


@pytest.mark.parametrize("with_keep", [False, True])
def test_fused_lsq_quantizer_matches_autograd_reference(with_keep: bool) -> None:
    torch.manual_seed(0)
    x0, weight = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    keep = (torch.rand_like(x0) < 0.5).float() if with_keep else None
    zp = torch.tensor(5.0)

    def grads(fused: bool) -> tuple[torch.Tensor, ...]:
        x, s = x0.clone().requires_grad_(), torch.tensor(0.2, requires_grad=True)
        if fused:
            out = fake_quantize_lsq(x, s, zp, 15, keep)
        else:
            xq = fake_quantize(x, s, zp, 15)
            out = torch.where(keep.bool(), xq, x) if keep is not None else xq
        out.backward(weight)
        return out, x.grad, s.grad

    for a, b in zip(grads(True), grads(False), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_act_quantizers_use_the_configured_clip_search_exponent(tiny_net: nn.Module) -> None:
    x = torch.randn(4096)
    x[0] = 20.0  # an outlier: how much clipping pays off depends on the exponent
    scales = []
    for p in (1.0, 4.0):
        _, acts = quantizers(quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4, clip_search_p=p), X))
        assert {a.p for a in acts} == {p}
        acts[1].observe_(x)
        scales.append(float(acts[1].scale.detach()))
    assert scales[0] < scales[1]  # p = 1 clips the outlier harder than p = 4


class ScaledConv(nn.Conv2d):
    """A conv subclass with its own forward (a family-specific layer): unknown to quantize() by default."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class TwoConvBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = ScaledConv(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.a(x)))) + x


class FamilyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(TwoConvBlock(4), TwoConvBlock(4))
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def test_a_model_family_registers_its_blocks_and_quantized_twin() -> None:
    """What a new family's module does (plus one import line in models/__init__.py): two registrations."""
    from sadag.quantization.modules import QuantConv2d, quant_class_for, register_quantized_twin

    class QuantScaledConv(QuantConv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = FamilyNet().eval()
    before = quantize(model, QuantConfig(w_bits=8, a_bits=None), X).sadag_plan
    assert before.units == ["stem", "blocks.0.b", "blocks.1.b", "fc"]  # an FP layer is no unit to calibrate
    assert before.fp_layers == ["blocks.0.a", "blocks.1.a"]  # no twin yet: left in FP
    register_unit_type(TwoConvBlock)
    register_quantized_twin(f"{__name__}.ScaledConv", QuantScaledConv)  # by qualified name
    assert quant_class_for(ScaledConv(1, 1, 1)) is QuantScaledConv
    q = quantize(model, QuantConfig(w_bits=8, a_bits=8), X)
    assert q.sadag_plan.units == ["stem", "blocks.0", "blocks.1", "fc"] and q.sadag_plan.fp_layers == []
    assert q.sadag_plan.block_inputs == {"blocks.0": ["blocks.0.a"], "blocks.1": ["blocks.1.a"]}
    assert isinstance(q.blocks[0].a, QuantScaledConv)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(float_copy(q)(x), model(x), atol=1e-5)  # the twin keeps the family's forward
    with pytest.raises(TypeError, match="must subclass QuantConv2d"):
        register_quantized_twin(ScaledConv, nn.Conv2d)


class PresetConv(nn.Conv2d):
    """A conv subclass that only changes __init__'s defaults: Conv2d's forward, inherited."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)

    def describe(self) -> str:  # a method the model's code may call
        return "preset"


class HalvedConv(PresetConv):
    """Its own forward, and no twin registered: left in FP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 2


class TwoConvNet(nn.Module):
    def __init__(self, second: type[nn.Conv2d] = PresetConv) -> None:
        super().__init__()
        self.a, self.b = PresetConv(3, 4), second(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean((2, 3))


def test_a_conv_subclass_inheriting_forward_is_quantized_and_calibrated() -> None:
    from sadag.quantization.modules import QuantConv2d, QuantLinear, quant_class_for

    torch.manual_seed(0)
    model = TwoConvNet().eval()
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4), X)
    assert q.sadag_plan.units == ["a", "b"] and q.sadag_plan.fp_layers == []
    # the base class's twin, on a layer that stays a PresetConv (one derived class for every such layer)
    assert isinstance(q.a, QuantConv2d) and isinstance(q.a, PresetConv) and type(q.a) is type(q.b)
    assert q.a.describe() == "preset" and type(q.a).forward is QuantConv2d.forward
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(float_copy(q)(x), model(x), atol=1e-6)
    reconstruct_(q, torch.randn(8, 3, 16, 16), CalibConfig(iters=2, batch_size=4))
    assert torch.isfinite(q(x)).all()
    linear = nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)  # torch's own Linear subclass
    assert issubclass(quant_class_for(linear), QuantLinear)


def test_a_layer_left_in_fp_is_named_and_its_unit_dropped(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level("WARNING"):
        q = quantize(TwoConvNet(second=HalvedConv).eval(), QuantConfig(w_bits=4, a_bits=4), X)
    assert "left in full precision: b (HalvedConv): a Conv2d/Linear subclass that overrides forward" in caplog.text
    assert "not calibrated: b (every layer in it is left in full precision)" in caplog.text
    assert q.sadag_plan.fp_layers == ["b"] and q.sadag_plan.units == ["a"] and type(q.b) is HalvedConv
    reconstruct_(q, torch.randn(8, 3, 16, 16), CalibConfig(iters=2, batch_size=4))  # no unit without parameters


class BlockTwice(nn.Module):
    """One registered block applied twice: a reused module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.block(self.stem(x))).mean((2, 3)))


class ConvTwice(nn.Module):
    """A conv applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


class ConvTwiceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = ConvTwice()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


def test_a_module_called_twice_is_named_in_a_warning(tiny_net: nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        q = quantize(randomize_bn_(BlockTwice()), QuantConfig(w_bits=4, a_bits=4), X)
    assert q.sadag_plan.units == ["stem", "block", "fc"]
    assert "units called more than once per forward pass: block (2 calls): reconstruction fits each to the " \
           "inputs and outputs of its first call only" in caplog.text
    assert "quantized layers called more than once" not in caplog.text  # its layers: named through the block
    caplog.clear()
    with caplog.at_level("WARNING"):
        quantize(ConvTwiceNet(), QuantConfig(w_bits=4, a_bits=4, units=["body"]), X)  # a unit calling it twice
    assert "quantized layers called more than once per forward pass: body.conv (2 calls)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4), X)
    assert "more than once" not in caplog.text


def test_quantize_takes_its_example_from_the_attached_spec(tiny_net) -> None:  # noqa: ANN001
    from sadag.models import DataSpec, load_model

    with pytest.raises(ConfigError, match="example input batch"):
        quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4))
    model, spec = load_model(tiny_net, spec=DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16, num_classes=10))
    auto = quantize(model, QuantConfig(w_bits=4, a_bits=4))
    given = quantize(model, QuantConfig(w_bits=4, a_bits=4), torch.zeros(2, 3, 16, 16))
    assert auto.sadag_plan.units == given.sadag_plan.units and auto.sadag_spec == spec


def _genie_signed_scale(x: torch.Tensor, bits: int, p: float) -> float:
    """Genie's symmetric signed search, written out: levels -2^(b-1) .. 2^(b-1) - 1 of a step 2 r max|x| / qmax
    over the clip ratios r (as 1 - i/100: Genie's arange(1.0, 0.0, -0.01) differs only in float rounding)."""
    m, qmax = x.abs().max(), 2**bits - 1
    best, best_err = None, float("inf")
    for i in range(100):
        s = 2 * m * (1.0 - i / 100) / qmax
        err = float((torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s - x)
                    .abs().pow(p).mean())
        if err < best_err:
            best, best_err = s, err
    return float(best)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_symmetric_clip_search_is_genies_signed_grid(bits: int) -> None:
    x = torch.randn(4000, generator=torch.Generator().manual_seed(bits)) * 2 + 0.7  # lopsided: affine would differ
    scale, zp = clip_search(x, 2**bits - 1, p=P, dim=None, symmetric=True)
    assert zp.item() == 2 ** (bits - 1)
    assert scale.item() == pytest.approx(_genie_signed_scale(x, bits, P), rel=1e-5)
    affine_scale, affine_zp = clip_search(x, 2**bits - 1, p=P, dim=None)
    assert (affine_scale.item(), affine_zp.item()) != (scale.item(), zp.item())
    # a non-negative input takes the unsigned grid either way
    assert [t.item() for t in clip_search(x.relu(), 2**bits - 1, p=P, dim=None, symmetric=True)] == \
        [t.item() for t in clip_search(x.relu(), 2**bits - 1, p=P, dim=None)]


def test_act_grid_symmetric_puts_signed_activations_on_a_signed_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10))
    images = torch.randn(16, 3, 16, 16)
    zero_points = {}
    for grid in ("affine", "symmetric"):
        q = quantize(model, QuantConfig(4, 4, act_grid=grid), images[:1])
        reconstruct_(q, images, CalibConfig(iters=0, batch_size=8))
        signed, unsigned = q.get_submodule("2").input_quantizer, q.get_submodule("5").input_quantizer
        assert all(a.symmetric == (grid == "symmetric") for a in quantizers(q)[1])
        assert unsigned.zero_point.item() == 0  # after a ReLU: the unsigned grid
        zero_points[grid] = signed.zero_point.item() - 2 ** (signed.bits - 1)  # (the second layer's input: A8)
    assert zero_points["symmetric"] == 0 and zero_points["affine"] != 0
