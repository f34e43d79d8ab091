"""Tables and JSON for runs, shared by `run` and `runs`."""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from skyloop.cli.output import print_json, printable
from skyloop.cli.progress import state_text
from skyloop.execution.run import Run
from skyloop.store.lineage import CollectedOutput, collected_outputs

__all__ = ["output_json", "run_json", "run_table", "show_run"]

PREVIEW_BYTES = 2048
"""Plain (JSON) outputs up to this size are shown as values; others by type, size and digest."""


def output_json(run: Run) -> dict[str, Any]:
    """The pipeline's outputs for people and scripts: a small plain value as itself (`value`), every stored one
    by `type`, `size` and `digest` (for `skyloop artifacts lineage`), a mapped step's as its list of digests;
    one that garbage collection deleted since by the same and `deleted_at` (a mapped step's: `collected`, how many
    of its units'); None for one not produced."""
    collected = _collected(run)
    out: dict[str, Any] = {}
    for name, ref in run.output_refs().items():
        binding = run.spec.outputs[name]
        gone = collected.get((binding.task, binding.output), [])
        if ref is None:
            out[name] = None if not gone or gone[0].map_index >= 0 else {
                "type": gone[0].type_name, "size": gone[0].size, "digest": gone[0].digest,
                "deleted_at": gone[0].deleted_at}
        elif isinstance(ref, list):
            out[name] = {"type": "list", "items": len(ref), "digests": [r.digest for r in ref]}
            if gone:
                out[name]["collected"] = len(gone)
        else:
            entry: dict[str, Any] = {"type": ref.type_name, "size": ref.size, "digest": ref.digest}
            if ref.serializer == "json" and ref.size <= PREVIEW_BYTES:
                entry["value"] = run.load(ref)
            out[name] = entry
    return out


def _collected(run: Run) -> dict[tuple[str, str], list[CollectedOutput]]:
    """(task, output name) -> its units' artifacts that garbage collection deleted (`Run.output_refs` gives None
    for those, as for an output never made; a mapped step's list leaves them out)."""
    found: dict[tuple[str, str], list[CollectedOutput]] = {}
    with run.workspace.db.read() as session:
        for item in collected_outputs(session, run.id):
            found.setdefault((item.task, item.name), []).append(item)
    return found


def _output_line(name: str, entry: dict[str, Any] | None) -> Text:
    if entry is None:
        return Text.assemble("  ", (name, "bold"), ": not produced")
    if "deleted_at" in entry:
        return Text.assemble("  ", (name, "bold"), f": garbage-collected ({printable(entry['type'])}, "
                             f"{entry['size']:,} bytes, artifact {entry['digest'][:12]}; run the pipeline again "
                             "to make it again)")
    if "value" in entry:
        # JSON's own words for ±inf and NaN (Infinity, NaN): readable, where strict JSON has no spelling for them.
        shown = json.dumps(entry["value"], allow_nan=True, default=str)
        return Text.assemble("  ", (name, "bold"), " = ", printable(shown if len(shown) <= 200 else shown[:199] + "…"))
    if "items" in entry:  # a mapped step's list of outputs (a list one step returned is one artifact)
        collected = f", {entry['collected']} of them garbage-collected" if entry.get("collected") else ""
        return Text.assemble("  ", (name, "bold"), f": {entry['items']} values (a mapped step's{collected})")
    return Text.assemble("  ", (name, "bold"), f": {printable(entry['type'])}, {entry['size']:,} bytes, "
                         f"artifact {entry['digest'][:12]}")


def run_json(run: Run) -> dict[str, Any]:
    """A run as plain data for scripts (`print_json` writes its datetimes as ISO 8601)."""
    return {
        "id": run.id, "pipeline": run.pipeline, "status": run.status, "error": run.error,
        "backend": run.backend, "params": run.params,
        "created_at": run.created_at, "started_at": run.started_at, "ended_at": run.ended_at,
        "outputs": output_json(run),
        "steps": {
            name: {"state": info.state.value, "attempts": info.attempts, "units": info.units,
                   "seconds": info.seconds, "estimate_seconds": info.estimate, "actual_seconds": info.actual,
                   "estimate_source": info.estimate_source, "error": info.error}
            for name, info in run.steps.items()
        },
    }


def run_table(run: Run) -> Table:
    """The steps of a run with state, attempts, units and time (their errors go under it: see `show_run`).

    Names are `Text`, never markup. No column wraps but the step's name: on 80 columns a table that also held
    the errors squeezed them to a few letters a line and broke state words (`SUCCEEDE` / `D`).
    """
    # Borders only under the head: with the columns' own, names of 10 letters folded and the last column was cut
    # off on 80 columns.
    table = Table(title=Text(f"run {run.id}  {run.pipeline}  {run.status}"), title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("step", overflow="fold", min_width=8)
    for column in ("state", "tries", "units", "time", "est/unit", "actual/unit"):
        table.add_column(column, no_wrap=True)
    for name, info in run.steps.items():
        shown = _SOURCES.get(info.estimate_source or "")
        estimate = _secs(info.estimate) + (f" ({shown})" if shown else "")
        table.add_row(Text(name), state_text(info.state.value), str(info.attempts), str(info.units),
                      _secs(info.seconds), estimate, _secs(info.actual))
    return table


_SOURCES = {"default": "default", "mixed": "mixed", "history-scaled": "by size"}
"""How `runs show` labels an estimate not taken from the step's history as it is (`history`: no label)."""


def show_run(console: Console, run: Run, as_json: bool) -> None:
    """Print a run as a table, its steps' errors and its own, or as JSON for scripts.

    Errors are user data: control characters are shown escaped (`printable`), never sent to the terminal.
    """
    if as_json:
        print_json(run_json(run))
        return
    console.print(run_table(run))
    outputs = output_json(run)
    if outputs and run.status == "SUCCEEDED":
        console.print("outputs:")
        for name, entry in outputs.items():
            console.print(_output_line(name, entry), highlight=False)
    errors = {name: printable(info.error) for name, info in run.steps.items() if info.error}
    for name, error in errors.items():
        console.print(Text.assemble((name, "bold"), ": ", (error, "red")), highlight=False)
    run_error = printable(run.error) if run.error else ""
    if run_error and not any(error in run_error for error in errors.values()):  # not one step's error again
        console.print(Text(run_error, style="red"), highlight=False)


def _secs(value: float | None) -> str:
    return f"{value:.2f}s" if value is not None else ""
