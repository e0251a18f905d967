"""IP addresses as ``(version, int)`` and prefixes as :class:`Prefix`, without ``ipaddress``.

``ipaddress`` costs ~7 ms to import with its dependencies; the plugin only needs parsing,
formatting, containment and integer arithmetic, which ``inet_pton`` and ints give for free.
"""

from __future__ import annotations

import _socket

_BITS = {4: 32, 6: 128}
_AF = {4: _socket.AF_INET, 6: _socket.AF_INET6}


class AddressError(ValueError):
    """A string is not an IP address or prefix."""


def parse_ip(text: str) -> tuple[int, int]:
    """``"10.0.0.1"`` -> ``(4, 167772161)``."""
    version = 6 if ":" in text else 4
    try:
        packed = _socket.inet_pton(_AF[version], text)
    except (OSError, TypeError):
        raise AddressError(f"{text!r} is not an IP address") from None
    return version, int.from_bytes(packed, "big")


def format_ip(version: int, value: int) -> str:
    return str(_socket.inet_ntop(_AF[version], value.to_bytes(_BITS[version] // 8, "big")))


def packed(version: int, value: int) -> bytes:
    return value.to_bytes(_BITS[version] // 8, "big")


class Prefix:
    """An address with a prefix length; ``network`` is the address with host bits cleared."""

    __slots__ = ("address", "length", "version")

    def __init__(self, version: int, address: int, length: int) -> None:
        if not 0 <= length <= _BITS[version]:
            raise AddressError(f"prefix length {length} out of range for IPv{version}")
        self.version = version
        self.address = address
        self.length = length

    @classmethod
    def parse(cls, text: str) -> Prefix:
        """``"10.1.2.3/24"``; a bare address gets the full length."""
        if not isinstance(text, str):
            raise AddressError(f"{text!r} is not a prefix")
        ip, _, length = text.partition("/")
        version, value = parse_ip(ip)
        if not length:
            return cls(version, value, _BITS[version])
        if not length.isdigit():
            raise AddressError(f"{text!r} has an invalid prefix length")
        return cls(version, value, int(length))

    @property
    def bits(self) -> int:
        return _BITS[self.version]

    @property
    def hostmask(self) -> int:
        return (1 << (self.bits - self.length)) - 1

    @property
    def network(self) -> int:
        return self.address & ~self.hostmask

    @property
    def broadcast(self) -> int:
        return self.network | self.hostmask

    @property
    def size(self) -> int:
        return 1 << (self.bits - self.length)

    def contains(self, version: int, value: int) -> bool:
        return version == self.version and value & ~self.hostmask == self.network

    def masked(self) -> Prefix:
        return Prefix(self.version, self.network, self.length)

    def overlaps(self, other: Prefix) -> bool:
        return self.version == other.version and (
            self.contains(other.version, other.network) or other.contains(self.version,
                                                                          self.network))

    def __str__(self) -> str:
        return f"{format_ip(self.version, self.address)}/{self.length}"

    def __repr__(self) -> str:
        return f"Prefix({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prefix) and (self.version, self.address, self.length) == (
            other.version, other.address, other.length)

    def __hash__(self) -> int:
        return hash((self.version, self.address, self.length))
