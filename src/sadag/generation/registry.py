"""The generation-method registry: a method is a name, an optional config dataclass and a function of a
:class:`GenerationContext` returning the calibration images.

Adding a method takes one module that calls :func:`register_method` (plus its import where it should be
registered by default): the CLI's ``--method`` choices, the config checks and the pipeline all read this table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.spec import DataSpec
from .common import Progress

if TYPE_CHECKING:
    from ..config import GenConfig, RunConfig


class StateStore(Protocol):
    """Where a method checkpoints finished work (a run directory's ``state/``); plain data only."""

    def load_state(self, name: str) -> Any | None: ...

    def save_state(self, name: str, obj: Any) -> None: ...


@contextlib.contextmanager
def _untimed(_name: str) -> Iterator[None]:
    yield


@dataclass
class GenerationContext:
    """What a generation method gets: the frozen FP model, the run's resolved config and the run's services.

    ``store`` is None outside a run directory (nothing is checkpointed); ``calibrate(images, iters, name)``
    quantizes and reconstructs a copy of the model at the run's bits (checkpointed under ``name``);
    ``publish(name, qmodel)`` saves a quantized model next to the set as ``name.safetensors``; whatever the
    method puts in ``artifacts`` (tensors and plain containers) is saved with the set, for later methods.
    """

    model: nn.Module
    spec: DataSpec
    cfg: RunConfig
    options: Any = None  # the method's own config dataclass, filled from cfg.method_options
    progress: Progress | None = None
    store: StateStore | None = None
    stage: Callable[[str], contextlib.AbstractContextManager[None]] = _untimed
    calibrate: Callable[[Tensor, int, str], nn.Module] | None = None
    publish: Callable[[str, nn.Module], None] | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def gen(self) -> GenConfig:
        return self.cfg.gen

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_state(self, name: str) -> Any | None:
        return self.store.load_state(name) if self.store is not None else None

    def save_state(self, name: str, obj: Any) -> None:
        if self.store is not None:
            self.store.save_state(name, obj)


Generate = Callable[[GenerationContext], Tensor]


@dataclass(frozen=True)
class GenerationMethod:
    name: str
    generate: Generate
    config: type | None = None  # a dataclass of the method's own options (RunConfig.method_options)
    help: str = ""


METHODS: dict[str, GenerationMethod] = {}


def register_method(name: str, *, config: type | None = None, help: str = "") -> Callable[[Generate], Generate]:  # noqa: A002
    """Decorator: register ``fn(ctx) -> images`` ((N, 3, S, S), the model's normalized input space) as ``name``."""
    if name == "real" or name in METHODS:
        raise ConfigError(f"generation method {name!r} is already taken")

    def add(fn: Generate) -> Generate:
        METHODS[name] = GenerationMethod(name, fn, config, help)
        return fn

    return add


def get_method(name: str) -> GenerationMethod:
    if name not in METHODS:
        raise ConfigError(f"method: got {name!r}; allowed: {', '.join(method_names())}, real")
    return METHODS[name]


def method_names() -> list[str]:
    return list(METHODS)
