"""The session-id grammar, defined once and applied identically to the header, the body and the path.

A session id is 1 to `MAX_SESSION_ID` (128) Unicode characters, each printable and none of them
whitespace: letters and digits of any script, punctuation and symbols (`/`, `:`, `%` included) are
allowed; spaces, tabs, line breaks, control and format characters (e.g. U+200B) and lone surrogates are
not. It is case-sensitive and compared as given (no normalisation, no trimming).

How each place carries it:
- body: `"session_id"` is the id itself (a JSON string);
- path: `/v1/sessions/{id}`, percent-encoded as any URL path segment (`a/b` may be sent as `a/b` or
  `a%2Fb`; `café` as `caf%C3%A9`);
- header `X-Session-ID`: HTTP header values are bytes with no agreed character set, so the header is
  ASCII and carries the id percent-encoded as UTF-8 (RFC 3986): `caf%C3%A9` means `café`, `%25` a literal
  `%`. An id of printable ASCII without `%` needs no encoding. Raw non-ASCII bytes, a `%` not followed by
  two hex digits, or an encoding that is not UTF-8 are refused, never re-decoded as Latin-1;
- response header `X-Session-ID`: the id encoded the same way (`header_value`), so it is always valid
  ASCII that h11 and every client accept, and decodes back to the id.

Anything else is a 400 that names the rule (`RULE`).
"""

from __future__ import annotations

import re
import string
from urllib.parse import quote, unquote

MAX_SESSION_ID = 128
RULE = (
    f"a session id is 1 to {MAX_SESSION_ID} printable characters without whitespace; in the X-Session-ID "
    "header, percent-encode non-ASCII characters and '%' as UTF-8 (RFC 3986)"
)
# printable ASCII that the header carries as is: everything but '%' (the escape) and the space
_HEADER_SAFE = "".join(c for c in string.printable if c.isprintable() and c not in "% ")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class InvalidSessionId(ValueError):
    """The id breaks the grammar; the message names the rule."""


def check(value: str) -> str:
    """`value` if it is a valid session id, else InvalidSessionId."""
    ok = 0 < len(value) <= MAX_SESSION_ID and value.isprintable() and not any(c.isspace() for c in value)
    if not ok or not _utf8(value):
        raise InvalidSessionId(RULE)
    return value


def from_header(raw: str) -> str:
    """The id an `X-Session-ID` value carries (the value as the server decoded it, Latin-1 for bytes >= 0x80)."""
    if not raw.isascii() or _BAD_ESCAPE.search(raw):
        raise InvalidSessionId(RULE)
    try:
        decoded = unquote(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidSessionId(RULE) from exc
    return check(decoded)


def header_value(session_id: str) -> str:
    """The id as an ASCII header value (identity for printable ASCII without '%')."""
    return quote(session_id, safe=_HEADER_SAFE)


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
