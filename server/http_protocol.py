"""The HTTP/1.1 protocol uvicorn runs: httptools (llhttp) with a bound on a request's head.

uvicorn parses with httptools when it is installed (with uvloop, 20-44% less event-loop CPU per streamed
token than asyncio and h11 on a 2-core CPU, BENCHMARKS.md session 12), but unlike h11, which refuses a
head (request line and headers) past 16 KiB, httptools keeps whatever a client sends until the blank line:
one connection could hold hundreds of MiB of header. `BoundedHttpToolsProtocol` answers 400 (as uvicorn
does for any request it cannot parse, and as h11 did for a long head) and closes the connection once a
head passes `MAX_HEAD_BYTES`, counted two ways:
- the URL and each header as the parser hands them over (exact, for a head that arrives whole);
- every received chunk while the head is still incomplete after it (a header that never ends is cut off
  within a chunk of the bound; a chunk that also holds the previous pipelined request's end counts whole).
"""

from __future__ import annotations

import asyncio

MAX_HEAD_BYTES = 64 * 1024

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn's h11 protocol, which bounds heads itself
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops, uvicorn answers 400 and closes."""


def http_protocol() -> type[asyncio.Protocol] | str:
    """What `uvicorn.Config(http=...)` gets: the bounded httptools protocol, else "h11"."""
    return _bounded() if HttpToolsProtocol is not None else "h11"


def _bounded() -> type[asyncio.Protocol]:
    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0  # received while the head is incomplete
        _field_bytes = 0  # the current head's URL and headers
        _in_head = True

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("request head over %d bytes: answered 400", MAX_HEAD_BYTES)
                self.send_400_response(f"Request head larger than {MAX_HEAD_BYTES} bytes.")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._field_bytes = True, 0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def _count(self, n: int) -> None:
            self._field_bytes += n
            if self._field_bytes > MAX_HEAD_BYTES:
                self.logger.warning("request head over %d bytes: answered 400", MAX_HEAD_BYTES)
                raise HeadTooLarge

    return BoundedHttpToolsProtocol
