"""List-then-watch informers, the one way svcnet learns about cluster objects.

Layered like kopf's watcher, each layer one async generator:

1. ``Store.watch``: one stream of raw events from one revision;
2. ``changes``: list, then watch from the list's revision; re-watch from the last revision
   after a timeout or a dropped stream (with capped, jittered backoff); relist on ``Expired``;
3. ``Informer.run``: decodes raw objects into records (the only place that happens), keeps
   the cache, and calls handlers in order. After a relist it reconciles the cache with the
   listing, so an object deleted while the watch was away is still delivered as a delete.

One bad object must never stop the loop: an object that fails to decode is rejected (its
last good version stays cached), and a handler that raises for one object is logged once
for that object, counted, and skipped for it; every other object and handler carries on.
Should an informer task still end with an exception, ``failed`` says so, for readiness.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from svcnet.model import (
    EndpointSlice,
    InvalidObject,
    Kind,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    Service,
)
from svcnet.store.base import (
    NO_SELECTOR,
    Event,
    EventType,
    Expired,
    RawObject,
    Selector,
    Store,
    StoreError,
)
from svcnet.watch import metrics
from svcnet.watch.cache import Cache, by_service_name

log = logging.getLogger(__name__)

R = TypeVar("R", Service, EndpointSlice, Node, Pod, Namespace, NetworkPolicy)
R_contra = TypeVar("R_contra", Service, EndpointSlice, Node, Pod, Namespace, NetworkPolicy,
                   contravariant=True)


@dataclass(frozen=True, slots=True)
class Listed:
    """A complete listing: the informer replaces its view of the world with ``items``."""

    items: list[RawObject]
    revision: str


class Backoff:
    """Capped exponential backoff with full jitter; reset after a success."""

    def __init__(self, base: float = 0.1, cap: float = 10.0) -> None:
        self.base = base
        self.cap = cap
        self._attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2**self._attempt))
        self._attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._attempt = 0


async def changes(
    store: Store, kind: Kind[Any], *, selector: Selector = NO_SELECTOR,
    backoff: Backoff | None = None, revision: str | None = None,
) -> AsyncIterator[Listed | Event]:
    """Endless list-then-watch: yields ``Listed`` after every (re)list, then events.

    Given a ``revision`` (a restarted informer that still has its cache), it watches from
    there first and lists only if that revision has expired.
    """
    backoff = backoff or Backoff()
    reason = "initial"
    while True:
        try:
            if revision is None:
                listing = await store.list(kind, selector=selector)
                metrics.RELISTS.labels(kind.name, reason).inc()
                revision = listing.revision
                yield Listed(listing.items, listing.revision)
                backoff.reset()
            started, seen = time.monotonic(), 0
            async for event in store.watch(kind, revision=revision, selector=selector):
                if event.revision:
                    revision = event.revision
                seen += 1
                yield event
            metrics.RESTARTS.labels(kind.name, "closed").inc()
            if not seen and time.monotonic() - started < 1.0:
                await asyncio.sleep(backoff.next())
        except Expired as err:
            log.info("watch %s expired (%s); relisting", kind.name, err)
            revision, reason = None, "expired"
        except (TimeoutError, StoreError, OSError) as err:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A client library turned our own cancellation into an error; honour it.
                raise asyncio.CancelledError from err
            metrics.RESTARTS.labels(kind.name, "error").inc()
            delay = backoff.next()
            log.warning("watch %s failed: %s; retrying in %.2fs", kind.name, err, delay)
            if revision is None:
                reason = "error"
            await asyncio.sleep(delay)


class Handler(Protocol[R_contra]):
    """Receives changes in order per object. Methods may be plain or ``async``."""

    def on_add(self, obj: R_contra) -> Awaitable[None] | None: ...

    def on_update(self, old: R_contra, new: R_contra) -> Awaitable[None] | None: ...

    def on_delete(self, obj: R_contra) -> Awaitable[None] | None: ...


@dataclass(slots=True)
class Callbacks(Generic[R]):
    """A ``Handler`` made of optional functions; ``on_change`` gets (old, new), None = absent."""

    on_change: Callable[[R | None, R | None], Awaitable[None] | None]

    def on_add(self, obj: R) -> Awaitable[None] | None:
        return self.on_change(None, obj)

    def on_update(self, old: R, new: R) -> Awaitable[None] | None:
        return self.on_change(old, new)

    def on_delete(self, obj: R) -> Awaitable[None] | None:
        return self.on_change(obj, None)


def _handler_name(handler: Handler[Any]) -> str:
    if isinstance(handler, Callbacks):
        return str(getattr(handler.on_change, "__qualname__", type(handler).__qualname__))
    return type(handler).__qualname__


class Informer(Generic[R]):
    """One resource's list/watch loop, cache and handlers. Share it via ``InformerFactory``."""

    def __init__(
        self, store: Store, kind: Kind[R], *, selector: Selector = NO_SELECTOR,
        resync_period: float = 0.0, backoff: Backoff | None = None,
        on_failure: Callable[[Informer[R]], None] | None = None,
    ) -> None:
        self.store = store
        self.kind: Kind[R] = kind
        self.selector = selector
        self.resync_period = resync_period
        self.cache: Cache[R] = Cache()
        self.synced = asyncio.Event()
        self.revision = ""
        self._handlers: list[Handler[R]] = []
        self._backoff = backoff or Backoff()
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[None]] = set()
        self._failing: set[tuple[int, str]] = set()
        """(handler index, object key) whose last call raised: logged once, not per event."""
        self._on_failure: Callable[[Informer[R]], None] | None = on_failure
        self.error: BaseException | None = None
        """Why the informer task ended, if it ended with an exception."""

    @property
    def failed(self) -> bool:
        """True once the informer task has died: its cache no longer follows the store."""
        return self.error is not None

    def add_handler(self, handler: Handler[R]) -> None:
        """Register a handler; it first receives an add for every object already cached."""
        self._handlers.append(handler)
        index = len(self._handlers) - 1
        for key in self.cache.keys_snapshot():
            obj = self.cache.get(key)
            if obj is None:
                continue
            task = asyncio.ensure_future(self._call(index, handler, key, "on_add", obj))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"informer-{self.kind.name}")
            self._task.add_done_callback(self._ended)
        return self._task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.error = task.exception()
        metrics.INFORMER_FAILURES.labels(self.kind.name).inc()
        log.error("informer %s died; its cache no longer follows the store", self.kind.name,
                  exc_info=self.error)
        if self._on_failure is not None:
            self._on_failure(self)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # A task that died has been logged and recorded in ``error``: not raised again.
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def wait_synced(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self.synced.wait()

    async def run(self) -> None:
        resync = (
            asyncio.create_task(self._resync_loop()) if self.resync_period > 0 else None
        )
        try:
            async for change in changes(
                self.store, self.kind, selector=self.selector, backoff=self._backoff,
                revision=self.revision or None,
            ):
                if isinstance(change, Listed):
                    await self._replace(change)
                    self.synced.set()
                else:
                    await self._apply(change)
                self.revision = change.revision
                metrics.LAST_EVENT.labels(self.kind.name).set(time.time())
                metrics.CACHED.labels(self.kind.name).set(len(self.cache))
        finally:
            if resync is not None:
                resync.cancel()

    async def _replace(self, listing: Listed) -> None:
        seen: set[str] = set()
        for raw in listing.items:
            seen.add(raw.key)
            obj = self._decode(raw)
            if obj is not None:
                await self._upsert(raw.key, obj)
        for key in self.cache.keys_snapshot():
            if key not in seen:
                await self._remove(key)

    async def _apply(self, event: Event) -> None:
        metrics.EVENTS.labels(self.kind.name, event.type.value).inc()
        raw = event.obj
        if event.type is EventType.BOOKMARK or raw is None:
            return
        if event.type is EventType.DELETED:
            await self._remove(raw.key)
            return
        obj = self._decode(raw)
        if obj is not None:
            await self._upsert(raw.key, obj)

    def _decode(self, raw: RawObject) -> R | None:
        try:
            return self.kind.decode(raw.data)
        except Exception as err:  # one object must never stop the informer
            problem = err if isinstance(err, InvalidObject) else f"undecodable: {err!r}"
            metrics.REJECTED.labels(self.kind.name).inc()
            log.error("rejected %s; keeping its last good version: %s", raw.key, problem)
            return None

    async def _upsert(self, key: str, obj: R) -> None:
        old = self.cache.upsert(key, obj)
        if old is None:
            await self._deliver(key, "on_add", obj)
        elif old.metadata.resource_version != obj.metadata.resource_version or (
            not obj.metadata.resource_version and old != obj
        ):
            await self._deliver(key, "on_update", old, obj)

    async def _remove(self, key: str) -> None:
        old = self.cache.remove(key)
        if old is not None:
            await self._deliver(key, "on_delete", old)
            self._failing = {f for f in self._failing if f[1] != key}

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_period)
            for key in self.cache.keys_snapshot():
                obj = self.cache.get(key)
                if obj is not None:
                    await self._deliver(key, "on_update", obj, obj)

    async def _deliver(self, key: str, method: str, *args: R) -> None:
        for index, handler in enumerate(list(self._handlers)):
            await self._call(index, handler, key, method, *args)

    async def _call(self, index: int, handler: Handler[R], key: str, method: str,
                    *args: R) -> None:
        """One handler call, sync or async; if it raises, that object is skipped for that
        handler: logged the first time (with the traceback), counted every time."""
        try:
            result = getattr(handler, method)(*args)
            if result is not None and inspect.isawaitable(result):
                await result
        except Exception:  # a handler bug must not stop the informer
            name = _handler_name(handler)
            metrics.HANDLER_ERRORS.labels(self.kind.name, name).inc()
            if (index, key) not in self._failing:
                self._failing.add((index, key))
                log.exception("%s handler %s failed for %s; skipping that object for it "
                              "(logged once until it succeeds)", self.kind.name, name, key)
            return
        if self._failing:
            self._failing.discard((index, key))


