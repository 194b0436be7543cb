"""ImageNet models from torchvision, an optional dependency imported only when one is built."""

from __future__ import annotations

from types import ModuleType

from torch import nn

from ..errors import ModelError
from ..quantization.units import register_unit_type
from .registry import IMAGENET_SPEC, PretrainedLoader, register_model
from .weights import load_checkpoint, sha256_in_name

_SOURCE = "torchvision"

# Reconstruction units by qualified name: torchvision stays unimported until a model is built, and a
# torchvision ResNet or MobileNetV2 the user builds and passes to sadag.quantize gets its blocks as units.
for _block in ("torchvision.models.resnet.BasicBlock", "torchvision.models.resnet.Bottleneck",
               "torchvision.models.mobilenetv2.InvertedResidual"):
    register_unit_type(_block)


def _torchvision() -> ModuleType:
    try:
        import torchvision
    except ImportError as e:
        raise ModelError("torchvision is not installed: pip install 'sadag[vision]'") from e
    return torchvision


def _pretrained(weights_enum: str) -> PretrainedLoader:
    """Loader for torchvision's published weights, fetched by sadag's own download: cached under $SADAG_HOME,
    the sha256 prefix in torchvision's file name checked on every load (torch.hub checks it only when it
    downloads, so a replaced cached file would load unchecked), read with the safe loader."""

    def load(model: nn.Module) -> None:
        url = _torchvision().models.get_weight(weights_enum).url
        load_checkpoint(model, url, sha256_prefix=sha256_in_name(url))

    return load


# V1 weights everywhere: the reference accuracies of the PTQ literature (BRECQ, Genie) use them.
@register_model("resnet18", spec=IMAGENET_SPEC, source=_SOURCE,
                pretrained_loader=_pretrained("ResNet18_Weights.IMAGENET1K_V1"))
def resnet18() -> nn.Module:
    return _torchvision().models.resnet18(weights=None)


@register_model("resnet50", spec=IMAGENET_SPEC, source=_SOURCE,
                pretrained_loader=_pretrained("ResNet50_Weights.IMAGENET1K_V1"))
def resnet50() -> nn.Module:
    return _torchvision().models.resnet50(weights=None)


@register_model("mobilenet_v2", spec=IMAGENET_SPEC, source=_SOURCE,
                pretrained_loader=_pretrained("MobileNet_V2_Weights.IMAGENET1K_V1"))
def mobilenet_v2() -> nn.Module:
    return _torchvision().models.mobilenet_v2(weights=None)
