"""A module's train/eval modes, each submodule's own, kept across work that needs eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's mode is restored after, even on error (``m.train(flag)``
    would set them all alike, undoing a caller's mixed modes such as BatchNorm frozen while fine-tuning)."""
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for sub, training in modes:
            sub.training = training