class InformerFactory:
    """One informer per (kind, selector) per process, shared by proxy, DNS and overlay."""

    def __init__(self, store: Store, *, resync_period: float = 0.0) -> None:
        self.store = store
        self.resync_period = resync_period
        self._informers: dict[tuple[str, Selector], Informer[Any]] = {}
        self._failed = asyncio.Event()

    def informer(self, kind: Kind[R], *, selector: Selector = NO_SELECTOR) -> Informer[R]:
        key = (kind.name, selector)
        inf = self._informers.get(key)
        if inf is None:
            inf = Informer(self.store, kind, selector=selector, resync_period=self.resync_period,
                           on_failure=lambda _: self._failed.set())
            if kind.name == "EndpointSlice":
                inf.cache.add_index("service", by_service_name)
            self._informers[key] = inf
        return inf

    def start(self) -> None:
        for inf in self._informers.values():
            inf.start()

    async def wait_for_sync(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(inf.synced.wait() for inf in self._informers.values()))

    @property
    def synced(self) -> bool:
        return all(inf.synced.is_set() for inf in self._informers.values())

    @property
    def failed(self) -> list[Informer[Any]]:
        """Informers whose task died (for readiness); normally empty."""
        return [inf for inf in self._informers.values() if inf.failed]

    async def wait_failed(self) -> Informer[Any]:
        """Return the first informer whose task dies, whenever that happens."""
        while not self.failed:
            self._failed.clear()
            await self._failed.wait()
        return self.failed[0]

    async def stop(self) -> None:
        for inf in self._informers.values():
            await inf.stop()
