"""An in-process store with the semantics of the real ones, for unit tests and embedding.

It keeps a bounded event history so watches resume from a revision, and it can simulate the
failures informers must survive: compaction (``Expired``) and a restart that drops every
open watch (``Unavailable``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from svcnet.model import Kind
from svcnet.store.base import (
    NO_SELECTOR,
    Event,
    EventType,
    Expired,
    Invalid,
    Listing,
    NotFound,
    RawObject,
    Selector,
    SelectorMatcher,
    Unavailable,
    selectable,
)


class MemoryStore:
    def __init__(self, *, history: int = 10_000) -> None:
        self._objects: dict[str, dict[str, tuple[RawObject, dict[str, Any]]]] = {}
        self._history: list[tuple[str, Event, dict[str, Any]]] = []
        self._history_limit = history
        self._revision = 0
        self._compacted = 0
        self._epoch = 0
        self._changed = asyncio.Condition()

    @property
    def revision(self) -> int:
        return self._revision

    async def list(self, kind: Kind[Any], *, selector: Selector = NO_SELECTOR) -> Listing:
        matcher = SelectorMatcher(selector)
        objs = self._objects.get(kind.name, {})
        items = [raw for raw, parsed in objs.values() if matcher.matches(parsed)]
        items.sort(key=lambda raw: raw.key)
        return Listing(items, str(self._revision))

    async def watch(
        self, kind: Kind[Any], *, revision: str, selector: Selector = NO_SELECTOR
    ) -> AsyncIterator[Event]:
        matcher = SelectorMatcher(selector)
        since = _parse_revision(revision)
        epoch = self._epoch
        while True:
            if self._epoch != epoch:
                raise Unavailable("memory store restarted")
            if since < self._compacted:
                raise Expired(f"revision {since} is compacted (oldest {self._compacted})")
            head = self._revision
            pending = [
                (event, parsed)
                for kind_name, event, parsed in self._history
                if kind_name == kind.name and int(event.revision) > since
            ]
            for event, parsed in pending:
                since = int(event.revision)
                if matcher.matches(parsed):
                    yield event
            since = max(since, head)
            async with self._changed:
                if self._revision == since and self._epoch == epoch and since >= self._compacted:
                    await self._changed.wait()

    async def put(self, kind: Kind[Any], obj: Mapping[str, Any]) -> RawObject:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not name:
            raise Invalid(f"{kind.name} has no metadata.name")
        namespace = meta.get("namespace", "default" if kind.namespaced else "")
        kind.convert(dict(obj))  # reject what no consumer could decode, like an API server
        self._revision += 1
        rev = str(self._revision)
        stored = {**obj, "metadata": {**meta, "namespace": namespace, "resourceVersion": rev}}
        if not kind.namespaced:
            stored["metadata"].pop("namespace", None)
        raw = RawObject(namespace if kind.namespaced else "", name, rev,
                        json.dumps(stored).encode())
        objs = self._objects.setdefault(kind.name, {})
        etype = EventType.MODIFIED if raw.key in objs else EventType.ADDED
        slim = selectable(stored)  # the JSON is the object; this is what selectors read
        objs[raw.key] = (raw, slim)
        await self._record(kind, Event(etype, rev, raw), slim)
        return raw

    async def delete(self, kind: Kind[Any], namespace: str, name: str) -> None:
        key = f"{namespace}/{name}" if kind.namespaced else name
        objs = self._objects.get(kind.name, {})
        if key not in objs:
            raise NotFound(f"{kind.name} {key} not found")
        old, parsed = objs.pop(key)
        self._revision += 1
        rev = str(self._revision)
        gone = RawObject(old.namespace, old.name, rev, old.data)
        await self._record(kind, Event(EventType.DELETED, rev, gone), parsed)

    async def close(self) -> None:
        await self.restart()

    async def compact(self, revision: int | None = None) -> None:
        """Forget history up to ``revision`` (default: all), expiring older watches."""
        self._compacted = self._revision if revision is None else revision
        self._history = [h for h in self._history if int(h[1].revision) > self._compacted]
        await self._notify()

    async def restart(self) -> None:
        """Drop every open watch, as a store whose server restarted would."""
        self._epoch += 1
        await self._notify()

    async def _record(self, kind: Kind[Any], event: Event, parsed: dict[str, Any]) -> None:
        self._history.append((kind.name, event, parsed))
        if len(self._history) > self._history_limit:
            dropped = self._history[: len(self._history) - self._history_limit]
            self._compacted = int(dropped[-1][1].revision)
            del self._history[: len(dropped)]
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


def _parse_revision(revision: str) -> int:
    try:
        return int(revision or 0)
    except ValueError:
        raise Invalid(f"revision {revision!r} is not a memory-store revision") from None
