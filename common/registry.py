"""A small immutable name -> object registry (tasks, aggregators).

Registration is explicit and happens where the registry is built; a duplicate name is an
error rather than a silent override, and an unknown name lists the known ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import MappingProxyType
from typing import Generic, TypeVar

from common.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: Iterable[tuple[str, T]] = ()) -> None:
        self.kind = kind
        items: dict[str, T] = {}
        for name, item in entries:
            if name in items:
                raise RegistryError(f"{kind} {name!r} is registered twice")
            items[name] = item
        self._items = MappingProxyType(items)

    def register(self, name: str, item: T) -> Registry[T]:
        """A new registry with one more entry; this one is left unchanged."""
        return Registry(self.kind, [*self._items.items(), (name, item)])

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
