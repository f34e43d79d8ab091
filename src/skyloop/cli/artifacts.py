"""`skyloop artifacts gc|lineage`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from skyloop.cli.main import console, state
from skyloop.cli.output import print_json
from skyloop.errors import SpecError
from skyloop.store.gc import collect_garbage, parse_age
from skyloop.store.lineage import consumers, deleted_at, producers, resolve_digest
from skyloop.store.workspace import Workspace

__all__ = ["app"]

app = typer.Typer(help="Manage stored artifacts.", no_args_is_help=True)


@app.command()
def gc(
    older_than: Annotated[str, typer.Option("--older-than", help="Unused for this long: 30d, 12h, 15m.")] = "30d",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Delete artifacts unused for a while that no registered model and no live run references."""
    try:
        age = parse_age(older_than)
        datetime.now(UTC) - age  # the cutoff the collection computes
    except OverflowError:  # more days than a timedelta holds, or a cutoff before the year 1
        raise SpecError(f"age {older_than!r} reaches back before the year 1, and nothing stored is that old; "
                        "give a shorter age, e.g. 30d or 52w") from None
    report = collect_garbage(Workspace.open(state.settings()), age, dry_run=dry_run)
    if as_json:
        print_json({"artifacts": report.artifacts, "bytes": report.bytes, "dry_run": report.dry_run,
                    "digests": report.digests, "orphans": report.orphans, "orphan_bytes": report.orphan_bytes})
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {report.artifacts} artifact(s), {report.bytes:,} bytes")
    if report.orphans:
        console.print(f"and {report.orphans} blob(s) an interrupted collection left, {report.orphan_bytes:,} bytes")


@app.command()
def lineage(digest: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Which step runs produced an artifact and which consumed it, and whether garbage collection deleted it."""
    workspace = Workspace.open(state.settings())
    with workspace.db.session() as session:
        digest = resolve_digest(session, digest)
        edges = producers(session, digest) + consumers(session, digest)
        deleted = deleted_at(session, digest)
    if as_json:
        # `position`: the place in a gathered input (-1 for any other), which tells equal values read apart.
        print_json([{"direction": "produced" if e.direction == "out" else "consumed", "run": e.run_id,
                     "step": e.task, "map_index": e.map_index, "as": e.name, "position": e.position,
                     "artifact_deleted_at": deleted} for e in edges])
        return
    if deleted is not None:
        when = deleted.isoformat(timespec="seconds")
        console.print(f"artifact {digest[:12]}: deleted by garbage collection at {when} "
                      "(its lineage stays; running its producer again makes it again)", highlight=False)
    if not edges:
        console.print(f"artifact {digest[:12]}: no step run produced or read it (a registered model's files: "
                      "`skyloop models show` names the run and step that logged them)", highlight=False)
    for e in edges:
        index = f"[{e.map_index}]" if e.map_index >= 0 else ""
        position = f"[{e.position}]" if e.position >= 0 else ""
        verb = "produced by" if e.direction == "out" else "consumed by"
        console.print(f"{verb}: run {e.run_id[:12]} step {e.task}{index} as {e.name}{position}", highlight=False)
