"""Tables keyed by module class, filled by model families (``sadag.models``), read by quantization code.

A family registers a class object, or its qualified name ``"package.module.Class"`` when importing the
class now would import an optional dependency (torchvision, a pip model package): the name is matched
against a module's class (with :meth:`TypeTable.nearest`, also the classes it derives from) when a model is
quantized, so nothing is imported early.
"""

from __future__ import annotations

from typing import Generic, TypeVar

V = TypeVar("V")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class TypeTable(Generic[V]):
    """A mapping from exact module classes (or their qualified names) to values."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[type | str, V] = {}

    def register(self, key: type | str, value: V) -> None:
        if not isinstance(key, (type, str)):
            raise TypeError(f"{self.what}: register a class or a 'package.module.Class' name, got {key!r}")
        self._entries[key] = value

    def lookup(self, cls: type) -> V | None:
        """The value for exactly this class (a subclass may change ``forward``: see :meth:`nearest`)."""
        if cls in self._entries:
            return self._entries[cls]
        return self._entries.get(qualified_name(cls))

    def nearest(self, cls: type) -> tuple[type, V] | None:
        """(class, value) of the first class in ``cls``'s MRO that has an entry; the caller decides whether a
        subclass may inherit it (one that changes ``forward`` may not)."""
        for base in cls.__mro__:
            value = self.lookup(base)
            if value is not None:
                return base, value
        return None

    def __contains__(self, cls: type) -> bool:
        return self.lookup(cls) is not None
