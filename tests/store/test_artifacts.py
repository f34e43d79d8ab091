"""The content-addressed artifact store: dedup, atomic writes, integrity, non-local filesystems."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from skyloop.errors import IntegrityError, NotFound, StoreError
from skyloop.store.artifacts import ArtifactRef, ArtifactStore


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))


@pytest.fixture
def memory_store() -> Iterator[ArtifactStore]:
    url = f"memory://skyloop-tests/{uuid.uuid4().hex}"
    store = ArtifactStore(url)
    yield store
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def big(store: ArtifactStore, tag: str = "") -> dict[str, str]:
    """A value too large to be kept inline: it goes to a blob file."""
    return {"tag": tag, "payload": "x" * (store.inline_limit + 100)}


def test_a_large_value_is_stored_as_a_blob(store: ArtifactStore) -> None:
    value = big(store)
    ref = store.put(value)
    data = store.get_bytes(ref.digest)
    assert ref == ArtifactRef(hashlib.sha256(data).hexdigest(), "json", "dict", len(data))
    assert ref.data is None
    assert store.get(ref) == value
    assert store.exists(ref.digest)


def test_a_small_value_travels_inline_without_a_file(store: ArtifactStore, tmp_path: Path) -> None:
    ref = store.put({"a": [1, 2]})
    assert ref.data is not None and len(ref.data) == ref.size <= store.inline_limit
    assert ref.digest == hashlib.sha256(ref.data).hexdigest()
    assert (ref.serializer, ref.type_name) == ("json", "dict")
    assert store.get(ref, verify=True) == {"a": [1, 2]}
    assert not store.exists(ref.digest)
    assert blob_files(tmp_path / "artifacts") == []
    with pytest.raises(IntegrityError, match=ref.digest):
        store.get(dataclasses.replace(ref, data=b'{"a":[1,3]}'), verify=True)


def test_inline_limit_zero_stores_every_value_as_a_blob(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"), inline_limit=0)
    ref = store.put(1)
    assert ref.data is None and store.exists(ref.digest)
    assert store.get(ref, verify=True) == 1


def test_inline_and_blob_refs_of_equal_bytes_name_the_same_digest(store: ArtifactStore, tmp_path: Path) -> None:
    value = [1, 2, 3]
    inline = store.put(value)
    blob = ArtifactStore(str(tmp_path / "artifacts"), inline_limit=0).put(value)
    assert inline.digest == blob.digest and inline.data is not None and blob.data is None


def test_blobs_live_under_a_two_character_fan_out(store: ArtifactStore, tmp_path: Path) -> None:
    digest = store.put_bytes(b"abc")
    assert blob_files(tmp_path / "artifacts") == [tmp_path / "artifacts" / digest[:2] / digest]


def test_equal_values_are_stored_once(store: ArtifactStore, tmp_path: Path) -> None:
    first = store.put({"x": 1, "y": [1, 2, 3], **big(store)})
    second = store.put({"x": 1, "y": [1, 2, 3], **big(store)})  # another dict, equal and in the same order
    third = store.put(np.arange(store.inline_limit))
    assert first == second
    assert third.digest != first.digest
    assert len(blob_files(tmp_path / "artifacts")) == 2
    assert store.put_bytes(store.get_bytes(first.digest)) == first.digest
    assert len(blob_files(tmp_path / "artifacts")) == 2


def test_no_temporary_file_is_left_after_a_put(store: ArtifactStore, tmp_path: Path) -> None:
    for i in range(20):
        store.put_bytes(f"value {i}".encode() * 1000)
    names = [p.name for p in blob_files(tmp_path / "artifacts")]
    assert len(names) == 20
    assert not [n for n in names if n.startswith(".tmp-")]


def test_verify_detects_a_tampered_blob(store: ArtifactStore, tmp_path: Path) -> None:
    value = [1, 2, 3, *big(store)["payload"]]
    ref = store.put(value)
    path = tmp_path / "artifacts" / ref.digest[:2] / ref.digest
    path.write_bytes(path.read_bytes().replace(b"2", b"7", 1))
    assert store.get(ref)[:3] == [1, 7, 3]  # unverified reads trust the name
    with pytest.raises(IntegrityError, match=ref.digest):
        store.get(ref, verify=True)
    with pytest.raises(IntegrityError):
        store.get_bytes(ref.digest, verify=True)


def test_verify_passes_an_intact_blob(store: ArtifactStore) -> None:
    ref = store.put(np.arange(10_000))
    assert ref.data is None
    np.testing.assert_array_equal(store.get(ref, verify=True), np.arange(10_000))


def test_a_missing_digest_is_not_found(store: ArtifactStore) -> None:
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(digest)
    with pytest.raises(NotFound, match=digest):
        store.get_bytes(digest)
    with pytest.raises(NotFound):
        store.get(ArtifactRef(digest, "json", "int", 1))


def test_delete_removes_the_blob_and_tolerates_a_missing_one(store: ArtifactStore) -> None:
    digest = store.put_bytes(b"to delete")
    assert store.delete_unless_used(digest, since=time.time() + 60)
    assert not store.exists(digest)
    assert store.delete_unless_used(digest, since=time.time() + 60)
    with pytest.raises(NotFound):
        store.get_bytes(digest)
    assert store.put_bytes(b"to delete") == digest  # a deleted blob can be written again
    assert store.get_bytes(digest) == b"to delete"


def test_a_blob_written_or_reused_since_the_cutoff_is_not_deleted(store: ArtifactStore, tmp_path: Path) -> None:
    digest = store.put_bytes(b"in use")
    path = tmp_path / "artifacts" / digest[:2] / digest
    old = time.time() - 3600
    os.utime(path, (old, old))
    store.put_bytes(b"in use")  # a writer found it: it is about to record it, so it counts as used now
    assert path.stat().st_mtime > old + 3000
    assert not store.delete_unless_used(digest, since=time.time() - 60)
    assert store.get_bytes(digest) == b"in use"
    assert [p.name for p in blob_files(tmp_path)] == [digest]  # put back under its name, nothing aside
    os.utime(path, (old, old))
    assert store.delete_unless_used(digest, since=time.time() - 60)
    assert blob_files(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_storing_a_value_again_repairs_its_damaged_blob(store: ArtifactStore, tmp_path: Path, damage: str) -> None:
    data = b"model weights " * 100
    digest = store.put_bytes(data)
    path = tmp_path / "artifacts" / digest[:2] / digest
    path.write_bytes(data[:10] if damage == "truncate" else data[:-1] + b"!")
    with pytest.raises(IntegrityError):
        store.get_bytes(digest, verify=True)
    # A truncated blob is seen by its size on every write; other damage by writes that verify (the registry's).
    store.put_bytes(data, verify=damage == "flip")
    assert store.get_bytes(digest, verify=True) == data


def test_a_bad_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="nosuchprotocol"):
        ArtifactStore("nosuchprotocol://bucket/path")


def test_an_unwritable_folder_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    store = ArtifactStore(str(tmp_path / "file" / "artifacts"))
    with pytest.raises(StoreError, match="cannot write"):
        store.put_bytes(b"x")


def test_a_memory_filesystem_works_like_a_folder(memory_store: ArtifactStore) -> None:
    assert not memory_store._local
    value = big(memory_store, "memory")
    ref = memory_store.put(value)
    again = memory_store.put(dict(value))
    assert again == ref and ref.data is None
    assert memory_store.get(ref, verify=True) == value
    files = memory_store.fs.find(memory_store.root)
    assert [f.rsplit("/", 1)[1] for f in files] == [ref.digest]
    memory_store.fs.pipe_file(files[0], b'{"k":"tampered"}')
    with pytest.raises(IntegrityError):
        memory_store.get(ref, verify=True)
    assert memory_store.put(value) == ref  # its size differs: written again
    assert memory_store.get(ref, verify=True) == value
    assert memory_store.delete_unless_used(ref.digest, since=time.time())
    assert not memory_store.exists(ref.digest)
    with pytest.raises(NotFound):
        memory_store.get_bytes(ref.digest)
    assert memory_store.get(memory_store.put("small")) == "small"


# -- a writer killed mid-write ----------------------------------------------------------------------

BLOB_MB = 128

WRITER = textwrap.dedent("""
    import sys
    from skyloop.store.artifacts import ArtifactStore

    data = bytes(range(256)) * (int(sys.argv[2]) * 4096)
    print("ready", flush=True)
    ArtifactStore(sys.argv[1]).put_bytes(data)
    print("done", flush=True)
