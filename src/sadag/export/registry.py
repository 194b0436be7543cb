"""Export formats by name: ``export_model(model, path, "onnx")``. A format is a writer plus one registration.

A writer is ``writer(qmodel, path, **options) -> Path``; ``register_exporter`` adds it under a name and a
file suffix (so the format can be inferred from the output path). The built-in formats are registered in
``sadag.export``; a new one is its module and a ``register_exporter`` call.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, ExportFormatError

Writer = Callable[..., Path]


@dataclass(frozen=True)
class Exporter:
    name: str
    writer: Writer
    suffix: str  # ".onnx": the output file's ending, used to infer the format
    description: str = ""


_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, writer: Writer, *, suffix: str, description: str = "") -> Writer:
    """Make ``writer(qmodel, path, **options) -> Path`` available as format ``name``; returns ``writer``."""
    if name in _EXPORTERS:
        raise ValueError(f"export format {name!r} is registered twice")
    if not suffix.startswith("."):
        raise ValueError(f"suffix must start with a dot, got {suffix!r}")
    _EXPORTERS[name] = Exporter(name, writer, suffix, description)
    return writer


def list_exporters() -> list[Exporter]:
    return [_EXPORTERS[k] for k in sorted(_EXPORTERS)]


def get_exporter(name: str) -> Exporter:
    if name not in _EXPORTERS:
        raise ConfigError(f"unknown export format {name!r}; valid formats: {', '.join(sorted(_EXPORTERS))}")
    return _EXPORTERS[name]


def infer_exporter(path: str | Path) -> Exporter:
    """The exporter whose suffix ends ``path``'s name; refused when none or several do."""
    name = Path(path).name
    found = [e for e in _EXPORTERS.values() if name.endswith(e.suffix)]
    if len(found) != 1:
        known = ", ".join(f"{e.name} ({e.suffix})" for e in list_exporters())
        raise ConfigError(f"cannot tell the export format from {name!r}; give the format (--format): {known}")
    return found[0]


def export_model(qmodel: nn.Module, path: str | Path, fmt: str | None = None, **options: Any) -> Path:
    """Write a calibrated quantized model as format ``fmt`` (inferred from ``path``'s suffix when None).

    ``options`` go to the format's writer (e.g. ``opset=21`` for onnx; ``model_name``, ``spec`` and
    ``quant_config`` for safetensors). Returns the written file.
    """
    path = Path(path)
    exporter = get_exporter(fmt) if fmt is not None else infer_exporter(path)
    try:
        inspect.signature(exporter.writer).bind(qmodel, path, **options)
    except TypeError as e:
        params = [p for p in inspect.signature(exporter.writer).parameters][2:]
        raise ConfigError(f"export format {exporter.name!r}: {e}; its options are: {', '.join(params)}") from e
    writable_target(path)
    try:
        return exporter.writer(qmodel, path, **options)
    except OSError as e:
        raise unwritable(path, e) from e


def writable_target(path: Path) -> None:
    """Refuse, before any work, an output path that is a directory, lies under a file or is not writable."""
    if path.is_dir():
        raise ExportFormatError(f"cannot export to {path}: it is a directory; give a file path such as "
                                f"{path / ('model' + (path.suffix or '.onnx'))}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise unwritable(path, e) from e


def unwritable(path: Path, error: BaseException) -> ExportFormatError:
    return ExportFormatError(f"cannot write the export to {path} ({error}): choose a path in a writable directory "
                             "(no part of it may be an existing file)")
