"""What a generation method is given: :class:`GenerationContext`. The method table itself is
:mod:`sadag.methods` (a leaf module, so that the config checks can read it without importing generation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..distributed import SINGLE, Ranks
from ..models.spec import DataSpec
from ..rundir import StateStore
from .common import Progress

if TYPE_CHECKING:
    from ..config import GenConfig, RunConfig


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
    ``ranks``: the torchrun processes sharing the work (one by default); a method that shards its batches
    gives every rank the whole set, and only rank 0's ``store`` writes.
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
    ranks: Ranks = SINGLE

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

    def drop_state(self, name: str) -> None:
        """Forget a checkpoint whose work is saved in another form (a finished stage's mid-stage state)."""
        if self.store is not None:
            self.store.drop_state(name)