""")


def _kill_mid_write(root: Path) -> bool:
    """Start a writer of a big blob and SIGKILL it as soon as its temporary file appears.

    Returns whether the kill came while the temporary file existed.
    """
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(BLOB_MB)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        seen_tmp = False
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(".tmp-") for p in root.rglob(".tmp-*")):
                seen_tmp = True
                break
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return seen_tmp
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.integration
def test_a_writer_killed_mid_write_leaves_no_partial_blob(tmp_path: Path) -> None:
    data = bytes(range(256)) * (BLOB_MB * 4096)
    digest = hashlib.sha256(data).hexdigest()
    root = tmp_path / "artifacts"
    final = root / digest[:2] / digest
    for _ in range(3):  # the kill must land while the temp file is being written; retry if the writer was quicker
        seen_tmp = _kill_mid_write(root)
        # Whatever happened, the blob's name shows either nothing or all of its bytes.
        assert not final.exists() or final.stat().st_size == len(data)
        if seen_tmp and not final.exists():
            break
        shutil.rmtree(root, ignore_errors=True)
    else:
        pytest.fail("the writer was never caught mid-write")
    assert not final.exists()
    temps = list(root.rglob(".tmp-*"))
    assert temps and all(t.stat().st_size <= len(data) for t in temps)
    # The stray temp file does not confuse the store: the next put writes the blob whole.
    store = ArtifactStore(str(root))
    assert not store.exists(digest)
    assert store.put_bytes(data) == digest
    assert final.stat().st_size == len(data)
    assert store.get_bytes(digest, verify=True) == data


def test_urls_that_fail_in_odd_ways_are_store_errors(tmp_path: Path) -> None:
    # fsspec raised TypeError, FileNotFoundError or ConnectionRefusedError for these: the CLI said "internal error".
    for url in ["reference://", f"zip://x::{tmp_path / 'nonexistent.zip'}", "ftp://127.0.0.1:1/x"]:
        with pytest.raises(StoreError, match="cannot open artifact store"):
            ArtifactStore(url)


def test_a_backends_own_errors_in_put_and_get_are_store_errors(tmp_path: Path) -> None:
    import zipfile

    data = b"weights " * 1000
    digest = hashlib.sha256(data).hexdigest()
    archive = tmp_path / "store.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # a store in a read-only zip file, one blob damaged inside
        zf.writestr(f"root/{digest[:2]}/{digest}", data)
    raw = archive.read_bytes()
    archive.write_bytes(raw.replace(data[:40], b"X" * 40, 1))
    store = ArtifactStore(f"zip://root::{archive}")
    with pytest.raises(StoreError, match=r"cannot write artifact .*ValueError"):  # the zip is open to read only
        store.put_bytes(b"new " * 1000)
    with pytest.raises(StoreError, match=r"cannot read artifact .*BadZipFile"):  # not an OSError
        store.get_bytes(digest)
