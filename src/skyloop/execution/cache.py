"""Cache keys of step attempts and the lookup of earlier results with the same key."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.orm import Session

from skyloop.execution.tasks import Element, Gathered, InputValue, Literal_
from skyloop.pipelines.step import UNCACHEABLE
from skyloop.store.artifacts import ArtifactRef, ArtifactStore
from skyloop.store.db import Database, translate_errors
from skyloop.store.hotpath import dbapi_cursor
from skyloop.store.serializers import is_plain
from skyloop.store.serializers import type_name as value_type

__all__ = ["cache_key", "element_key", "find_cached", "input_digest", "lookup_connection"]


def input_digest(value: InputValue) -> object:
    """A JSON-able identity of an input: artifact digests, or the literal value itself."""
    if isinstance(value, ArtifactRef):
        return value.digest
    if isinstance(value, Gathered):
        return [ref.digest for ref in value.refs]
    if isinstance(value, Element):
        if value.key is not None:
            return {"element": value.key}
        return {"of": input_digest(value.source), "index": value.index}
    if isinstance(value, Literal_):
        if is_plain(value.value, nan=True) and _keys_sorted(value.value):
            return {"value": value.value}
        # JSON would make a tuple a list and the key 1 the key "1" (and cannot sort mixed keys), and the keys
        # are sorted below: equal keys for values a step tells apart (it may build columns from a dict's
        # order). Such values are spelled out with their types and in their order instead; a dict whose keys
        # are in sorted order keeps the key it had before order counted.
        return {"typed": _typed(value.value)}
    raise TypeError(value)


def element_key(item: object) -> str | None:
    """The digest a mapped unit's item is cached by: of its value where it is plain (JSON-like, as parameters,
    paths and ids are), else None (the unit is then keyed by the list's digest and its index)."""
    if not is_plain(item, nan=True):
        return None
    body = input_digest(Literal_(item))
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=repr).encode()).hexdigest()


def _keys_sorted(value: object) -> bool:
    """Whether every dict in a plain value has its keys in sorted order (as `sort_keys` would write them)."""
    if type(value) is list:
        return all(_keys_sorted(v) for v in value)
    if type(value) is dict:
        keys = list(value)
        return keys == sorted(keys) and all(_keys_sorted(v) for v in value.values())
    return True


def _typed(value: object) -> object:
    """A JSON-able spelling of `value` that keeps the types JSON loses (containers in order, as given)."""
    if type(value) in (str, int, float, bool, type(None)):
        return value
    if type(value) is list:
        return [_typed(v) for v in value]
    if type(value) is dict:
        return {"dict": [[_typed(k), _typed(v)] for k, v in value.items()]}
    if type(value) is tuple:
        return {"tuple": [_typed(v) for v in value]}
    return {"type": value_type(value), "repr": repr(value)}


def cache_key(code_hash: str, version: str, inputs: dict[str, InputValue]) -> str:
    """sha256 of the step's code, its cache version and the identity of every input.

    Code whose hash says it cannot be cached (`UNCACHEABLE`: it closes over a value with no stable digest)
    gets a key no other attempt has, so it is never a hit."""
    if code_hash.startswith(UNCACHEABLE):
        return uuid.uuid4().hex + uuid.uuid4().hex
    body = {"code": code_hash, "version": version, "inputs": {k: input_digest(v) for k, v in inputs.items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=repr).encode()).hexdigest()


# Plain SQL built once: this runs for every step, and building the equivalent ORM statement each time
# (SQLAlchemy's cache-key walk) cost more than the query itself.
_SELECT = (
    "SELECT s.cache_key, s.id, s.ended_at, l.name, a.digest, a.serializer, a.type_name, a.size, "
    "a.deleted_at, a.data "
    "FROM step_runs s JOIN lineage l ON l.step_run_id = s.id AND l.direction = 'out' "
    "JOIN artifacts a ON a.digest = l.artifact WHERE s.state = 'SUCCEEDED' AND "
)
_LOOKUP_ONE = text(_SELECT + "s.cache_key = :key")
_LOOKUP_MANY = text(_SELECT + "s.cache_key IN :keys").bindparams(bindparam("keys", expanding=True))


@contextlib.contextmanager
def lookup_connection(db: Database) -> Iterator[Connection]:
    """A plain connection for `find_cached`, on SQLite one that takes no write lock.

    Not an ORM session: setting one up and committing it cost twice the lookup itself, and the
    lookup runs on the critical path of every step.
    """
    with translate_errors("looking up cached results"), db.read_engine.connect() as conn:
        yield conn


def _lookup_one(session: Session | Connection, key: str) -> Sequence[Any]:
    if isinstance(session, Connection) and session.dialect.name == "sqlite" and not session.in_transaction():
        # On the DBAPI cursor (sqlite3 takes `:key` as it is): SQLAlchemy's execute and result
        # setup, and the BEGIN it would send, cost 0.14 ms of a 0.18 ms lookup. One statement
        # outside a transaction reads one snapshot, as it would inside one.
        with translate_errors("looking up cached results"), dbapi_cursor(session) as cursor:
            rows: list[Any] = cursor.execute(_LOOKUP_ONE.text, {"key": key}).fetchall()
            return rows
    return session.execute(_LOOKUP_ONE, {"key": key}).all()


def find_cached(session: Session | Connection, keys: list[str], output_names: list[str],
                store: ArtifactStore | None = None) -> dict[str, tuple[str, dict[str, ArtifactRef]]]:
    """For each key with an earlier successful attempt whose outputs all still exist: that attempt's id
    and outputs (the newest such attempt). One query per 500 keys.

    With `store`, the blob of every output found is touched, and a key whose blob is gone is no hit: a
    garbage collection that marked the rows deleted just after the query either sees the touch and keeps
    the blob, or removed it before, and then the step runs again instead of failing the step that reads it.
    A blob whose size is not its row's (empty or cut short by a crash) is no hit either: the step runs again
    and its write repairs the blob, where a hit would hand the damage to every step after it, run after run.
    """
    found: dict[str, tuple[str, dict[str, ArtifactRef]]] = {}
    wanted = set(output_names)
    unique = list(dict.fromkeys(keys))
    for i in range(0, len(unique), 500):
        chunk = unique[i:i + 500]
        if len(chunk) == 1:  # the common case, without re-rendering an expanding IN list
            rows = _lookup_one(session, chunk[0])
        else:
            rows = session.execute(_LOOKUP_MANY, {"keys": chunk}).all()
        attempts: dict[str, dict[str, ArtifactRef]] = {}
        ended: dict[str, tuple[str, str]] = {}
        broken: set[str] = set()
        for key, step_run_id, ended_at, name, digest, serializer, type_name, size, deleted_at, data in rows:
            if deleted_at is not None:
                broken.add(step_run_id)
            attempts.setdefault(step_run_id, {})[name] = ArtifactRef(digest, serializer, type_name, size,
                                                                     bytes(data) if data is not None else None)
            ended[step_run_id] = (key, str(ended_at))
        newest: dict[str, tuple[str, str]] = {}
        for step_run_id, outputs in attempts.items():
            if step_run_id in broken or not wanted <= set(outputs):
                continue
            key, ended_at = ended[step_run_id]
            if key not in newest or ended_at > newest[key][0]:
                newest[key] = (ended_at, step_run_id)
        for key, (_, step_run_id) in newest.items():
            outputs = attempts[step_run_id]
            if store is None or all(ref.data is not None or store.touch(ref.digest, ref.size)
                                    for ref in outputs.values()):
                found[key] = (step_run_id, outputs)
    return found
