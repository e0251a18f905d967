"""The informer's cache: current records by key, with secondary indexes.

Written only by the informer's task; readable from any thread (the DNS server answers from
worker threads), so every access takes one short lock and readers get immutable records.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from svcnet.model import EndpointSlice, Namespace, NetworkPolicy, Node, Pod, Service

R = TypeVar("R", Service, EndpointSlice, Node, Pod, Namespace, NetworkPolicy)

IndexFunc = Callable[[R], list[str]]


def by_namespace(obj: Service | EndpointSlice | Node | Pod | Namespace | NetworkPolicy
                 ) -> list[str]:
    return [obj.metadata.namespace]


def by_service_name(obj: EndpointSlice) -> list[str]:
    """EndpointSlices indexed as ``namespace/service`` via the kubernetes.io/service-name label."""
    name = obj.service_name
    return [f"{obj.metadata.namespace}/{name}"] if name else []


class Cache(Generic[R]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, R] = {}
        self._index_funcs: dict[str, IndexFunc[R]] = {"namespace": by_namespace}
        self._indexes: dict[str, dict[str, set[str]]] = {"namespace": {}}

    def add_index(self, name: str, func: IndexFunc[R]) -> None:
        with self._lock:
            self._index_funcs[name] = func
            index: dict[str, set[str]] = {}
            for key, obj in self._items.items():
                for value in func(obj):
                    index.setdefault(value, set()).add(key)
            self._indexes[name] = index

    def get(self, key: str) -> R | None:
        with self._lock:
            return self._items.get(key)

    def keys_snapshot(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def values(self) -> list[R]:
        with self._lock:
            return list(self._items.values())

    def by_index(self, index: str, value: str) -> list[R]:
        with self._lock:
            keys = self._indexes[index].get(value, ())
            return [self._items[k] for k in keys]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def upsert(self, key: str, obj: R) -> R | None:
        with self._lock:
            old = self._items.get(key)
            if old is not None:
                self._unindex(key, old)
            self._items[key] = obj
            for name, func in self._index_funcs.items():
                for value in func(obj):
                    self._indexes[name].setdefault(value, set()).add(key)
            return old

    def remove(self, key: str) -> R | None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._unindex(key, old)
            return old

    def _unindex(self, key: str, obj: R) -> None:
        for name, func in self._index_funcs.items():
            index = self._indexes[name]
            for value in func(obj):
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]
