"""Name -> entry registries: the one list of the names a setting accepts.

A :class:`Registry` holds the entries of one kind (aggregators, data sets, accountants, audit
attacks, hostile-client attacks) in registration order. The code that runs an entry looks it up
here, and the config validates a name against the same registry, so a name is declared once,
where its code lives. It reads like the tuple of names it replaces: ``name in registry``,
``for name in registry``, ``registry.index(name)``, and ``repr`` gives the tuple.

A registry may discover its entries lazily (``discover``): called once, before the first read,
e.g. to import the modules that register themselves. This module imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Entries of one ``kind`` by name, in registration order.

    Parameters
    ----------
    kind : str
        What an entry is, for messages ("aggregator", "data set").
    error : type[Exception]
        Raised by :meth:`lookup` for an unknown name.
    unknown : str
        Its message, formatted with ``kind``, ``name``, ``known`` (the names joined by ", ") and
        ``names`` (the tuple).
    discover : callable, optional
        Called once before the first read (it registers the entries it finds).
    """

    def __init__(
        self,
        kind: str,
        *,
        error: type[Exception] = ValueError,
        unknown: str = "unknown {kind} {name!r} (known: {known})",
        discover: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self._error = error
        self._unknown = unknown
        self._discover = discover
        self._entries: dict[str, T] = {}

    # ---- writing ----
    def register(self, name: str, entry: T | None = None) -> Any:
        """Add ``entry`` under ``name``; a name is registered once (the same entry again is a no-op).
        Without ``entry``, a decorator that registers what it decorates."""
        if entry is None:
            return lambda target: self.register(name, target)
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without surrounding blanks, got {name!r}")
        if name in self._entries and self._entries[name] is not entry and self._entries[name] != entry:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove ``name`` (a plugin's or a test's registration) and return its entry."""
        self._load()
        return self._entries.pop(name)

    # ---- reading ----
    def _load(self) -> None:
        discover, self._discover = self._discover, None  # once, and not again from inside itself
        if discover is not None:
            try:
                discover()
            except BaseException:
                self._discover = discover
                raise

    def lookup(self, name: str) -> T:
        """The entry of ``name``, or ``error`` with the ``unknown`` message naming the known ones."""
        self._load()
        if name not in self._entries:
            names = tuple(self._entries)
            raise self._error(self._unknown.format(kind=self.kind, name=name, known=", ".join(names), names=names))
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def index(self, name: str) -> int:
        """Position of ``name`` in registration order (the order reports list entries in)."""
        return self.names().index(name)

    def view(self, attribute: str) -> Mapping[str, Any]:
        """A live, read-only ``name -> entry.<attribute>`` mapping."""
        return _AttributeView(self, attribute)

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return repr(self.names())


class _AttributeView(Mapping[str, Any]):
    def __init__(self, registry: Registry, attribute: str) -> None:
        self._registry = registry
        self._attribute = attribute

    def __getitem__(self, name: str) -> Any:
        return getattr(self._registry[name], self._attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def __repr__(self) -> str:
        return repr(dict(self))
