"""The CNI protocol itself: versions, error codes, result shapes and their conversions.

Results are held internally in the 1.1.0 shape (plain dicts, as they travel as JSON) and
converted on the way out to the version the runtime asked for, and on the way in when a
``prevResult`` arrives in an older shape.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"

# Well-known error codes (SPEC.md "Error codes"); 100+ are ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
ERR_ADDRESS_EXHAUSTED = 100
ERR_INTERNAL = 999

_ROUTE_1_1_FIELDS = ("mtu", "advmss", "priority", "table", "scope")
_INTERFACE_1_1_FIELDS = ("mtu", "socketPath", "pciID")


class CniError(Exception):
    """An error the runtime receives as the spec's error JSON; ``code`` is a well-known code."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except (ValueError, AttributeError):
        return (0,)


def check_version(version: object) -> str:
    """The config's ``cniVersion``, or code 1 naming what we support."""
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, "the network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       f"incompatible CNI version {version!r}",
                       f"svcnet-cni supports {', '.join(SUPPORTED_VERSIONS)}")
    return version


def require_at_least(version: str, minimum: str, command: str) -> None:
    if version_tuple(version) < version_tuple(minimum):
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       f"config version {version} does not allow {command}",
                       f"{command} needs cniVersion {minimum} or later")


def result_from_wire(doc: object) -> dict[str, Any]:
    """A result of any supported version -> the internal 1.1.0 shape."""
    if not isinstance(doc, dict):
        raise CniError(ERR_DECODE, "prevResult is not a JSON object")
    version = doc.get("cniVersion", LATEST)
    if version_tuple(version) < (0, 3, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"prevResult version {version} is too old",
                       "results older than 0.3.0 carry no interface list")
    result = dict(doc)
    ips = []
    for entry in doc.get("ips") or []:
        entry = dict(entry)
        entry.pop("version", None)
        ips.append(entry)
    result["ips"] = ips
    result["cniVersion"] = LATEST
    return result


def result_to_wire(result: dict[str, Any], version: str) -> dict[str, Any]:
    """The internal 1.1.0 result -> ``version``'s shape (0.3.x/0.4.0 add ``ips[].version``)."""
    out: dict[str, Any] = {"cniVersion": version}
    legacy = version_tuple(version) < (1, 0, 0)
    modern_1_0 = version == "1.0.0"
    if "interfaces" in result:
        interfaces = []
        for iface in result["interfaces"]:
            iface = dict(iface)
            if legacy or modern_1_0:
                for key in _INTERFACE_1_1_FIELDS:
                    iface.pop(key, None)
            interfaces.append(iface)
        out["interfaces"] = interfaces
    ips = []
    for entry in result.get("ips") or []:
        entry = dict(entry)
        if legacy:
            entry = {"version": "6" if ":" in entry["address"] else "4", **entry}
        ips.append(entry)
    if ips or "interfaces" not in result:  # a layer-2-only result has none, like the reference
        out["ips"] = ips
    routes = []
    for route in result.get("routes") or []:
        route = dict(route)
        if legacy or modern_1_0:
            for key in _ROUTE_1_1_FIELDS:
                route.pop(key, None)
        routes.append(route)
    if routes:
        out["routes"] = routes
    out["dns"] = result.get("dns") or {}
    return out
