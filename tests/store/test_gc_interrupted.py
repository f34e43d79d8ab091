"""A garbage collection killed midway (SIGKILL, Ctrl-C, OOM) leaves blobs behind: the next one removes them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from tests_support import age_blobs

from skyloop import Settings
from skyloop.store.gc import collect_garbage
from skyloop.store.lineage import pin, record_artifacts
from skyloop.store.models import Artifact
from skyloop.store.runs import utcnow
from skyloop.store.workspace import Workspace

# Collects in another process that dies (SIGKILL) right after setting its third blob aside: two blobs
# removed, one left under its `.gc-` name, the rest untouched, every row already marked deleted.
_KILLED_COLLECTOR = textwrap.dedent("""
    import os, signal, sys
    from datetime import timedelta
    from pathlib import Path
    from skyloop import Settings
    from skyloop.store.gc import collect_garbage
    from skyloop.store.workspace import Workspace

    rename, asides = os.rename, []

    def rename_then_die(src, dst):
        rename(src, dst)
        if "/.gc-" in str(dst):
            asides.append(dst)
            if len(asides) == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die
    collect_garbage(Workspace.open(Settings.for_home(Path(sys.argv[1]))), timedelta(hours=1))
""")


def _files(root: str) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def test_the_next_collection_removes_what_a_killed_one_left(settings: Settings, workspace: Workspace) -> None:
    victims = [workspace.store.put(os.urandom(4000)) for _ in range(6)]
    pinned = workspace.store.put(os.urandom(4000))
    unrecorded = workspace.store.put(os.urandom(4000))  # its writer has not recorded it (yet)
    with workspace.db.session() as session:
        record_artifacts(session, [*victims, pinned])
        pin(session, pinned.digest, "model:m/1")
        session.execute(update(Artifact).values(last_used_at=utcnow() - timedelta(hours=2)))
    age_blobs(workspace.store, 7200)

    killed = subprocess.run([sys.executable, "-c", _KILLED_COLLECTOR, str(settings.home)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with workspace.db.read() as session:
        dead = set(session.scalars(select(Artifact.digest).where(Artifact.deleted_at.is_not(None))))
    assert dead == {ref.digest for ref in victims}
    left = _files(workspace.store.root)
    assert len([p for p in left if p.name.startswith(".gc-")]) == 1
    assert len(left) == 6  # 3 victims' blobs and one set aside, the pinned one, the unrecorded one

    report = collect_garbage(workspace, timedelta(hours=1))
    assert (report.artifacts, report.orphans, report.orphan_bytes) == (0, 3, 3 * victims[0].size)
    assert [p.name for p in _files(workspace.store.root)] == sorted([pinned.digest, unrecorded.digest])
    assert workspace.store.get(pinned, verify=True) is not None
    assert collect_garbage(workspace, timedelta(hours=1)).orphans == 0


def test_a_blob_a_writer_reuses_is_not_taken_for_an_orphan(workspace: Workspace) -> None:
    # A row marked deleted whose value a writer is storing again: it found the blob (touching it) and is
    # about to record its row, which revives it.
    ref = workspace.store.put(os.urandom(4000))
    with workspace.db.session() as session:
        record_artifacts(session, [ref])
        session.execute(update(Artifact).values(last_used_at=utcnow() - timedelta(hours=2),
                                                deleted_at=utcnow() - timedelta(hours=1)))
    age_blobs(workspace.store, 7200)
    again = workspace.store.put(workspace.store.get(ref))  # the writer, before it records
    assert collect_garbage(workspace, timedelta(hours=1)).orphans == 0
    with workspace.db.session() as session:
        record_artifacts(session, [again])
    assert workspace.store.get(again, verify=True) is not None


def test_half_written_files_of_a_dead_writer_go_and_a_live_writers_stay(workspace: Workspace) -> None:
    # A writer killed mid-write leaves its `.tmp-` file; one writing now has the time of its last write.
    ref = workspace.store.put(os.urandom(4000))
    folder = Path(workspace.store.root) / ref.digest[:2]
    dead, live = folder / ".tmp-dead", folder / ".tmp-live"
    dead.write_bytes(os.urandom(1000))
    age_blobs(workspace.store, 7200)
    live.write_bytes(os.urandom(1000))
    collect_garbage(workspace, timedelta(hours=1))
    assert not dead.exists() and live.exists()
    assert workspace.store.exists(ref.digest)  # a blob with no row: its writer may record it yet
