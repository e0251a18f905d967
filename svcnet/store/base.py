"""The one small interface every object store implements, and the events it yields.

Stores move Kubernetes JSON bytes and opaque revisions; they never decode objects. Decoding to
records happens once, in the watch client (see ``svcnet.watch``).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from svcnet.model import Kind


class StoreError(Exception):
    """Base of every store failure. Subclasses say what the caller should do next.

    - ``Expired``: the revision asked for is compacted/too old (HTTP 410): relist.
    - ``Unavailable``: the store cannot be reached right now: back off and retry.
    - ``NotFound`` / ``Conflict``: put/delete preconditions, for tools and the lab.
    - ``Invalid``: the request itself is wrong (bad selector, bad object): do not retry.
    """


class Expired(StoreError):
    """The watch revision is no longer available; list again."""


class Unavailable(StoreError):
    """The store is unreachable or failed transiently."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class Invalid(StoreError):
    pass


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"


@dataclass(frozen=True, slots=True)
class RawObject:
    """One stored object: its identity, its revision and its Kubernetes JSON."""

    namespace: str
    name: str
    revision: str
    data: bytes

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class Event:
    """A watch event. BOOKMARK events carry no object, only a newer ``revision``."""

    type: EventType
    revision: str
    obj: RawObject | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    items: list[RawObject]
    revision: str


@dataclass(frozen=True, slots=True)
class Selector:
    """Label and field selectors in Kubernetes syntax, applied by the store.

    ``labels`` supports ``k=v``, ``k!=v``, ``k``, ``!k``, comma-separated (all must hold).
    ``fields`` supports ``metadata.name``, ``metadata.namespace`` and ``spec.nodeName``
    with ``=`` / ``!=``.
    """

    labels: str = ""
    fields: str = ""

    def __bool__(self) -> bool:
        return bool(self.labels or self.fields)


NO_SELECTOR = Selector()


@runtime_checkable
class Store(Protocol):
    """List with a revision, watch from a revision, and put/delete for tools and the lab."""

    async def list(self, kind: Kind[Any], *, selector: Selector = NO_SELECTOR) -> Listing:
        """All objects of ``kind`` and the revision to watch from."""
        ...

    def watch(
        self, kind: Kind[Any], *, revision: str, selector: Selector = NO_SELECTOR
    ) -> AsyncIterator[Event]:
        """Events after ``revision``; raises ``Expired`` when that revision is gone.

        The iterator may end (server timeout); the caller then watches again from the
        last revision it saw.
        """
        ...

    async def put(self, kind: Kind[Any], obj: Mapping[str, Any]) -> RawObject:
        """Create or replace an object given as Kubernetes JSON (a dict)."""
        ...

    async def delete(self, kind: Kind[Any], namespace: str, name: str) -> None:
        """Delete an object; raises ``NotFound`` if it does not exist."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Requirement:
    key: str
    op: str
    value: str = ""


@dataclass(slots=True)
class SelectorMatcher:
    """Evaluates a ``Selector`` against decoded JSON; shared by the stores that filter locally."""

    selector: Selector
    _labels: list[_Requirement] = field(init=False)
    _fields: list[_Requirement] = field(init=False)

    def __post_init__(self) -> None:
        self._labels = [_parse_requirement(r) for r in _split(self.selector.labels)]
        self._fields = [_parse_requirement(r) for r in _split(self.selector.fields)]
        for req in self._fields:
            if req.key not in _FIELD_PATHS:
                raise Invalid(f"field selector on {req.key!r} is not supported")

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        labels: Mapping[str, str] = meta.get("labels") or {}
        for req in self._labels:
            if not _holds(req, labels.get(req.key)):
                return False
        for req in self._fields:
            value: Any = obj
            for part in _FIELD_PATHS[req.key]:
                value = value.get(part) if isinstance(value, Mapping) else None
            if not _holds(req, "" if value is None else str(value)):
                return False
        return True


_FIELD_PATHS = {
    "metadata.name": ("metadata", "name"),
    "metadata.namespace": ("metadata", "namespace"),
    "spec.nodeName": ("spec", "nodeName"),
}


def selectable(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of an object a ``Selector`` can look at (labels and ``_FIELD_PATHS``), so
    a store that filters locally need not keep the whole decoded object."""
    labels = (obj.get("metadata") or {}).get("labels")
    slim: dict[str, Any] = {"metadata": {"labels": labels} if labels else {}}
    for path in _FIELD_PATHS.values():
        value: Any = obj
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            slim.setdefault(path[0], {})[path[1]] = value
    return slim


def _split(expr: str) -> list[str]:
    return [part.strip() for part in expr.split(",") if part.strip()]


def _parse_requirement(text: str) -> _Requirement:
    for op in ("!=", "==", "="):
        if op in text:
            key, _, value = text.partition(op)
            return _Requirement(key.strip(), "!=" if op == "!=" else "=", value.strip())
    if text.startswith("!"):
        return _Requirement(text[1:].strip(), "!exists")
    return _Requirement(text, "exists")


def _holds(req: _Requirement, value: str | None) -> bool:
    if req.op == "=":
        return value == req.value
    if req.op == "!=":
        return value != req.value
    if req.op == "exists":
        return value is not None
    return value is None
