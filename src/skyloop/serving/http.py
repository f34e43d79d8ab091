"""The HTTP/1.1 protocol the servers run: uvicorn's httptools one, with a bound on the size of a request's head.

httptools (llhttp) sets no limit on a request line or headers, and uvicorn keeps what it has been given: one
client that streamed an endless header had it all held in memory (300 MiB from one connection), so that a few
could exhaust a server. Here a head past `MAX_HEAD_BYTES` is answered 431 and the connection closed.
Pass the class as uvicorn's `http=`.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_HEAD_BYTES", "BoundedHttpToolsProtocol"]

MAX_HEAD_BYTES = 64 * 1024
"""The most bytes a request line and its headers may take (nginx takes 32 KiB at most by default, Node 16 KiB)."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing with 431 a request whose head is over `MAX_HEAD_BYTES`."""

    _head_pending = True
    """Whether the bytes coming in belong to a request's head (nothing of its body has come yet)."""
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        # Counted only while a head is pending, and judged once the parser has taken the chunk: a chunk that
        # completes the head may carry body bytes too, and is never refused for them.
        if self._head_pending:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_pending and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse_head()

    def on_headers_complete(self) -> None:
        self._head_pending, self._head_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_pending = True  # what comes next on this connection is the next request's head
        super().on_message_complete()

    def _refuse_head(self) -> None:
        body = orjson.dumps({"error": f"the request line and headers are over the limit of {MAX_HEAD_BYTES} bytes"})
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()
