"""The relay between the workers of one server: feedback passed on to the worker that answered, and what the
worker that took it reports when that one cannot be asked."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
from pathlib import Path

import pytest

from skyloop.errors import NotFound
from skyloop.serving.relay import Relay, Told


def test_a_worker_is_told_over_its_socket_and_a_silent_one_is_named() -> None:
    relay = Relay(2)
    heard: list[tuple[str, str | None, bytes]] = []

    async def tell_here(model: str, version: str | None, body: bytes) -> Told:
        if model == "gone":
            raise NotFound("no model 'gone'")
        heard.append((model, version, body))
        return 2, {"router": "ValueError: no arm 3"}

    async def scenario() -> tuple[Told, Told, Told]:
        await relay.serve(tell_here)  # this process plays worker 0; nobody serves worker 1's socket
        try:
            told = await relay.tell(0, "iris", "2", b'{"id": "a", "reward": 1}')
            refused = await relay.tell(0, "gone", None, b'{"id": "b", "reward": 1}')
            silent = await relay.tell(1, "iris", None, b'{"id": "c", "reward": 1}', timeout=0.3)
            return told, refused, silent
        finally:
            await relay.aclose()

    try:
        assert stat.S_IMODE(os.stat(relay.folder).st_mode) == 0o700  # no other user may connect
        told, refused, silent = asyncio.run(scenario())
    finally:
        relay.close()
    assert told == (2, {"router": "ValueError: no arm 3"})
    assert heard == [("iris", "2", b'{"id": "a", "reward": 1}')]
    assert refused == (0, {"(relay)": "NotFound: no model 'gone'"})
    assert silent == (0, {"(worker 1)": "the worker that gave the answer did not answer in 0.3 s (it may still tell "
                                        "its nodes); the feedback is stored"})
    assert not os.path.exists(relay.folder)


def test_a_temp_folder_too_long_for_a_socket_path_falls_back_to_tmp(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A $TMPDIR of 90 characters made every socket path longer than Linux takes (107): `serve --workers 2` died
    # with "AF_UNIX path too long".
    long = tmp_path / ("x" * max(1, 90 - len(str(tmp_path))))
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    relay = Relay(16)
    try:
        assert relay.folder.startswith("/tmp/skyloop-relay-") and len(relay.listeners) == 16
    finally:
        relay.close()
    assert not os.path.exists(relay.folder) and not list(long.iterdir())
