"""Typed, immutable records of the watched objects (Services, EndpointSlices, Nodes, Pods,
Namespaces, NetworkPolicies), and their kinds."""

from svcnet.model.kinds import (
    ENDPOINT_SLICE,
    KINDS,
    NAMESPACE,
    NETWORK_POLICY,
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
    "NAMESPACE",
    "NETWORK_POLICY",
    "NODE",
    "POD",
    "SERVICE",
    "InvalidObject",
    "Kind",
    "kind_named",
    "object_key",
    *_records_all,
]
