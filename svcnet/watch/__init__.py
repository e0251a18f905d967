"""The shared watch client: informers (list + watch + cache + handlers) over any store."""

from svcnet.watch.cache import Cache, by_namespace, by_service_name
from svcnet.watch.informer import (
    Backoff,
    Callbacks,
    Handler,
    Informer,
    InformerFactory,
    Listed,
    changes,
)

__all__ = [
    "Backoff",
    "Cache",
    "Callbacks",
    "Handler",
    "Informer",
    "InformerFactory",
    "Listed",
    "by_namespace",
    "by_service_name",
    "changes",
]
