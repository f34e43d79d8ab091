"""`skyloop models list|show|alias|tag`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from skyloop.cli.main import console, state
from skyloop.cli.output import print_json
from skyloop.errors import SpecError
from skyloop.registry.registry import delete_tag, get_model, list_models, list_versions, remove_alias, resolve
from skyloop.registry.registry import set_alias as set_alias_row
from skyloop.registry.registry import set_tags as set_tags_row
from skyloop.registry.uri import ModelRef, check_name, names_version, parse_model_ref
from skyloop.serving.spec import MAX_VERSION
from skyloop.store.workspace import Workspace

__all__ = ["app"]

app = typer.Typer(help="Registered models: versions, aliases, tags.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _version(version: int, given: str) -> int:
    """`version`, or a SpecError for a number no model version can have (the DB holds 64-bit integers)."""
    if not 1 <= version <= MAX_VERSION:
        raise SpecError(f"{given}: version {version} is not a version a model can have; versions count 1, 2, 3, ...")
    return version


def _ref(text: str) -> ModelRef:
    """`parse_model_ref(text)`, with its version (if any) checked by `_version`."""
    ref = parse_model_ref(text)
    if ref.version is not None:
        _version(ref.version, repr(text))
    return ref


def _workspace() -> Workspace:
    return Workspace.open(state.settings())


@app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """Every registered model with its newest version and aliases."""
    workspace = _workspace()
    with workspace.db.read() as session:
        models = list_models(session)
    workspace.close()
    if as_json:
        print_json([m.to_dict() for m in models])
        return
    if not models:
        console.print("no models registered yet (log one with skyloop.registry.log_model)")
        return
    table = Table("name", "latest", "versions", "aliases", "tags", box=None)
    for m in models:
        table.add_row(m.name, str(m.latest_version), str(m.versions),
                      ", ".join(f"{a}→{v}" for a, v in m.aliases.items()),
                      ", ".join(f"{k}={v}" for k, v in m.tags.items()))
    console.print(table)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME/VERSION, NAME@ALIAS or a models:/ URI.")],
    as_json: JsonOption = False,
) -> None:
    """A model and its versions, or one version in full (its model.yaml, files and lineage)."""
    parsed = _ref(ref)
    whole = not names_version(ref)  # NAME@latest is the newest version, in full
    workspace = _workspace()
    with workspace.db.read() as session:
        if whole:
            model = get_model(session, parsed.name)
            versions = list_versions(session, parsed.name)
        else:
            version = resolve(session, parsed)
    workspace.close()
    if whole:
        if as_json:
            print_json({**model.to_dict(), "versions": [v.to_dict() for v in versions]})
            return
        console.print(Text.assemble((model.name, "bold"), f"  latest {model.latest_version}  {model.description}"),
                      highlight=False)
        for key, value in model.tags.items():
            console.print(f"  tag {key}={value}", highlight=False)
        table = Table("version", "flavor", "aliases", "metrics", "run", "created", box=None)
        for v in versions:
            metrics = ", ".join(f"{k}={val:g}" for k, val in v.manifest.metrics.items())
            table.add_row(str(v.version), v.flavor, ", ".join(v.aliases), metrics, (v.run_id or "")[:12],
                          v.created_at.strftime("%Y-%m-%d %H:%M:%S"))
        console.print(table)
        return
    if as_json:
        print_json(version.to_dict())
        return
    m = version.manifest
    console.print(Text.assemble((version.uri, "bold"), f"  flavor {version.flavor}  aliases "
                                                       f"{', '.join(version.aliases) or '-'}"), highlight=False)
    if m.producer is not None:
        console.print(f"  produced by run {m.producer.run_id or '-'} step run {m.producer.step_run_id or '-'}",
                      highlight=False)
        for name, digest in m.producer.inputs.items():
            console.print(f"    input {name}: {digest[:12]}", highlight=False)
    for metric, score in m.metrics.items():
        console.print(f"  metric {metric} = {score:g}", highlight=False)
    for key, value in version.tags.items():
        console.print(f"  tag {key}={value}", highlight=False)
    if m.signature is not None:
        for kind, tensors in (("input", m.signature.inputs), ("output", m.signature.outputs)):
            for t in tensors:
                console.print(f"  {kind} {t.name}: {t.datatype} {t.shape}", highlight=False)
    for rel, digest in version.files.items():
        console.print(f"  file {rel}  sha256 {digest}", highlight=False)


@app.command()
def alias(
    name: Annotated[str, typer.Argument(help="The model.")],
    alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help="e.g. champion, challenger.")],
    version: Annotated[int | None, typer.Argument(help="The version it should point at.")] = None,
    delete: Annotated[bool, typer.Option("--delete", help="Remove the alias instead.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Point ALIAS at VERSION (moving it atomically), or remove it with --delete."""
    if delete == (version is not None):
        raise SpecError("give a VERSION to point the alias at, or --delete to remove it (not both)")
    check_name(name)  # a NAME, not a reference: `models:/iris` or `iris/2` here is no model's name
    if version is not None:
        _version(version, f"models alias {name} {alias_name}")
    workspace = _workspace()
    with workspace.db.session() as session:
        if version is None:
            previous: int | None = remove_alias(session, name, alias_name)
        else:
            previous = set_alias_row(session, name, alias_name, version)
    workspace.close()
    if as_json:
        print_json({"model": name, "alias": alias_name, "version": version, "previous": previous})
    elif version is None:
        console.print(f"removed alias {alias_name} of {name}", highlight=False)
    elif previous is not None and previous != version:
        console.print(f"{name}@{alias_name}: version {previous} → {version}", highlight=False)
    else:
        console.print(f"{name}@{alias_name} → version {version}", highlight=False)


@app.command()
def tag(
    ref: Annotated[str, typer.Argument(help="NAME (the model) or NAME/VERSION, NAME@ALIAS (one version).")],
    pairs: Annotated[list[str] | None, typer.Argument(metavar="KEY=VALUE...", help="Tags to set.")] = None,
    delete: Annotated[list[str] | None, typer.Option("--delete", help="A tag key to remove (repeatable).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Set (or with --delete, remove) tags on a model or on one of its versions."""
    if not pairs and not delete:
        raise SpecError("give at least one KEY=VALUE or --delete KEY")
    tags: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"tag {pair!r} must look like KEY=VALUE")
        tags[key] = value
    parsed = _ref(ref)
    newest = names_version(ref) and parsed.version is None and parsed.alias is None  # NAME@latest, NAME/latest
    workspace = _workspace()
    with workspace.db.session() as session:
        if newest:  # one version, the newest, as `models show` reads it: not the model itself
            parsed = ModelRef(parsed.name, version=resolve(session, parsed).version)
        for key in delete or []:
            delete_tag(session, parsed, key)
        current = set_tags_row(session, parsed, tags)  # all its tags now, also when only some were deleted
    workspace.close()
    if as_json:
        print_json({"ref": parsed.uri, "tags": current})
        return
    shown = ", ".join(f"{k}={v}" for k, v in current.items())
    console.print(f"{parsed.uri}: {shown or 'no tags left'}", highlight=False)
