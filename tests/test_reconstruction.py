"""Block reconstruction: lowers the error, ends with hard rounding, resumes exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import CIFAR_TRAIN, R20_WEIGHTS, needs_shared
from sadag.config import CalibConfig, QuantConfig
from sadag.errors import ConfigError
from sadag.quantization.prepare import float_copy, quantize, quantizers
from sadag.reconstruction.cache import capture_unit_io
from sadag.reconstruction.losses import BetaSchedule, reconstruction_loss
from sadag.reconstruction.reconstruct import calibrate_unit_, reconstruct_

X = torch.zeros(2, 3, 16, 16)


def test_beta_schedule() -> None:
    b = BetaSchedule(100, warmup=0.2, start=20, end=2)
    assert b(0) == 20 and b(19) == 20 and not b.regularizer_on(19) and b.regularizer_on(20)
    assert b(20) == 20 and abs(b(60) - 11) < 1e-9 and b(100) == 2


def test_reconstruction_loss_sums_channels() -> None:
    out, target = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert reconstruction_loss(out, target) == 3.0


@pytest.fixture(scope="module")
def r20_and_images():
    from sadag.data import sample_calibration_images
    from sadag.models import load_model

    model, spec = load_model("resnet20_cifar10", weights=str(R20_WEIGHTS))
    return model, sample_calibration_images(CIFAR_TRAIN, spec, 64, seed=0)


@needs_shared
@pytest.mark.slow
def test_calibration_lowers_a_blocks_error_on_real_images(r20_and_images) -> None:
    model, images = r20_and_images
    q = quantize(model, QuantConfig(w_bits=3, a_bits=3), torch.zeros(1, 3, 32, 32))
    fp = float_copy(q)
    unit = "layer2.1"
    fp_in, fp_out = capture_unit_io(fp, unit, images, 32)
    block = dict(q.named_modules())[unit]
    calibrate_unit_(block, fp_in, fp_in, fp_out, CalibConfig(iters=0), seed=0)  # nearest rounding, init ranges
    with torch.no_grad():
        before = reconstruction_loss(block(fp_in), fp_out)
    q2 = quantize(model, QuantConfig(w_bits=3, a_bits=3), torch.zeros(1, 3, 32, 32))
    block2 = dict(q2.named_modules())[unit]
    calibrate_unit_(block2, fp_in, fp_in, fp_out, CalibConfig(iters=300, batch_size=32), seed=0)
    with torch.no_grad():
        after = reconstruction_loss(block2(fp_in), fp_out)
    assert after < 0.9 * before, (before, after)
    ws, acts = quantizers(block2)
    assert all(w.mode == "hard" for w in ws)
    assert all(a.drop_prob == 0 for a in acts)
    assert all(not p.requires_grad for p in block2.parameters())


def _small_calib() -> CalibConfig:
    return CalibConfig(iters=8, batch_size=8)


def test_reconstruct_ends_hard_and_deterministic(tiny_net: nn.Module) -> None:
    images = torch.randn(16, 3, 16, 16)
    q1 = reconstruct_(quantize(tiny_net, QuantConfig(w_bits=2, a_bits=4), X), images, _small_calib(), seed=3)
    q2 = reconstruct_(quantize(tiny_net, QuantConfig(w_bits=2, a_bits=4), X), images, _small_calib(), seed=3)
    for (k, a), b in zip(q1.state_dict().items(), q2.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    for w in quantizers(q1)[0]:
        assert w.mode == "hard"
    x = torch.randn(4, 3, 16, 16)
    assert torch.isfinite(q1(x)).all()


def test_reconstruct_resumes_to_the_same_model(tiny_net: nn.Module) -> None:
    images = torch.randn(16, 3, 16, 16)
    full = reconstruct_(quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4), X), images, _small_calib(), seed=1)
    saved = {}
    partial = quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4), X)

    class Interrupt(Exception):
        pass

    def checkpoint(k: int) -> None:
        saved.update(next_unit=k + 1, state=partial.state_dict())
        if k == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        reconstruct_(partial, images, _small_calib(), seed=1, on_unit=checkpoint)
    resumed = quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4), X)
    resumed.load_state_dict(saved["state"])
    reconstruct_(resumed, images, _small_calib(), seed=1, start_unit=saved["next_unit"])
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(full(x), resumed(x))


def test_a_minibatch_larger_than_the_set_is_refused_not_shrunk(tiny_net: nn.Module) -> None:
    q = quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4), X)
    with pytest.raises(ConfigError, match="got 8, more than the 6 calibration images; set it to at most 6"):
        reconstruct_(q, torch.randn(6, 3, 16, 16), _small_calib(), seed=0)


def test_public_calibrate_resolves_bits_and_preset(tiny_net: nn.Module) -> None:
    """sadag.calibrate resolves its RunConfig as every entry point does: `bits` and the preset are honoured."""
    import sadag
    from sadag.models.spec import DataSpec

    seen: dict[str, int] = {}
    spec = DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16, num_classes=10)
    cfg = sadag.RunConfig(model="unused", bits="2/4", preset="smoke")
    q = sadag.calibrate(tiny_net, spec, torch.randn(16, 3, 16, 16), cfg, None,
                        progress=lambda stage, step, total, metrics: seen.setdefault("total", total))
    assert (q.sadag_plan.config["w_bits"], q.sadag_plan.config["a_bits"]) == (2, 4)
    assert seen["total"] == 20  # the smoke preset's iterations per unit, not the paper's 20,000


@pytest.mark.parametrize("images,wrong", [
    (torch.randn(6, 3, 16, 16, dtype=torch.float64), r"of dtype torch.float64 for a model in torch.float32: convert "
                                                     r"them with images.to\(torch.float32\)"),
    (torch.zeros(6, 3, 16, 16, dtype=torch.uint8), r"of dtype torch.uint8: give float images normalised as the model "
                                                   "expects"),
    (torch.randn(3, 16, 16), r"of shape \(3, 16, 16\): give a 4-d batch \(N, 3, H, W\)"),
    (torch.randn(6, 3, 16, 16, device="meta"), r"on meta for a model on cpu: move them with images.to\('cpu'\)"),
], ids=["float64", "uint8", "3-d", "device"])
def test_images_of_another_dtype_rank_or_device_are_refused(tiny_net: nn.Module, images: torch.Tensor,
                                                            wrong: str) -> None:
    q = quantize(tiny_net, QuantConfig(w_bits=4, a_bits=4), X)
    with pytest.raises(ConfigError, match="calibration images " + wrong):
        reconstruct_(q, images, CalibConfig(iters=0, batch_size=2))


class ViewHead(nn.Module):
    """Flattens with view, which needs a contiguous input: fails on channels_last activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


