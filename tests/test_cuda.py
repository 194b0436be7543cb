"""The CUDA path: every tensor of the quantized model on the GPU, the same quantized output as on the CPU,
and the whole zero-shot chain (Genie-D, warm-up calibration, SADAG refinement) running there.
Marked `cuda`: skipped on machines without CUDA (CI); run on a GPU machine with `python -m pytest -m cuda`."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from sadag import CalibConfig, DataSpec, GenConfig, QuantConfig, quantize, reconstruct_
from sadag.errors import ConfigError
from sadag.generation import generate_genie, refine_sadag

pytestmark = pytest.mark.cuda  # skipped without a CUDA device (conftest)
SPEC = DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16, num_classes=10)
GEN = GenConfig(num_images=16, batch_size=8, genie_iters=4, refine_iters=3, plateau_patience=2)


def test_quantized_model_lives_on_the_gpu(tiny_net: torch.nn.Module) -> None:
    qmodel = quantize(tiny_net.cuda(), QuantConfig(4, 4), torch.zeros(1, 3, 16, 16, device="cuda"))
    on_cpu = [n for n, t in [*qmodel.named_parameters(), *qmodel.named_buffers()] if not t.is_cuda]
    assert not on_cpu, f"left on the CPU: {on_cpu}"


def test_gpu_quantized_output_matches_cpu(tiny_net: torch.nn.Module) -> None:
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    qcpu = reconstruct_(quantize(tiny_net, QuantConfig(4, 4), images[:1]), images, CalibConfig(iters=0))
    qgpu = copy.deepcopy(qcpu).cuda()
    with torch.no_grad():
        diff = (qgpu(images.cuda()).cpu() - qcpu(images)).abs().mean()
    assert diff < 1e-3  # only a rare rounding tie may land differently


def test_zero_shot_chain_on_the_gpu(tiny_net: torch.nn.Module) -> None:
    model = tiny_net.cuda()
    batches = generate_genie(model, SPEC, GEN, seed=0)
    warmup = torch.cat([b.images for b in batches]).cuda()
    qmodel = reconstruct_(quantize(model, QuantConfig(4, 4), warmup[:1]), warmup, CalibConfig(iters=4, batch_size=8))
    for neighbor in ("random", "adversarial"):
        refined = refine_sadag(model, qmodel, batches, SPEC, replace(GEN, neighbor=neighbor), seed=0)
        assert refined.shape == (16, 3, 16, 16) and torch.isfinite(refined).all()
        assert not torch.equal(refined, torch.cat([b.images for b in batches]))


def test_calibration_keeps_a_tf32_choice_made_with_the_new_api(tiny_net: torch.nn.Module) -> None:
    """torch refuses reads of the legacy allow_tf32 flags once fp32_precision is set: calibration (compiled,
    the CUDA default) must use the new API and leave the user's choice as it found it."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    images = torch.randn(16, 3, 16, 16, device="cuda")
    try:
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
        qmodel = quantize(tiny_net.cuda(), QuantConfig(4, 4), images[:1])
        reconstruct_(qmodel, images, CalibConfig(iters=2, batch_size=8))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_cpu_images_for_a_gpu_model_are_refused(tiny_net: torch.nn.Module) -> None:
    qmodel = quantize(tiny_net.cuda(), QuantConfig(4, 4), torch.zeros(1, 3, 16, 16, device="cuda"))
    with pytest.raises(ConfigError, match=r"calibration images on cpu for a model on cuda:0: move them with "
                                          r"images.to\('cuda:0'\)"):
        reconstruct_(qmodel, torch.randn(8, 3, 16, 16), CalibConfig(iters=0, batch_size=8))
