"""The ``etcd`` store: Kubernetes JSON objects in etcd v3, one key per object.

Layout and versioning follow the Kubernetes API server's etcd3 storage: an object lives at
``{prefix}/{plural}/{namespace}/{name}`` (cluster-scoped kinds: ``{prefix}/{plural}/{name}``),
and its ``metadata.resourceVersion`` is the key's ``mod_revision``. Stored bytes never carry a
resourceVersion (it would be stale the moment it was written); it is spliced into the JSON
on the way out, without parsing the object when the bytes are in the form ``put`` writes.

A list is one prefix range read at one revision (paginated), a watch starts right after it,
and compaction of that revision surfaces as ``Expired`` so informers relist. Fail-over between
members is the client's job (``svcnet.store.etcd_client``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec

from svcnet.model import InvalidObject, Kind
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
)
from svcnet.store.etcd_client import (
    EtcdClient,
    KvEvent,
    KvEventType,
    WatchProgress,
    prefix_end,
)
from svcnet.store.etcd_config import NO_CREDENTIALS, EtcdCredentials

__all__ = [
    "EtcdClient",
    "EtcdCredentials",
    "EtcdStore",
    "KvEvent",
    "KvEventType",
    "WatchProgress",
    "prefix_end",
    "with_resource_version",
]

log = logging.getLogger(__name__)

_META = b'"metadata":{'
_RV_FIELD = b'"resourceVersion"'
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def with_resource_version(data: bytes, revision: int) -> bytes:
    """``data`` with its top-level ``metadata.resourceVersion`` set to ``revision``.

    Fast path (bytes as ``EtcdStore.put`` writes them: compact JSON, no resourceVersion):
    insert the field right after the top-level ``"metadata":{``. That occurrence is known to
    be top-level when it is preceded by exactly one ``{`` (the object's own). Anything else is
    decoded, patched and re-encoded. Bytes that are not a JSON object pass through untouched;
    the watch client rejects them with a clear error.
    """
    at = data.find(_META)
    if at > 0 and data[:1] == b"{" and data.count(b"{", 0, at) == 1 and _RV_FIELD not in data:
        at += len(_META)
        field = b'"resourceVersion":"%d"' % revision
        if data[at:at + 1] != b"}":
            field += b","
        return b"".join((data[:at], field, data[at:]))
    try:
        obj = _decode(data)
    except msgspec.DecodeError:
        return data
    if not isinstance(obj, dict):
        return data
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    meta["resourceVersion"] = str(revision)
    return _encode(obj)


class EtcdStore:
    """``svcnet.store.base.Store`` over etcd v3; see the module docstring for the layout."""

    def __init__(self, endpoints: list[str], *, prefix: str = "/registry",
                 timeout: float = 5.0, page_size: int = 500,
                 probe_interval: float = 2.0,
                 credentials: EtcdCredentials = NO_CREDENTIALS) -> None:
        self.client = EtcdClient(endpoints, timeout=timeout, probe_interval=probe_interval,
                                 credentials=credentials)
        self.prefix = prefix.rstrip("/")
        self.page_size = page_size

    def _base(self, kind: Kind[Any]) -> bytes:
        return f"{self.prefix}/{kind.plural}/".encode()

    def key(self, kind: Kind[Any], namespace: str, name: str) -> bytes:
        """Where an object lives, as the API server would put it."""
        if kind.namespaced:
            return f"{self.prefix}/{kind.plural}/{namespace}/{name}".encode()
        return f"{self.prefix}/{kind.plural}/{name}".encode()

    def _identity(self, kind: Kind[Any], base: bytes, key: bytes) -> tuple[str, str] | None:
        """(namespace, name) from a key under ``base``; None for keys that are not objects."""
        rest = key[len(base):].decode("utf-8", "replace")
        if kind.namespaced:
            namespace, sep, name = rest.partition("/")
            if not sep or not namespace or not name or "/" in name:
                return None
            return namespace, name
        return ("", rest) if rest and "/" not in rest else None

    async def list(self, kind: Kind[Any], *, selector: Selector = NO_SELECTOR) -> Listing:
        matcher = SelectorMatcher(selector) if selector else None
        base = self._base(kind)
        try:
            kvs, revision = await self.client.get_prefix(base, page=self.page_size)
        except Expired:
            # The pinned revision was compacted between two pages: one fresh try.
            kvs, revision = await self.client.get_prefix(base, page=self.page_size)
        items: list[RawObject] = []
        for key, value, mod_revision in kvs:
            ident = self._identity(kind, base, key)
            if ident is None:
                log.warning("ignoring etcd key %r: not a %s object key", key, kind.name)
                continue
            if matcher is not None and not _matches(matcher, value):
                continue
            items.append(RawObject(ident[0], ident[1], str(mod_revision),
                                   with_resource_version(value, mod_revision)))
        return Listing(items, str(revision))

    async def watch(
        self, kind: Kind[Any], *, revision: str, selector: Selector = NO_SELECTOR
    ) -> AsyncIterator[Event]:
        """Changes after ``revision``, with BOOKMARKs from etcd's progress notifications.

        With a selector, an object that stops matching is delivered as DELETED and one that
        starts matching as ADDED, like the API server's watch cache does.
        """
        try:
            start = int(revision or 0) + 1
        except ValueError:
            raise Invalid(f"revision {revision!r} is not an etcd revision") from None
        matcher = SelectorMatcher(selector) if selector else None
        base = self._base(kind)
        async for item in self.client.watch_events(base, start_revision=start,
                                                   progress_notify=True):
            if isinstance(item, WatchProgress):
                yield Event(EventType.BOOKMARK, str(item.revision))
                continue
            ident = self._identity(kind, base, item.key)
            if ident is None:
                continue
            event = _to_event(item, ident, matcher)
            if event is not None:
                yield event

    async def put(self, kind: Kind[Any], obj: Mapping[str, Any]) -> RawObject:
        """Create or replace (unconditionally, like ``MemoryStore``); returns the stored object."""
        namespace, name, stored = _normalise(kind, obj)
        data = _encode(stored)
        revision = await self.client.put(self.key(kind, namespace, name), data)
        return RawObject(namespace, name, str(revision), with_resource_version(data, revision))

    async def create(self, kind: Kind[Any], obj: Mapping[str, Any]) -> RawObject | None:
        """Store ``obj`` only if no object of that name exists; None if one does."""
        namespace, name, stored = _normalise(kind, obj)
        data = _encode(stored)
        revision = await self.client.create_revision(self.key(kind, namespace, name), data)
        if revision is None:
            return None
        return RawObject(namespace, name, str(revision), with_resource_version(data, revision))

    async def delete(self, kind: Kind[Any], namespace: str, name: str) -> None:
        if kind.namespaced and not namespace:
            namespace = "default"
        if await self.client.delete_revision(self.key(kind, namespace, name)) is None:
            shown = f"{namespace}/{name}" if kind.namespaced else name
            raise NotFound(f"{kind.name} {shown} not found")

    async def compact(self, revision: int | None = None) -> None:
        """Compact etcd's history up to ``revision`` (default: now); older watches expire."""
        await self.client.compact(revision if revision is not None
                                  else await self.client.revision())

    async def close(self) -> None:
        await self.client.close()


def _normalise(kind: Kind[Any], obj: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Validate ``obj`` and shape it for storage: canonical key order, no resourceVersion."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise Invalid(f"{kind.name} has no metadata")
    name = meta.get("name")
    if not name or not isinstance(name, str) or "/" in name:
        raise Invalid(f"{kind.name} has no valid metadata.name: {name!r}")
    meta = {k: v for k, v in meta.items() if k != "resourceVersion"}
    if kind.namespaced:
        namespace = meta.get("namespace") or "default"
        if not isinstance(namespace, str) or "/" in namespace:
            raise Invalid(f"{kind.name} {name}: invalid metadata.namespace {namespace!r}")
        meta["namespace"] = namespace
    else:
        namespace = ""
        meta.pop("namespace", None)
    stored: dict[str, Any] = {
        "apiVersion": obj.get("apiVersion") or kind.api_version,
        "kind": obj.get("kind") or kind.name,
        "metadata": meta,
    }
    stored.update((k, v) for k, v in obj.items() if k not in stored)
    try:
        kind.convert(stored)
    except InvalidObject as err:
        raise Invalid(str(err)) from None
    return namespace, name, stored


def _matches(matcher: SelectorMatcher, data: bytes | None) -> bool:
    if data is None:
        return True
    try:
        obj = _decode(data)
    except msgspec.DecodeError:
        return False
    return isinstance(obj, dict) and matcher.matches(obj)


def _tombstone(ident: tuple[str, str]) -> bytes:
    """Stand-in body of a deleted object whose last state etcd no longer has (compacted)."""
    meta = {"name": ident[1], **({"namespace": ident[0]} if ident[0] else {})}
    return _encode({"metadata": meta})


def _to_event(item: KvEvent, ident: tuple[str, str], matcher: SelectorMatcher | None
              ) -> Event | None:
    """Map one etcd change to a watch event; None when a selector hides it entirely."""
    revision = item.mod_revision
    rev = str(revision)
    if item.type is KvEventType.DELETE:
        if matcher is not None and not _matches(matcher, item.prev_value):
            return None
        body = item.prev_value if item.prev_value is not None else _tombstone(ident)
        return Event(EventType.DELETED, rev,
                     RawObject(ident[0], ident[1], rev, with_resource_version(body, revision)))
    created = item.create_revision == item.mod_revision
    if matcher is not None:
        now = _matches(matcher, item.value)
        before = not created and _matches(matcher, item.prev_value)
        if not now:
            if not before:
                return None
            body = item.prev_value if item.prev_value is not None else _tombstone(ident)
            return Event(EventType.DELETED, rev, RawObject(
                ident[0], ident[1], rev, with_resource_version(body, revision)))
        if not before:
            created = True
    etype = EventType.ADDED if created else EventType.MODIFIED
    return Event(etype, rev,
                 RawObject(ident[0], ident[1], rev, with_resource_version(item.value, revision)))
