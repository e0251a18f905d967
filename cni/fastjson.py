"""JSON through the C accelerator alone.

``import json`` pulls in ``re``, ``enum`` and ``functools`` (about 8 ms with ``-S``), a quarter
of the plugin's start-up budget. The ``_json`` extension module parses and encodes on its own
when handed a context object, which is all a CNI plugin needs.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WHITESPACE = " \t\n\r"


class _DecodeContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo: dict[str, str] = {}


_scan = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]
_encode = _json.make_encoder(None, None,  # type: ignore[arg-type]
                             _json.encode_basestring_ascii, None, ": ", ", ", False, False,
                             True)


def loads(text: str | bytes) -> Any:
    """Parse one JSON document; raises ValueError with the offset of the first bad byte."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except Exception:
        # Error path only: the C scanner reports some errors through json.decoder, which
        # it imports lazily; let the full module produce the precise message.
        import json

        json.loads(text)
        raise ValueError("invalid JSON") from None
    finally:
        _DecodeContext.memo.clear()
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after the JSON document at offset {end}")
    return value


def dumps(value: Any) -> str:
    """Compact-ish JSON (``", "`` separators, ASCII only), like ``json.dumps`` defaults."""
    return "".join(_encode(value, 0))
