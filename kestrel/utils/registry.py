"""A small typed name -> implementation registry with lazy imports.

Owns name lookup and the "unsupported X; supported: [...]" error. Entries may be given as
"package.module:attribute" strings so optional dependencies are imported only when the entry
is actually used. Must not know what the registered things are.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar, cast

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to implementations of one kind (architectures, backends, quant methods).

    `kind` names the thing being looked up and appears in error messages, e.g.
    Registry("architecture") raises "unsupported architecture 'X'; supported: [...]".
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, str | T] = {}

    def register(self, name: str, target: str | T) -> None:
        """Add `name`; `target` is the object or a lazy "module.path:attr" reference."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"lazy target must look like 'module.path:attr', got {target!r}")
        self._entries[name] = target

    def get(self, name: str) -> T:
        """Return the implementation for `name`, importing it on first use."""
        if name not in self._entries:
            raise ValueError(f"unsupported {self.kind} {name!r}; supported: {self.names()}")
        target = self._entries[name]
        if isinstance(target, str):
            module_name, attr = target.split(":", 1)
            target = cast(T, getattr(importlib.import_module(module_name), attr))
            self._entries[name] = target
        return target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
