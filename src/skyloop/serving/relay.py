"""Feedback passed on to the worker process that gave the answer, so that its graph's nodes hear it.

With several workers on one port, an answer and its feedback may reach different processes. Any worker
can check and store feedback (the table of answered ids is shared, and the DB holds the rest), but the
request's inputs and its path through the graph (which child a router chose) stay in the memory of the worker
that answered, and so does a learning node's state: a bandit router in worker 0 must hear the rewards for
worker 0's answers. The worker that takes the feedback stores it, then passes the body on to the answering
worker over that worker's Unix socket, and reports what its nodes said.

The sockets are made and listening before the fork, one per worker slot, in a folder only this user can
enter, so a worker started in place of a dead one serves its slot's socket at once (what the dead one answered
is gone with it: its feedback is stored, and reaches no node). Frames are a 4-byte length and a JSON
document: `{"model", "version", "body"}` there, `{"told", "failed"}` back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from skyloop.scratch import Scratch

__all__ = ["RELAY_SECONDS", "Relay", "Told"]

RELAY_SECONDS = 5.0
"""How long the worker that takes feedback waits for the answering worker's nodes (well within the 10 s that
workers are given to drain when the server stops)."""

Told = tuple[int, dict[str, str]]
"""(nodes told, node -> error of those that failed)."""

_LENGTH = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024
_MAX_PATH = 107
"""The longest path of a Unix socket on Linux (`sun_path` less its final NUL)."""


class Relay:
    """One listening Unix socket per worker slot; `serve` in each worker, `tell` to reach another."""

    def __init__(self, workers: int) -> None:
        # Mode 0700: no other user may connect. Under /tmp when $TMPDIR is too long for a socket's path.
        self._scratch = Scratch("relay")
        if len(self._path(workers - 1)) > _MAX_PATH:
            self._scratch.remove()
            self._scratch = Scratch("relay", dir="/tmp")
        self._listeners: list[socket.socket] = []
        try:
            for index in range(workers):
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listeners.append(listener)
                listener.bind(self._path(index))
                listener.listen(socket.SOMAXCONN)
        except BaseException:
            self.close()
            raise
        self.part = 0
        """The slot of this process (set in each forked worker by `use_part`)."""
        self._server: asyncio.AbstractServer | None = None

    @property
    def folder(self) -> str:
        """Where the sockets are."""
        return self._scratch.path

    def _path(self, index: int) -> str:
        return os.path.join(self.folder, f"w{index}.sock")

    @property
    def listeners(self) -> list[socket.socket]:
        """The listening sockets (the parent closes its copies as soon as it tells the workers to stop, so that a
        worker relaying to one that has drained is refused at once instead of waiting)."""
        return self._listeners

    def use_part(self, index: int) -> None:
        """This process is the worker of slot `index`: it keeps that slot's socket alone."""
        self.part = index
        for other, listener in enumerate(self._listeners):
            if other != index:
                listener.close()

    async def serve(self, tell_here: Callable[[str, str | None, bytes], Awaitable[Told]]) -> None:
        """Answer the other workers on this slot's socket (on the event loop that serves HTTP)."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                doc = orjson.loads(await _read_frame(reader))
                told, failed = await tell_here(doc["model"], doc["version"], doc["body"].encode())
                _write_frame(writer, {"told": told, "failed": failed})
                await writer.drain()
            except Exception as exc:  # the other worker reports it; this one serves on
                with contextlib.suppress(Exception):
                    _write_frame(writer, {"told": 0, "failed": {"(relay)": f"{type(exc).__name__}: {exc}"}})
                    await writer.drain()
            finally:
                writer.close()

        self._server = await asyncio.start_unix_server(handle, sock=self._listeners[self.part])

    async def tell(self, part: int, model: str, version: str | None, body: bytes,
                   timeout: float = RELAY_SECONDS) -> Told:
        """Pass feedback on to the worker of slot `part`; what its nodes said, or why it could not be asked."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(self._path(part))
                try:
                    _write_frame(writer, {"model": model, "version": version, "body": body.decode()})
                    await writer.drain()
                    doc = orjson.loads(await _read_frame(reader))
                finally:
                    writer.close()
            return int(doc["told"]), {str(k): str(v) for k, v in dict(doc["failed"]).items()}
        except TimeoutError:
            reason = f"did not answer in {timeout:g} s (it may still tell its nodes)"
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, TypeError) as exc:
            reason = f"could not be reached ({type(exc).__name__}: {exc})"
        return 0, {f"(worker {part})": f"the worker that gave the answer {reason}; the feedback is stored"}

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def close(self) -> None:
        """Close the sockets and remove their folder (the parent, once its workers are gone)."""
        for listener in self._listeners:
            listener.close()
        self._scratch.remove()


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > _MAX_FRAME:
        raise ValueError(f"a relay frame of {size} bytes (at most {_MAX_FRAME})")
    return await reader.readexactly(size)


def _write_frame(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    data = orjson.dumps(doc)
    writer.write(_LENGTH.pack(len(data)) + data)
