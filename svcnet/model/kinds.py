"""The kinds svcnet watches, where they live in the API, and how their bytes become records."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from svcnet.model.records import (
    EndpointSlice,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    Record,
    Service,
)

R = TypeVar("R", Service, EndpointSlice, Node, Pod, Namespace, NetworkPolicy)


class InvalidObject(ValueError):
    """An object the API accepted but svcnet cannot use; names the object and the field."""

    def __init__(self, kind: str, key: str, problem: str) -> None:
        super().__init__(f"invalid {kind} {key or '<unnamed>'}: {problem}")
        self.kind = kind
        self.key = key
        self.problem = problem


class _Named(msgspec.Struct, frozen=True):
    """Just enough of an object to name it in an error message."""

    class _Meta(msgspec.Struct, frozen=True):
        name: str = ""
        namespace: str = ""

    metadata: _Meta = _Meta()


@dataclass(frozen=True, slots=True)
class Kind(Generic[R]):
    """One watched resource: its API coordinates and its record type."""

    name: str
    api_version: str
    plural: str
    namespaced: bool
    record: type[R]

    @property
    def api_path(self) -> str:
        """Collection path on a Kubernetes API server, all namespaces."""
        group = "api" if "/" not in self.api_version else "apis"
        return f"/{group}/{self.api_version}/{self.plural}"

    def decode(self, data: bytes | str) -> R:
        """Decode JSON bytes straight into the record; raise InvalidObject on any problem."""
        try:
            return msgspec.json.decode(data, type=self.record)
        except (msgspec.ValidationError, msgspec.DecodeError) as err:
            raise InvalidObject(self.name, _key_of_bytes(data), _field_path(str(err))) from None

    def convert(self, obj: dict[str, Any]) -> R:
        """Build the record from an already-parsed object (YAML, tests)."""
        try:
            return msgspec.convert(obj, type=self.record)
        except msgspec.ValidationError as err:
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            meta = meta if isinstance(meta, dict) else {}
            key = _key(str(meta.get("namespace", "")), str(meta.get("name", "")))
            raise InvalidObject(self.name, key, _field_path(str(err))) from None


SERVICE: Kind[Service] = Kind("Service", "v1", "services", True, Service)
ENDPOINT_SLICE: Kind[EndpointSlice] = Kind(
    "EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True, EndpointSlice
)
NODE: Kind[Node] = Kind("Node", "v1", "nodes", False, Node)
POD: Kind[Pod] = Kind("Pod", "v1", "pods", True, Pod)
NAMESPACE: Kind[Namespace] = Kind("Namespace", "v1", "namespaces", False, Namespace)
NETWORK_POLICY: Kind[NetworkPolicy] = Kind(
    "NetworkPolicy", "networking.k8s.io/v1", "networkpolicies", True, NetworkPolicy
)

KINDS: dict[str, Kind[Any]] = {
    k.name: k for k in (SERVICE, ENDPOINT_SLICE, NODE, POD, NAMESPACE, NETWORK_POLICY)
}
_ALIASES = {
    **{k.name.lower(): k.name for k in KINDS.values()},
    **{k.plural: k.name for k in KINDS.values()},
    "svc": "Service", "ep": "EndpointSlice", "eps": "EndpointSlice", "no": "Node", "po": "Pod",
    "ns": "Namespace", "netpol": "NetworkPolicy",
}


def kind_named(name: str) -> Kind[Any]:
    """Look a kind up by name, plural or kubectl short name, case-insensitively."""
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise KeyError(f"unknown kind {name!r}; known: {', '.join(sorted(KINDS))}")
    return KINDS[canonical]


def object_key(record: Record) -> str:
    """The cache key: ``namespace/name``, or ``name`` for cluster-scoped objects."""
    return _key(record.metadata.namespace, record.metadata.name)


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _key_of_bytes(data: bytes | str) -> str:
    try:
        named = msgspec.json.decode(data, type=_Named)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return ""
    return _key(named.metadata.namespace, named.metadata.name)


_RELATIVE_PATH = re.compile(r"[A-Za-z]\w*(\[\d+\])*(\.[A-Za-z]\w*(\[\d+\])*)*")


def _field_path(message: str) -> str:
    """Turn msgspec's ``... - at `$.spec.ports[0].port``` into ``spec.ports[0].port: ...``.

    A record's own check names its field relative to the record (``namespace: ...`` raised
    inside ``metadata``); that is joined to msgspec's path: ``metadata.namespace: ...``."""
    problem, sep, where = message.rpartition(" - at `$")
    if not sep:
        return message
    where = where.rstrip("`").removeprefix(".")
    field, colon, rest = problem.partition(": ")
    if colon and _RELATIVE_PATH.fullmatch(field):
        return f"{where}.{field}: {rest}"
    return f"{where}: {problem}"
