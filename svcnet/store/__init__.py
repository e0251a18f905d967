"""Object stores behind one interface: Kubernetes API, etcd v3, in-memory."""

from svcnet.store.base import (
    NO_SELECTOR,
    Conflict,
    Event,
    EventType,
    Expired,
    Invalid,
    Listing,
    NotFound,
    RawObject,
    Selector,
    Store,
    StoreError,
    Unavailable,
)

__all__ = [
    "NO_SELECTOR",
    "Conflict",
    "Event",
    "EventType",
    "Expired",
    "Invalid",
    "Listing",
    "NotFound",
    "RawObject",
    "Selector",
    "Store",
    "StoreError",
    "Unavailable",
]
