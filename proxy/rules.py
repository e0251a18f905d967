"""The one diff engine of the rule backends.

Each backend turns a service port's state into its share of the kernel objects, typed
(``objects.py``) -- nftables elements, chains with their rules and sets
(``nftables.Rendered``), iptables chains and top-level rules (``iptables.Rendered``), IPVS
virtual servers with their real servers, link addresses and ipset members
(``ipvs.Rendered``) -- keyed here by the object's identity (an element's set and key, a
chain's name). What a port holds in the kernel is what its *previous* state renders to (any
failed sync makes the next one full), so a partial sync renders ``change.previous`` and
``change.current``, asks this module what changed and records that in a ``Transaction``; no
backend keeps a rendered copy or diffs by hand.

Some objects are shared by several ports and exist once in the kernel: nftables hairpin
pairs (one endpoint in two services), IPVS link addresses (one IP, several ports) and ipset
members. ``Shared`` counts who holds each and says which to write or remove, so a second
holder adding or dropping one writes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Delta(NamedTuple, Generic[K, V]):
    """``removed``: key -> old value, for keys gone or changed; ``added``: key -> new
    value, for keys new or changed. A changed key is in both: tools that refuse to
    overwrite (nft elements, IPVS services) delete it first."""

    removed: dict[K, V]
    added: dict[K, V]

    def __bool__(self) -> bool:
        return bool(self.removed or self.added)


def diff(old: Mapping[K, V], new: Mapping[K, V]) -> Delta[K, V]:
    removed = {k: v for k, v in old.items() if k not in new or new[k] != v}
    added = {k: v for k, v in new.items() if k not in old or old[k] != v}
    return Delta(removed, added)


def diff_lines(old: Sequence[K], new: Sequence[K]) -> tuple[list[K], list[K]]:
    """(gone, added) between two lists of unique objects (iptables rules of disjoint
    frontends), each in its list's order."""
    before, after = set(old), set(new)
    return [x for x in old if x not in after], [x for x in new if x not in before]


class Shared(Generic[K]):
    """Objects held by several service ports, written once."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: Counter[K] = Counter()

    def reset(self, held: Iterable[K] = ()) -> None:
        """A full sync: the kernel holds exactly these (with repeats, one per holder)."""
        self.counts = Counter(held)

    def hold(self, held: Iterable[K]) -> None:
        """More holders, while a full sync writes the union itself."""
        self.counts.update(held)

    def change(self, dropped: Iterable[K], taken: Iterable[K]) -> tuple[set[K], set[K]]:
        """One port drops ``dropped`` and takes ``taken``: (to remove, to write) -- the
        objects whose last holder left, and those that got their first."""
        counts = self.counts
        gone: set[K] = set()
        new: set[K] = set()
        for obj in dropped:
            counts[obj] -= 1
            if counts[obj] <= 0:
                del counts[obj]
                gone.add(obj)
        for obj in taken:
            counts[obj] += 1
            if counts[obj] == 1:
                new.add(obj)
        return gone - new, new - gone

    def __contains__(self, obj: object) -> bool:
        return obj in self.counts

    def __len__(self) -> int:
        return len(self.counts)

    def __iter__(self) -> Iterator[K]:
        return iter(self.counts)
