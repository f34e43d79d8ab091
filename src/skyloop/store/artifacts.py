"""Content-addressed artifact blobs on any fsspec filesystem (a local folder by default)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from skyloop.errors import IntegrityError, NotFound, StoreError
from skyloop.store.serializers import deserialize, serialize, type_name

__all__ = ["ArtifactRef", "ArtifactStore"]


@dataclass(frozen=True)
class ArtifactRef:
    """A stored value: its sha256, how it was serialized, its type and size."""

    digest: str
    serializer: str
    type_name: str
    size: int
    data: bytes | None = None
    """The bytes themselves when small enough to travel and be stored inline (no blob file)."""


class ArtifactStore:
    """Blobs named by the sha256 of their bytes: `<root>/<ab>/<abcdef...>`.

    Writes go to a temporary name and are renamed into place, so a reader never sees half a blob
    and a crash leaves at most a stray temporary file. Equal bytes are stored once.
    """

    INLINE_LIMIT = 2048
    """Values whose bytes are at most this long are kept inline (in the ref and the DB row), not as files:
    creating a file costs more than the whole orchestration of a small step."""
    VERIFY_REUSE_LIMIT = 256 * 1024
    """A blob up to this size is read and compared before it is reused (larger ones only by their size, unless
    `verify`): cheap next to serializing the value, and it repairs damage that kept the size."""

    def __init__(self, url: str, inline_limit: int = INLINE_LIMIT) -> None:
        self.url = url
        self.inline_limit = inline_limit
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except Exception as exc:  # an unknown scheme, a missing extra, or whatever a backend raises when it connects
            raise StoreError(f"cannot open artifact store {url!r} ({type(exc).__name__}: {exc}); check "
                             "SKYLOOP_ARTIFACTS_URL (and the fsspec extra its scheme needs)") from exc
        self.root = root.rstrip("/")
        self._local = self.fs.protocol in ("file", "local") or "file" in (self.fs.protocol or ())
        self._made: set[str] = set()

    def _path(self, digest: str) -> str:
        return f"{self.root}/{digest[:2]}/{digest}"

    def put_bytes(self, data: bytes, verify: bool = False) -> str:
        """Store `data` (once) and return its sha256.

        A blob already there is reused when its size matches (with `verify`, or when it is at most
        `VERIFY_REUSE_LIMIT` long, its bytes too) and written again when it does not: a damaged blob is
        repaired by storing the same value again. On a local folder a reuse also touches the blob, which
        tells garbage collection that a writer is about to record it (see `delete_unless_used`).

        Blobs are not fsynced (that costs ~9 ms a blob against ~0.5 ms, in every step's output): after a
        power loss one may be left empty or cut short, or hold other bytes. Such damage is caught where it
        would do harm: a cache hit needs the blob's size to be its row's (`touch`), a blob that fails to load
        is checked against its sha256 (`get`), and either way the step that wrote it runs again.
        """
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        try:
            if self._reuse(path, data, verify or len(data) <= self.VERIFY_REUSE_LIMIT):
                return digest
            folder = path.rsplit("/", 1)[0]
            if folder not in self._made:
                self.fs.makedirs(folder, exist_ok=True)
                self._made.add(folder)
            tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
            if self._local:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
        except Exception as exc:  # OSError, or what a backend raises instead (botocore's, NotImplementedError...)
            raise StoreError(f"cannot write artifact {digest[:12]} to {self.url} ({type(exc).__name__}: {exc})") \
                from exc
        return digest

    def _reuse(self, path: str, data: bytes, verify: bool) -> bool:
        """Whether the blob at `path` holds `data` already (touched, on a local folder)."""
        if not self._local:
            return bool(self.fs.exists(path)) and self.fs.size(path) == len(data) \
                and (not verify or self.fs.cat_file(path) == data)
        try:
            if os.stat(path).st_size != len(data):
                return False
            if verify:
                with open(path, "rb") as fh:
                    if fh.read() != data:
                        return False
            os.utime(path)
        except FileNotFoundError:  # never there, or garbage collection took it just now
            return False
        return True

    def get_bytes(self, digest: str, verify: bool = False) -> bytes:
        """The bytes stored under `digest`."""
        path = self._path(digest)
        try:
            if self._local:
                with open(path, "rb") as fh:
                    data = fh.read()
            else:
                data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise NotFound(f"artifact {digest} is not in the store {self.url}") from None
        except Exception as exc:  # OSError, or what a backend raises instead
            raise StoreError(f"cannot read artifact {digest[:12]} from {self.url} ({type(exc).__name__}: {exc})") \
                from exc
        if verify and hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"artifact {digest} is corrupt: its bytes no longer match its sha256")
        return bytes(data)

    def put(self, value: object) -> ArtifactRef:
        """Serialize and store `value`."""
        serializer, data = serialize(value)
        if len(data) <= self.inline_limit:
            return ArtifactRef(hashlib.sha256(data).hexdigest(), serializer, type_name(value), len(data), data)
        return ArtifactRef(self.put_bytes(data), serializer, type_name(value), len(data))

    def get(self, ref: ArtifactRef, verify: bool = False) -> Any:
        """Load the value behind `ref` (from the ref itself when it is inline).

        A blob that does not load is checked against its sha256: a damaged one (a crash or the disk changed
        it) raises `IntegrityError` and is removed, so that the cache no longer hands it out and the step
        that wrote it runs again; one that is intact fails with its own error (a class that is gone...).
        """
        if ref.data is not None:
            if verify and hashlib.sha256(ref.data).hexdigest() != ref.digest:
                raise IntegrityError(f"artifact {ref.digest} is corrupt: its bytes no longer match its sha256")
            return deserialize(ref.serializer, ref.data)
        data = self.get_bytes(ref.digest, verify=verify)
        try:
            return deserialize(ref.serializer, data)
        except Exception as exc:
            if hashlib.sha256(data).hexdigest() == ref.digest:
                raise
            removed = self._remove_damaged(ref.digest)
            then = ("it was removed: the step that wrote it runs again on the next run (or store the value "
                    "again)") if removed else "store the value again to repair it"
            raise IntegrityError(
                f"artifact {ref.digest[:12]} ({ref.type_name}) is damaged: {len(data):,} bytes that no longer "
                f"match its sha256 (they failed to load: {type(exc).__name__}: {exc}); {then}") from exc

    def _remove_damaged(self, digest: str) -> bool:
        """Remove a blob whose bytes no longer match `digest`; False when a writer put the right bytes back
        meanwhile (kept), or it cannot be removed."""
        path = self._path(digest)
        try:
            if not self._local:
                if hashlib.sha256(self.fs.cat_file(path)).hexdigest() == digest:
                    return False
                self.fs.rm_file(path)
                return True
            # Set aside first (atomic), like `delete_unless_used`: a writer may replace it with good bytes now.
            aside = f"{path.rsplit('/', 1)[0]}/.gc-{uuid.uuid4().hex}"
            os.rename(path, aside)
            with open(aside, "rb") as fh:
                if hashlib.sha256(fh.read()).hexdigest() == digest:
                    os.replace(aside, path)
                    return False
            os.remove(aside)
        except FileNotFoundError:
            pass
        except Exception:  # removing is a repair: the error to report is the damage
            return False
        return True

    def exists(self, digest: str) -> bool:
        """Whether the blob is present."""
        return bool(self.fs.exists(self._path(digest)))

    def touch(self, digest: str, size: int | None = None) -> bool:
        """Mark the blob as just used, which garbage collection running now respects (see `delete_unless_used`);
        False when it is gone, or is not `size` bytes long (damaged: empty or cut short by a crash). Elsewhere
        than a local folder: whether it exists (with that size)."""
        path = self._path(digest)
        try:
            if not self._local:
                return bool(self.fs.exists(path)) and (size is None or self.fs.size(path) == size)
            os.utime(path)
            return size is None or os.stat(path).st_size == size
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise StoreError(f"cannot touch artifact {digest[:12]} in {self.url} ({type(exc).__name__}: {exc})") \
                from exc

    def stale_blobs(self, since: float) -> list[tuple[str, int]]:
        """`(digest, size)` of every blob last written or reused before `since` (a Unix time), on a local folder
        (elsewhere none: listing a bucket costs too much); the leftovers of a collection killed midway, whose
        `.gc-` files are removed here too.
        """
        if not self._local:
            return []
        found: list[tuple[str, int]] = []
        try:
            folders = [entry.path for entry in os.scandir(self.root) if entry.is_dir() and len(entry.name) == 2]
        except FileNotFoundError:  # nothing was ever stored
            return []
        for folder in folders:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        info = entry.stat()
                    except FileNotFoundError:  # gone meanwhile (another collection, a rename aside)
                        continue
                    if info.st_mtime >= since:
                        continue
                    if entry.name.startswith((".gc-", ".tmp-")):
                        # Set aside by a collection that died before removing it (a live one holds its file
                        # for an instant, and removes it itself when its time is as old as this), or half
                        # written by a writer that died (a live one's file has the time of its last write).
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(entry.path)
                    elif len(entry.name) == 64 and entry.name.startswith(os.path.basename(folder)):
                        found.append((entry.name, info.st_size))
        return found

    def delete_unless_used(self, digest: str, since: float) -> bool:
        """Remove the blob unless it was written or reused at or after `since` (a Unix time); True when
        it is gone (or never was).

        Garbage collection marks a row deleted and then calls this, while a writer that found the blob
        may still be about to record it again. On a local folder the two meet on the blob itself: the
        blob is renamed aside (atomic) and its time read there; a writer that touched it before the
        rename shows in that time, and the blob goes back; one that comes after finds no blob and
        writes it again. Elsewhere (object stores have no cheap touch) the blob is removed.
        """
        path = self._path(digest)
        try:
            if not self._local:
                self.fs.rm_file(path)
                return True
            aside = f"{path.rsplit('/', 1)[0]}/.gc-{uuid.uuid4().hex}"
            os.rename(path, aside)
            if os.stat(aside).st_mtime >= since:
                os.replace(aside, path)  # a writer may have written it again meanwhile: the same bytes
                return False
            os.remove(aside)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise StoreError(f"cannot delete artifact {digest[:12]} ({type(exc).__name__}: {exc})") from exc
        return True

