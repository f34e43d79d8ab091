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

    def __init__(self, url: str, inline_limit: int = INLINE_LIMIT) -> None:
        self.url = url
        self.inline_limit = inline_limit
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as exc:
            raise StoreError(f"cannot open artifact store {url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self._local = self.fs.protocol in ("file", "local") or "file" in (self.fs.protocol or ())
        self._made: set[str] = set()

    def _path(self, digest: str) -> str:
        return f"{self.root}/{digest[:2]}/{digest}"

    def put_bytes(self, data: bytes, verify: bool = False) -> str:
        """Store `data` (once) and return its sha256.

        A blob already there is reused when its size matches (with `verify`, its bytes too) and written
        again when it does not: a damaged blob is repaired by storing the same value again. On a local
        folder a reuse also touches the blob, which tells garbage collection that a writer is about to
        record it (see `delete_unless_used`).
        """
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        try:
            if self._reuse(path, data, verify):
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
        except OSError as exc:
            raise StoreError(f"cannot write artifact {digest[:12]} to {self.url}: {exc}") from exc
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
        except OSError as exc:
            raise StoreError(f"cannot read artifact {digest[:12]} from {self.url}: {exc}") from exc
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
        """Load the value behind `ref` (from the ref itself when it is inline)."""
        if ref.data is not None:
            if verify and hashlib.sha256(ref.data).hexdigest() != ref.digest:
                raise IntegrityError(f"artifact {ref.digest} is corrupt: its bytes no longer match its sha256")
            return deserialize(ref.serializer, ref.data)
        return deserialize(ref.serializer, self.get_bytes(ref.digest, verify=verify))

    def exists(self, digest: str) -> bool:
        """Whether the blob is present."""
        return bool(self.fs.exists(self._path(digest)))

    def touch(self, digest: str) -> bool:
        """Mark the blob as just used, which garbage collection running now respects (see `delete_unless_used`);
        False when it is gone. Elsewhere than a local folder: whether it exists."""
        path = self._path(digest)
        if not self._local:
            return bool(self.fs.exists(path))
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot touch artifact {digest[:12]} in {self.url}: {exc}") from exc
        return True

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
        except OSError as exc:
            raise StoreError(f"cannot delete artifact {digest[:12]}: {exc}") from exc
        return True
