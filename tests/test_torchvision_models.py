"""torchvision's ImageNet models built for real: units, shared block inputs, quantize, calibrate.

Skipped where torchvision is not installed (as in CI, which keeps the suite free of it); run it with
`pip install 'sadag[vision]'`. Weights are torchvision's random initialization: no download.
"""

from __future__ import annotations

import pytest
import torch

from sadag.config import CalibConfig, QuantConfig
from sadag.models import load_model
from sadag.quantization.prepare import freeze_, quantize
from sadag.quantization.units import find_units
from sadag.reconstruction.reconstruct import reconstruct_

pytest.importorskip("torchvision")

RESNET50_BLOCKS = [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3), strict=True) for b in range(n)]
# name -> (units, a block whose input two convs read, those convs)
EXPECTED = {
    "resnet18": (["conv1", *[f"layer{s}.{b}" for s in range(1, 5) for b in range(2)], "fc"],
                 "layer2.0", ["layer2.0.conv1", "layer2.0.downsample.0"]),
    "resnet50": (["conv1", *RESNET50_BLOCKS, "fc"], "layer1.0", ["layer1.0.conv1", "layer1.0.downsample.0"]),
    "mobilenet_v2": (["features.0.0", *[f"features.{i}" for i in range(1, 18)], "features.18.0", "classifier.1"],
                     "features.2", ["features.2.conv.0.0"]),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_torchvision_model_units_quantize_and_calibrate(name: str) -> None:
    model, spec = load_model(name, pretrained=False)
    assert (spec.num_classes, spec.input_size) == (1000, 224)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)  # adaptive pooling takes any size; 64x64 keeps the test quick
    units, block, readers = EXPECTED[name]
    assert find_units(model, x[:1]) == units
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4), x[:2])
    assert sorted(q.sadag_plan.block_inputs[block]) == readers
    freeze_(reconstruct_(q, x, CalibConfig(iters=2, batch_size=2)))
    out = q(x)
    assert out.shape == (4, 1000) and torch.isfinite(out).all()
