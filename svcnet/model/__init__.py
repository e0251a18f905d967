"""Typed, immutable records of Services, EndpointSlices, Nodes and Pods, and their kinds."""

from svcnet.model.kinds import (
    ENDPOINT_SLICE,
    KINDS,
    NODE,
    POD,
    SERVICE,
    InvalidObject,
    Kind,
    kind_named,
    object_key,
)
from svcnet.model.records import *  # noqa: F403
from svcnet.model.records import __all__ as _records_all

__all__ = [
    "ENDPOINT_SLICE",
    "KINDS",
    "NODE",
    "POD",
    "SERVICE",
    "InvalidObject",
    "Kind",
    "kind_named",
    "object_key",
    *_records_all,
]
