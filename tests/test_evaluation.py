"""evaluate(): refuses what it cannot score honestly (uncalibrated activation quantizers, misshapen logits or
labels) instead of reporting a wrong accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TinyNet, tiny_bn_model
from sadag import CalibConfig, QuantConfig, evaluate, quantize, reconstruct_
from sadag.errors import ConfigError, DataError, ModelError
from sadag.quantization.prepare import set_quant_state_

X = torch.zeros(1, 3, 16, 16)
GEN = torch.Generator().manual_seed(0)
IMAGES = torch.randn(16, 3, 16, 16, generator=GEN)
BATCHES = [(IMAGES[:8], torch.arange(8)), (IMAGES[8:], torch.arange(8) + 2)]
NEVER = r"activation quantizers .* were never calibrated .*reconstruct_\(qmodel, images, CalibConfig\(\.\.\.\)\).*"


def test_uncalibrated_activation_quantizers_are_refused_not_scored_weights_only() -> None:
    model = tiny_bn_model()[0]
    qmodel = quantize(model, QuantConfig(w_bits=4, a_bits=2), X)
    with pytest.raises(ConfigError, match=NEVER + r"CalibConfig\(iters=0\) gives the round-to-nearest baseline"):
        evaluate(qmodel, BATCHES)
    reconstruct_(qmodel, IMAGES, CalibConfig(iters=0, batch_size=8))  # what the message proposes
    assert evaluate(qmodel, BATCHES)["num_images"] == 16


def test_models_without_activation_quantization_still_evaluate() -> None:
    model = tiny_bn_model()[0]
    assert evaluate(model, BATCHES)["num_images"] == 16  # FP
    assert evaluate(quantize(model, QuantConfig(w_bits=4, a_bits=None), X), BATCHES)["num_images"] == 16
    weights_only = set_quant_state_(quantize(model, QuantConfig(w_bits=4, a_bits=4), X), acts=False)
    assert evaluate(weights_only, BATCHES)["num_images"] == 16


class WithUnusedHead(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(16, 3)  # never called: calibration cannot reach its input quantizer


def test_the_input_quantizer_of_a_layer_never_called_is_exempt() -> None:
    torch.manual_seed(0)
    qmodel = quantize(WithUnusedHead().eval(), QuantConfig(w_bits=4, a_bits=4), X)
    reconstruct_(qmodel, IMAGES, CalibConfig(iters=0, batch_size=8))
    assert qmodel.aux.input_quantizer.bits == 4 and not qmodel.aux.input_quantizer.ready
    assert evaluate(qmodel, BATCHES)["num_images"] == 16


class Logits(nn.Module):
    """Fixed (N, C, *extra) logits: image i ranks the classes i, i + 1, ... (mod C) first, second, ..."""

    def __init__(self, classes: int = 6, extra: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.classes, self.extra = classes, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = (torch.arange(self.classes)[None, :] - torch.arange(x.shape[0])[:, None]) % self.classes
        return (-rank).float().reshape(x.shape[0], self.classes, *self.extra)


def test_labels_of_shape_n_by_1_score_as_flat_labels() -> None:
    images, labels = torch.zeros(4, 3, 2, 2), torch.tensor([0, 1, 4, 2])  # ranked 1st, 1st, 3rd, 6th
    flat = evaluate(Logits(), [(images, labels)])
    assert flat["top1"] == 50.0 and flat["top5"] == 75.0
    assert evaluate(Logits(), [(images, labels[:, None])]) == flat  # was top-5 275% (broadcast to N x N)


@pytest.mark.parametrize("extra", [(1, 1), (1,)])
def test_logits_must_be_n_by_classes(extra: tuple[int, ...]) -> None:
    with pytest.raises(ModelError, match=r"outputs of shape \(4, 6, 1.*for 4 images; evaluation needs logits of "
                                         r"shape \(4, classes\)"):
        evaluate(Logits(extra=extra), [(torch.zeros(4, 3, 2, 2), torch.arange(4))])


@pytest.mark.parametrize("labels", [torch.zeros(4, 2, dtype=torch.long), torch.arange(3), torch.zeros(4, 1, 1,
                                                                                                     dtype=torch.long)])
def test_labels_must_be_one_per_image(labels: torch.Tensor) -> None:
    with pytest.raises(DataError, match=r"batch 1: labels of shape .* for 4 images; give one class index per image, "
                                        r"of shape \(4,\) or \(4, 1\)"):
        evaluate(Logits(), [(torch.zeros(4, 3, 2, 2), labels)])


@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([True, False, True, False])])
def test_labels_must_be_integers(labels: torch.Tensor) -> None:
    with pytest.raises(DataError, match=r"labels of dtype torch\.(float32|bool); give integer class indices"):
        evaluate(Logits(), [(torch.zeros(4, 3, 2, 2), labels)])


@pytest.mark.parametrize("bad", [6, -1])
def test_labels_must_index_the_models_classes(bad: int) -> None:
    batches = [(torch.zeros(4, 3, 2, 2), torch.arange(4)), (torch.zeros(4, 3, 2, 2), torch.tensor([0, bad, 1, 2]))]
    with pytest.raises(DataError, match=r"evaluate: 1 of 8 labels are not class indices of the model's output \(0 to "
                                        r"5\)"):
        evaluate(Logits(), batches)
