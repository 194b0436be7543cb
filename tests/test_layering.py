"""The package layering: no import cycle between sadag's packages, quantization below everything that
uses it, and no model family named in generic code (families register their blocks in sadag.models)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import sadag

SRC = Path(sadag.__file__).resolve().parent
FAMILY_WORDS = re.compile(r"BasicBlock|Bottleneck|MBConv|InvertedResidual|static_padding|efficientnet|resnet",
                          re.IGNORECASE)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the sadag modules ``path`` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` imports module x
    return {f for f in found if f == "sadag" or f.startswith("sadag.")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _layer(module: str) -> str:
    """The top-level package or module under sadag: 'sadag.quantization.units' -> 'quantization'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sadag"


def test_every_submodule_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages([str(SRC)], prefix="sadag.")]
    assert "sadag.quantization.units" in names
    for name in names:
        importlib.import_module(name)


ABOVE = {"generation", "pipeline", "run", "models", "export", "cli", "reporting"}


@pytest.mark.parametrize(("package", "forbidden"), [("quantization", ABOVE | {"reconstruction"}),
                                                    ("reconstruction", ABOVE)])
def test_generic_packages_do_not_import_above_them(package: str, forbidden: set[str]) -> None:
    for module, deps in _graph().items():
        if _layer(module) == package:
            bad = sorted(d for d in deps if _layer(d) in forbidden)
            assert not bad, f"{module} imports {bad}"


def test_no_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        if module == "sadag":  # the root re-exports everything by design
            continue
        edges.setdefault(_layer(module), set()).update(_layer(d) for d in deps if _layer(d) not in ("sadag",))
    for node in edges:
        edges[node].discard(node)

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(edges.get(start, ()))
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(edges.get(n, ()))
        return seen

    cycles = sorted(n for n in edges if n in reach(n))
    assert not cycles, f"packages in an import cycle: {cycles} ({ {n: sorted(edges[n]) for n in cycles} })"


def test_generic_code_names_no_model_family() -> None:
    for package in ("quantization", "reconstruction"):
        for path in (SRC / package).rglob("*.py"):
            hits = FAMILY_WORDS.findall(path.read_text())
            assert not hits, f"{path.relative_to(SRC)} names model families: {sorted(set(hits))}"
