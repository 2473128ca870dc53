"""Bulk writes: one compiled statement, many rows, SQLAlchemy's own value conversion.

``conn.execute(insert(t), rows)`` re-processes every parameter dict through the compiler,
row by row; a backfill writes tens of thousands of rows, so here the statement is compiled
once, each column's bind processor (the same one SQLAlchemy would apply: DateTime -> its SQLite
string, JSON -> text) is applied to plain tuples, and the driver does the rest: SQLite's
``executemany`` (in-process, no round trips); on PostgreSQL, where an executemany is a
statement per row on the server, one ``INSERT … SELECT * FROM unnest(array per column)``: one
statement whatever the number of rows, its text the same every time (parsed and prepared once).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Table, bindparam


def _dialect_insert(dialect_name: str) -> Any:
    if dialect_name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:  # pragma: no cover
        raise NotImplementedError(f"bulk writes are not implemented for {dialect_name}")
    return insert


_COMPILED: dict[tuple[Any, ...], tuple[str, list[int], list[Any]]] = {}
_NAMED = re.compile(r"%\((\w+)\)s")


def _compiled(
    dialect: Any,
    table: Table,
    columns: tuple[str, ...],
    conflict_keys: tuple[str, ...],
    update: tuple[str, ...],
) -> tuple[str, list[int], list[Any]]:
    """(SQL, parameter order, bind processors), compiled once per statement shape."""
    key = (dialect.name, dialect.positional, table.name, columns, conflict_keys, update)
    hit = _COMPILED.get(key)
    if hit is not None:
        return hit
    # inline(): no implicit RETURNING of the primary key
    stmt = _dialect_insert(dialect.name)(table).inline().values({c: bindparam(c) for c in columns})
    if conflict_keys and update:
        stmt = stmt.on_conflict_do_update(
            index_elements=list(conflict_keys), set_={c: stmt.excluded[c] for c in update}
        )
    elif conflict_keys:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict_keys))
    compiled = stmt.compile(dialect=dialect)
    sql = str(compiled)
    names = compiled.positiontup or columns
    if dialect.name == "postgresql":
        names = _NAMED.findall(sql)
        sql = _unnest(_NAMED.sub("%s", sql), [table.c[n].type.compile(dialect) for n in names])
    order = [columns.index(name) for name in names]
    procs = [table.c[columns[i]].type.dialect_impl(dialect).bind_processor(dialect) for i in order]
    _COMPILED[key] = hit = (sql, order, procs)
    return hit


def _unnest(sql: str, types: list[str]) -> str:
    """``INSERT … VALUES (%s, …) …`` as ``INSERT … SELECT * FROM unnest(%s::type[], …) …``."""
    head, _, rest = sql.partition(" VALUES (")
    depth, end = 1, 0
    while depth:
        depth += {"(": 1, ")": -1}.get(rest[end], 0)
        end += 1
    arrays = ", ".join(f"%b::{t}[]" for t in types)  # %b: binary, no quoting of elements
    return f"{head} SELECT * FROM unnest({arrays}){rest[end:]}"


def _last_per_key(params: list[Any], key: list[int]) -> list[Any]:
    """One row per conflict key, the last (one statement may not upsert a row twice)."""
    if not key:
        return params
    return list({tuple(p[i] for i in key): p for p in params}.values())


def insert_many(
    conn: Any,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    conflict_keys: Sequence[str] = (),
    update: Sequence[str] = (),
) -> int:
    """INSERT ``rows`` (tuples in ``columns`` order); with ``conflict_keys``, an upsert that
    sets ``update`` from the new row (or ignores the row when ``update`` is empty)."""
    sql, order, params = _bound(conn, table, columns, rows, conflict_keys, update)
    if not params:
        return 0
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(sql, [tuple(row) for row in params])  # the driver wants tuples
        return len(params)
    params = _last_per_key(params, [order.index(columns.index(k)) for k in conflict_keys])
    conn.exec_driver_sql(sql, _arrays(params))
    return len(params)


def insert_returning(
    conn: Any,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    returning: Sequence[str],
) -> list[Any]:
    """PostgreSQL: INSERT ``rows`` as :func:`insert_many` does, and return the ``returning``
    columns of each new row, from the same statement."""
    sql, _order, params = _bound(conn, table, columns, rows, (), ())
    if not params:
        return []
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(table.c[c].name) for c in returning)
    return list(conn.exec_driver_sql(f"{sql} RETURNING {names}", _arrays(params)))


def _bound(
    conn: Any,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    conflict_keys: Sequence[str],
    update: Sequence[str],
) -> tuple[str, list[int], list[Any]]:
    """The statement, its parameter order, and the rows as lists in that order, converted."""
    sql, order, procs = _compiled(
        conn.dialect, table, tuple(columns), tuple(conflict_keys), tuple(update)
    )
    convert = [(j, p) for j, p in enumerate(procs) if p is not None]
    identity = order == list(range(len(columns)))
    params: list[Any] = [list(row) if identity else [row[i] for i in order] for row in rows]
    for j, proc in convert:
        # Rows often share a value (every row's recorded_at is the same `now`): convert each
        # distinct hashable value once.
        if params and isinstance(params[0][j], (list, dict)):  # JSON: unhashable, all distinct
            for row in params:
                row[j] = proc(row[j])
            continue
        memo: dict[Any, Any] = {}
        for row in params:
            value = row[j]
            try:
                row[j] = memo[value]
            except KeyError:
                row[j] = memo[value] = proc(value)
            except TypeError:  # an unhashable value after all
                row[j] = proc(value)
    return sql, order, params


def _arrays(params: list[Any]) -> tuple[list[Any], ...]:
    """Rows as one array per column: the parameters of the unnest statement."""
    return tuple(list(column) for column in zip(*params, strict=True))


def upsert(
    conn: Any,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    keys: Sequence[str],
    update: Sequence[str],
) -> None:
    """Insert-or-update dict rows (all with the same keys) in one executemany."""
    if not rows:
        return
    columns = list(rows[0])
    insert_many(
        conn,
        table,
        columns,
        [[r[c] for c in columns] for r in rows],
        conflict_keys=keys,
        update=update,
    )
