"""Keeping credentials out of error messages and logs.

Errors end up in terminals, pod logs and bug reports; a token, key or password in one is a
leak. Messages about URLs show them with any ``user:password@`` replaced, and messages about
a malformed file say where it is wrong, never what the offending line holds (it may be the
token itself).
"""

from __future__ import annotations

import re
from typing import Any

_QUOTED = re.compile(r"""(['"]).*?\1""")
_USERINFO = re.compile(r"^([A-Za-z][\w+.-]*:/*).*@", re.DOTALL)


def redact_url(url: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://***@host/...``.

    Everything up to the last ``@`` goes, however malformed the URL: a password may itself
    contain ``@`` or follow a single slash."""
    return _USERINFO.sub(r"\1***@", url)


def yaml_problem(err: Any) -> str:
    """A YAML parser error as "what, line L, column C", without the text around it: PyYAML
    quotes the offending line, and quoted names (an undefined alias) may be secrets too."""
    problem = str(getattr(err, "problem", None) or "not valid YAML")
    context = getattr(err, "context", None)
    text = f"{context}: {problem}" if context else problem
    text = _QUOTED.sub("'...'", text)
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        text += f" (line {mark.line + 1}, column {mark.column + 1})"
    return text