def _view_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ViewHead()).eval()


def test_a_unit_that_needs_contiguous_inputs_is_calibrated_contiguous(caplog: pytest.LogCaptureFixture) -> None:
    images, cfg = torch.randn(16, 3, 8, 8), QuantConfig(w_bits=4, a_bits=4, units=["2"])
    with caplog.at_level("WARNING", logger="sadag.reconstruction.reconstruct"):
        fused = reconstruct_(quantize(_view_net(), cfg, images[:1]), images, CalibConfig(iters=4, batch_size=8,
                                                                                         engine="fused"))
    warned = [r.getMessage() for r in caplog.records if "channels_last" in r.getMessage()]
    assert len(warned) == 1 and "unit 2/2 (2)" in warned[0] and "view size is not compatible" in warned[0]
    eager = reconstruct_(quantize(_view_net(), cfg, images[:1]), images, CalibConfig(iters=4, batch_size=8,
                                                                                     engine="eager"))
    assert torch.allclose(fused(images), eager(images), atol=1e-5)  # no BatchNorm to fuse: the same function


class GuardedBlock(nn.Module):
    """Wraps its block call in ``try/except Exception``, re-raising with context: capture's stop signal must
    pass through."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            x = self.block(self.stem(x))
        except Exception as e:
            raise RuntimeError("the block failed") from e
        return self.fc(x.mean((2, 3)))


def test_capture_stops_through_a_models_own_exception_handler() -> None:
    torch.manual_seed(0)
    model, images = GuardedBlock().eval(), torch.randn(8, 3, 8, 8)
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4), images[:1])
    reconstruct_(q, images, CalibConfig(iters=2, batch_size=4))
    assert all(a.ready for n, a in q.named_modules() if n.endswith("input_quantizer") and a.bits is not None)


def test_a_fixed_weight_step_size_gets_no_gradient(tiny_net: nn.Module) -> None:
    q = quantize(tiny_net, QuantConfig(w_bits=2, a_bits=4), X)
    ws = quantizers(q)[0]
    before = [w.scale.clone() for w in ws]
    reconstruct_(q, torch.randn(16, 3, 16, 16), CalibConfig(iters=4, batch_size=8, lr_w_scale=0.0))
    assert all(w.scale.grad is None for w in ws)  # no wasted backward into it, no stale .grad left behind
    assert all(torch.equal(w.scale, s) for w, s in zip(ws, before, strict=True))
    assert all(w.alpha.grad is not None for w in ws)  # the rounding was trained


def test_tf32_mode_uses_the_new_api_and_restores_the_users_setting() -> None:
    """Set with the fp32_precision API, torch refuses reads of the legacy allow_tf32 flags: the user's choice
    must survive (only global flags: runs on a CPU build too)."""
    from sadag.reconstruction.reconstruct import tf32_mode

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision, conv.fp32_precision = "tf32", "ieee"  # the user's, with the new API
        for enabled, inside in [(False, "ieee"), (True, "tf32")]:
            with tf32_mode(enabled, torch.device("cuda")):
                assert (matmul.fp32_precision, conv.fp32_precision) == (inside, inside)
            assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
