"""The generation-method table: a method is a name, an optional config dataclass and a function of a
:class:`sadag.generation.registry.GenerationContext` returning the calibration images.

Adding a method takes one module that calls :func:`register_method` (plus its import where it should be
registered by default): the CLI's ``--method`` choices, the config checks and the pipeline all read this table.
It imports nothing of sadag but its errors, so the config layer can read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Generate = Callable[[Any], Any]  # (GenerationContext) -> images (N, 3, S, S)


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
