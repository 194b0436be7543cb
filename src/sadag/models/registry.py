"""Named model factories and the single entry point ``load_model``."""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ModelError
from .spec import DataSpec
from .weights import load_checkpoint

log = logging.getLogger(__name__)

IMAGENET_SPEC = DataSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=224,
                         num_classes=1000, resize=256)

Factory = Callable[[], nn.Module]
PretrainedLoader = Callable[[nn.Module], None]
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: how to build it, what input it expects, where its weights come from."""

    name: str
    spec: DataSpec
    factory: Factory
    weights_url: str | None = None
    sha256: str | None = None  # full digest or prefix of the checkpoint file
    sha1: str | None = None  # pytorchcv publishes sha1 digests instead
    source: str = ""
    pretrained_loader: PretrainedLoader | None = None  # overrides weights_url (torchvision, pip packages)

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def weights(self) -> str:
        """Human-readable origin of the pretrained weights."""
        return self.weights_url or self.source or "none"


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, spec: DataSpec, weights_url: str | None = None, sha256: str | None = None,
                   source: str = "", sha1: str | None = None,
                   pretrained_loader: PretrainedLoader | None = None) -> Callable[[Factory], Factory]:
    """Decorator registering an architecture factory (``factory() -> nn.Module``, random init)."""

    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(name, spec, factory, weights_url, sha256, sha1, source, pretrained_loader)
        return factory

    return deco


def list_models() -> list[ModelInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(sorted(_REGISTRY))} "
                         f"(or 'package.module:factory' for your own model)")
    return _REGISTRY[name]


def load_model(name_or_module: str | nn.Module, weights: str | None = None, pretrained: bool = True,
               spec: DataSpec | None = None, *, trust_checkpoint: bool = False) -> tuple[nn.Module, DataSpec]:
    """Build a model in eval mode and return it with its preprocessing spec.

    ``name_or_module``: a registered name, ``"package.module:factory"`` or an ``nn.Module``.
    ``weights``: a checkpoint path or URL overriding the default pretrained weights.
    ``pretrained=False`` keeps the random initialisation (registered models only).
    ``spec`` overrides the spec of custom models (ImageNet defaults when neither gives one).
    ``trust_checkpoint=True`` lets ``weights`` pickle arbitrary Python objects, which can run code:
    only for a file you trust (``--trust-checkpoint``).
    """
    if isinstance(name_or_module, nn.Module):
        model, found = name_or_module, None
    elif isinstance(name_or_module, str) and is_import_path(name_or_module):
        model, found = _import_factory(name_or_module)
    elif isinstance(name_or_module, str):
        model, found = _build_registered(get_model_info(name_or_module), weights, pretrained, trust_checkpoint)
        weights = None  # already loaded
    else:
        raise ModelError(f"expected a model name or an nn.Module, got {type(name_or_module).__name__}")
    if weights is not None:
        load_checkpoint(model, weights, trust_checkpoint=trust_checkpoint)
    final = spec or found or _default_spec(name_or_module)
    model.eval()
    model.sadag_spec = final
    return model, final


def is_import_path(name: str) -> bool:
    """Whether ``name`` is a ``package.module:factory`` path, which load_model imports and calls."""
    return bool(_IMPORT_PATH.match(name))


def _build_registered(info: ModelInfo, weights: str | None, pretrained: bool,
                      trust_checkpoint: bool) -> tuple[nn.Module, DataSpec]:
    model = info.factory()
    if weights is not None:
        # The published digest only applies when the user points at the published file itself.
        same = weights == info.weights_url
        load_checkpoint(model, weights, info.sha256 if same else None, info.sha1 if same else None,
                        trust_checkpoint=trust_checkpoint)
    elif pretrained and info.pretrained_loader is not None:
        info.pretrained_loader(model)
    elif pretrained and info.weights_url:
        load_checkpoint(model, info.weights_url, info.sha256, info.sha1)
    elif pretrained:
        log.warning("model %s has no pretrained weights; it keeps its random initialisation", info.name)
    return model, info.spec


def _import_factory(path: str) -> tuple[nn.Module, DataSpec | None]:
    mod_name, fn_name = path.split(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import {path!r}: {e}") from e
    out = factory()
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], DataSpec):
        out, found = out
    else:
        found = None
    if not isinstance(out, nn.Module):
        raise ModelError(f"{path} returned {type(out).__name__}; it must return an nn.Module "
                         f"or (nn.Module, DataSpec)")
    return out, found


def _default_spec(what: object) -> DataSpec:
    label = what if isinstance(what, str) else type(what).__name__
    log.warning("no DataSpec given for %s: assuming ImageNet preprocessing (224x224, 1000 classes, "
                "mean/std 0.485,0.456,0.406/0.229,0.224,0.225); pass a DataSpec if that is wrong", label)
    return IMAGENET_SPEC
