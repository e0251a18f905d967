"""Streaming a script into a tool that must apply all of it or none of it.

``nft`` commits whatever it has parsed when its input ends. A full sync streams a large
script into it while the rest is still being rendered; if the daemon dies there (kill -9,
the OOM killer), ``nft`` sees end-of-file after a prefix and commits a table without the
services not yet written. New connections to those then get a conntrack entry without NAT
and keep timing out until the next full sync.

A *seal* makes every prefix ``nft`` can ever see unparseable: each write ends with an
opening token (``redefine``) that only the next write completes, and each write is at most
``PIPE_BUF`` bytes, which the kernel delivers whole or not at all. A line longer than one
write (a big ``add element ... { ... }``) goes out in parts, and any prefix ending inside
its braces is unparseable too; its last bytes always travel with the sealed write.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Seal:
    opening: bytes  # ends every write: leaves the input syntactically incomplete
    closing: bytes  # starts the next write (and ends the input): completes it harmlessly


# ``redefine NAME = VALUE`` only sets a parser variable: no netlink message, no kernel state.
NFT_SEAL = Seal(b"redefine", b" svcnet_input_complete = 1\n")

# the final part of an over-long line keeps at least this many bytes, so a cut before the
# sealed write is always inside the line's closing brace
_LINE_TAIL = 16


def sealed_pieces(chunks: Iterable[str], seal: Seal, limit: int = select.PIPE_BUF,
                  ) -> Iterator[bytes]:
    """``chunks`` (text, split anywhere) as writes of at most ``limit`` bytes, each sealed
    except the inner parts of an over-long line; the last piece closes the final seal."""
    room = limit - len(seal.opening) - len(seal.closing)
    if room <= 2 * _LINE_TAIL:
        raise ValueError(f"limit {limit} leaves no room between the seals")
    lead = b""
    carry = b""
    for chunk in chunks:
        data = carry + chunk.encode()
        complete = data.rfind(b"\n") + 1  # whole lines only; the rest waits for more
        carry = data[complete:]
        pos = 0
        while pos < complete:
            end = pos + room - len(lead)
            if end >= complete:
                end = complete
            else:
                cut = data.rfind(b"\n", pos, end)
                if cut < 0:  # a line longer than one write: send a part of it, unsealed
                    end = min(end, data.find(b"\n", pos) + 1 - _LINE_TAIL)
                    yield lead + data[pos:end]
                    lead = b""
                    pos = end
                    continue
                end = cut + 1
            yield lead + data[pos:end] + seal.opening
            lead = seal.closing
            pos = end
    if carry:  # input not ending in a newline
        yield lead + carry + b"\n" + seal.opening
        lead = seal.closing
    yield lead


def write_pieces(fd: int, pieces: Iterable[bytes]) -> None:
    """Write each piece with one ``write``; a blocking pipe write of at most ``PIPE_BUF``
    bytes is never partial, so the reader sees whole pieces only."""
    for piece in pieces:
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view):]
