"""Setting up a Postgres source for CDC: the publication the slot streams from, created or extended
for the spec's tables, with every missing privilege named before anything changes."""

from __future__ import annotations

import psycopg
from psycopg import sql

from opsloop.errors import ConfigError, TerminalError
from opsloop.sources.pgcopy import PgTable


def ensure_publication(
    conn: psycopg.Connection, publication: str, tables: list[PgTable], *, role: str, database: str
) -> list[str]:
    """Create ``publication`` for ``tables`` or add the ones it lacks; returns the names of the tables
    added to an existing publication. Missing privileges and tables without a replica identity are
    named before anything is changed."""
    pub = sql.Identifier(publication)
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    have = {
        r[0]
        for r in conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        ).fetchall()
    }
    missing = [info for info in tables if info.qualified not in have]
    if exists and not missing:
        return []
    _check_privileges(conn, publication, missing, exists=bool(exists), role=role, database=database)
    for info in missing:
        if info.replica_identity == "nothing" or (info.replica_identity == "default" and not info.primary_key):
            raise ConfigError(
                f"table {info.qualified} has no replica identity (no primary key): publishing it would make "
                f"UPDATE/DELETE on it fail in the source. Add a primary key or ALTER TABLE {info.qualified} "
                "REPLICA IDENTITY FULL first"
            )
    listed = sql.SQL(", ").join(info.ident for info in missing)
    try:
        if exists:
            conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, listed))
        else:
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(pub, listed))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise TerminalError(f"publication {publication!r}: {exc} (role {role!r})") from exc
    return [info.name for info in missing] if exists else []


def _check_privileges(
    conn: psycopg.Connection, publication: str, tables: list[PgTable], *, exists: bool, role: str, database: str
) -> None:
    if not exists:
        (can_create,) = conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone() or (
            False,
        )
        if not can_create:
            raise TerminalError(
                f"Postgres role {role!r} needs CREATE on database {database!r} to create publication "
                f"{publication!r}: GRANT CREATE ON DATABASE {database} TO {role} "
                f"(or have the owner run CREATE PUBLICATION {publication} FOR TABLE …)"
            )
    not_owned = [
        info.qualified
        for info in tables
        if not (
            conn.execute(
                "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class WHERE oid = %s", (info.oid,)
            ).fetchone()
            or (False,)
        )[0]
    ]
    if not_owned:
        raise TerminalError(
            f"Postgres role {role!r} must own table(s) {not_owned} (table ownership) to add them to "
            f"publication {publication!r}: ALTER TABLE … OWNER TO {role}, or have the owner run "
            f"ALTER PUBLICATION {publication} ADD TABLE …"
        )
