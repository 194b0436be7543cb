"""Named model factories and the single entry point ``load_model``."""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..modes import eval_mode
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
               spec: DataSpec | None = None, *, trust_checkpoint: bool = False,
               device: torch.device | str | None = None) -> tuple[nn.Module, DataSpec]:
    """Build a model in eval mode and return it with its preprocessing spec.

    ``name_or_module``: a registered name, ``"package.module:factory"`` or an ``nn.Module``.
    ``weights``: a checkpoint path or URL overriding the default pretrained weights.
    ``pretrained=False`` keeps the random initialisation (registered models only).
    ``spec`` overrides the spec of custom models; without it, the one the factory returns (``(model, spec)``) or
    the module carries (``model.sadag_spec``, which load_model sets), else ImageNet defaults with a warning.
    ``trust_checkpoint=True`` lets ``weights`` pickle arbitrary Python objects, which can run code:
    only for a file you trust (``--trust-checkpoint``).

    ``device``: where the model goes before it is checked (a model whose forward runs only on a GPU is checked
    there); None leaves it where it is.

    One forward pass on zeros of the spec's input size checks that the model fits its spec (the input size runs,
    ``num_classes`` outputs): a ModelError says what does not fit.
    """
    if isinstance(name_or_module, nn.Module):
        model, label = name_or_module, type(name_or_module).__name__
        found = _own_spec(model, label) if spec is None else None
        origin = f"the sadag_spec attribute of the {label}"
    elif isinstance(name_or_module, str) and is_import_path(name_or_module):
        model, found, origin = _import_factory(name_or_module)
        label = name_or_module
    elif isinstance(name_or_module, str):
        model, found = _build_registered(get_model_info(name_or_module), weights, pretrained, trust_checkpoint)
        weights, label = None, name_or_module  # already loaded
        origin = f"the spec registered for {name_or_module}"
    else:
        raise ModelError(f"expected a model name or an nn.Module, got {type(name_or_module).__name__}")
    if weights is not None:
        load_checkpoint(model, weights, trust_checkpoint=trust_checkpoint)
    if spec is not None:
        final, origin = spec, "the spec= argument"
    elif found is not None:
        final = found
    else:
        final, origin = IMAGENET_SPEC, None
    if device is not None:
        model = model.to(device)
    check_model_fits_spec(model, final, label, origin)
    if origin is None:
        log.warning("no DataSpec given for %s: assuming ImageNet preprocessing (224x224, 1000 classes, mean/std "
                    "0.485,0.456,0.406/0.229,0.224,0.225); pass a DataSpec if that is wrong", label)
    model.eval()
    model.sadag_spec = final
    return model, final


def check_model_fits_spec(model: nn.Module, spec: DataSpec, label: str, origin: str | None = None) -> None:
    """One forward pass (no grad, eval mode, the caller's modes restored) on zeros (2, 3, S, S), S =
    ``spec.input_size``: ModelError unless it runs and returns logits of shape (2, spec.num_classes).

    ``label`` names the model (a registered name, ``module:factory`` or the module's class); ``origin`` says where
    ``spec`` came from, for the message; None means no spec was given and ``spec`` is the ImageNet guess.
    """
    shape = (2, 3, spec.input_size, spec.input_size)
    ref = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    x = torch.zeros(shape, device=ref.device if ref is not None else None,
                    dtype=ref.dtype if ref is not None else None)
    cause: BaseException | None = None
    first_conv: list[tuple[str, int]] = []
    try:
        with torch.no_grad(), eval_mode(model), _first_conv(model, first_conv):
            out = model(x)
    except Exception as e:  # any failure here means the model does not fit its spec
        if first_conv and first_conv[0][1] != 3:
            name, channels = first_conv[0]
            raise ModelError(f"{label} takes {channels}-channel images (its first convolution {name} has "
                             f"in_channels={channels}): sadag supports 3-channel RGB models only; give it a model that "
                             "takes RGB images") from e
        problem = f"fails on an input of shape {shape}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        cause = e
    else:
        if not isinstance(out, torch.Tensor):
            problem = (f"returns a {type(out).__name__} for an input of shape {shape}; sadag needs a classifier "
                       f"whose forward returns one logits tensor (N, num_classes)")
        elif tuple(out.shape) != (2, spec.num_classes):
            problem = (f"returns shape {tuple(out.shape)} for an input of shape {shape}, where the spec says "
                       f"{spec.num_classes} classes, i.e. (2, {spec.num_classes})")
        else:
            return
    example = "DataSpec(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32, num_classes=10)"
    if is_import_path(label):
        declare = (f"have the factory return (model, DataSpec(...)) (from sadag.models import DataSpec), e.g. "
                   f"`return net, {example}` for a 32x32 10-class model, or set model.sadag_spec to such a DataSpec "
                   f"in it; in Python, load_model({label!r}, spec=DataSpec(...)) also works")
    else:
        declare = (f"pass it, e.g. `load_model(model, spec={example})` for a 32x32 10-class model, or set "
                   f"model.sadag_spec to such a DataSpec (from sadag.models import DataSpec)")
    if origin is None:
        raise ModelError(f"{label}: no DataSpec was given, so ImageNet's was assumed (224x224 inputs, 1000 classes), "
                         f"and the model {problem}. Declare the model's own spec: {declare}") from cause
    raise ModelError(f"{label} does not fit its DataSpec (input_size {spec.input_size}, num_classes "
                     f"{spec.num_classes}, from {origin}): the model {problem}. The spec's input_size and num_classes "
                     f"must match the model: correct that spec ({declare}), or the model") from cause


