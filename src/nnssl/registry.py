"""A named collection that built-in modules fill on first use (the base of the backbone and method
registries, `models/registry.py` and `methods/registry.py`).

`Registry.add` refuses a second, different entry under a name and names containing `_` (trainer
names split on it); `get` raises the registry's own error listing what exists. The modules named
in `builtin_modules` are imported at the first lookup, never at import time of this module, so
importing a registry costs nothing and a registration module may import the registry freely.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from nnssl.errors import NnsslError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, builtin_modules: tuple[str, ...], error: type[NnsslError]) -> None:
        self.what = what
        self.builtin_modules = builtin_modules
        self.error = error
        self._entries: dict[str, T] = {}
        self._loaded = False

    def add(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] != entry:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        if "_" in name:
            raise ValueError(f"{self.what} name {name!r} must not contain '_' (trainer names split on it)")
        self._entries[name] = entry
        return entry

    def load(self) -> None:
        """Import the built-in modules (once); their module-level calls register their entries."""
        if not self._loaded:
            self._loaded = True
            for module in self.builtin_modules:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        self.load()
        if name not in self._entries:
            raise self.error(f"unknown {self.what} {name!r}; registered: {', '.join(self._entries)}")
        return self._entries[name]

    def values(self, order: Callable[[T], int] | None = None) -> list[T]:
        self.load()
        entries = list(self._entries.values())
        return sorted(entries, key=order) if order is not None else entries

    def rank(self, module: str | None) -> int:
        """Position of `module` among the built-in modules (others after them): listings sort by
        the defining module, as timm keys models by `fn.__module__`, so they do not depend on which
        module a program happened to import first."""
        return self.builtin_modules.index(module) if module in self.builtin_modules else len(self.builtin_modules)

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(self._entries)
