"""Model zoo: ``load_model(name)`` returns a pretrained classifier in eval mode and its DataSpec."""

from . import cifar_resnet, efficientnet_lite, pytorchcv_resnet, torchvision_models  # noqa: F401 (registers)
from .registry import IMAGENET_SPEC, ModelInfo, get_model_info, list_models, load_model, register_model
from .spec import DataSpec
from .weights import load_checkpoint

__all__ = [
    "DataSpec",
    "IMAGENET_SPEC",
    "ModelInfo",
    "get_model_info",
    "list_models",
    "load_checkpoint",
    "load_model",
    "register_model",
]