@contextlib.contextmanager
def _first_conv(model: nn.Module, seen: list[tuple[str, int]]) -> Iterator[None]:
    """Record in ``seen`` the (name, in_channels) of the first Conv2d the forward calls: it tells a model of
    another channel count from one that does not fit input_size or num_classes."""
    def hook(name: str, conv: nn.Conv2d) -> Callable[..., None]:
        return lambda _m, _args: None if seen else seen.append((name or type(conv).__name__, conv.in_channels))

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _own_spec(model: nn.Module, label: str) -> DataSpec | None:
    """The DataSpec a module carries (``sadag_spec``, set by load_model), if any."""
    own = getattr(model, "sadag_spec", None)
    if own is not None and not isinstance(own, DataSpec):
        raise ModelError(f"{label}.sadag_spec is a {type(own).__name__}, not a sadag DataSpec: set it to "
                         f"DataSpec(mean=..., std=..., input_size=..., num_classes=...) or delete it")
    return own


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


def _import_factory(path: str) -> tuple[nn.Module, DataSpec | None, str]:
    """(model, its spec or None, where the spec came from) from calling the factory ``path`` names."""
    mod_name, fn_name = path.split(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except ModuleNotFoundError as e:
        raise ModelError(f"cannot import {path!r}: {e}{_not_found_hint(e, mod_name)}") from e
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import {path!r}: {e}") from e
    needs = ("--model module:factory names a function (or class) that takes no arguments and returns the model, "
             "or (model, DataSpec)")
    if isinstance(factory, nn.Module):
        raise ModelError(f"{path} is an nn.Module instance ({type(factory).__name__}), not a factory: {needs}; "
                         f"e.g. add `def make_model(): return {fn_name}` to {mod_name} and use "
                         f"--model {mod_name}:make_model")
    if not callable(factory):
        raise ModelError(f"{path} is a {type(factory).__name__}, not a function: {needs}")
    try:
        out = factory()
    except TypeError as e:
        if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
            raise  # raised inside the factory's own code: the user's traceback says where
        raise ModelError(f"calling {path}() failed: {e}. The factory must take no arguments ({needs}): wrap it, "
                         f"e.g. `def make_model(): return {fn_name}(...)` with the arguments filled in") from e
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], DataSpec):
        out, found = out
        return _checked_module(out, path), found, f"the DataSpec returned by {path}"
    model = _checked_module(out, path)
    return model, _own_spec(model, path), f"the sadag_spec attribute of the model {path} returns"


def _checked_module(out: object, path: str) -> nn.Module:
    if not isinstance(out, nn.Module):
        raise ModelError(f"{path} returned {type(out).__name__}; it must return an nn.Module "
                         f"or (nn.Module, DataSpec)")
    return out


def _not_found_hint(e: ModuleNotFoundError, mod_name: str) -> str:
    """For a top-level module that is not on sys.path: where Python looks, and how to add the current folder."""
    top = mod_name.split(".")[0]
    if e.name != top:
        return ""  # the module was found; something it imports is missing
    here = Path.cwd()
    local = (here / f"{top}.py").is_file() or (here / top).is_dir()
    where = f"{top} is in the current folder, but" if local else "if it is a file of yours,"
    return (f" ({where} the `sadag` command does not search the current folder, unlike `python -m sadag`: "
            f"run `python -m sadag ...` from the folder that holds it, or set PYTHONPATH to that folder, e.g. "
            f"`PYTHONPATH=. sadag ...`)")
