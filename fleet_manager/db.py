"""The database adapter: engines, sessions, migrations, and the few statements that differ by backend.

SQLite (the default) runs in WAL mode with a busy timeout. A SQLite transaction that reads and then writes
can fail at once with "database is locked" when another connection wrote in between (the timeout does not
help there), so write transactions start with BEGIN IMMEDIATE (`Database.write()`), and reads with a plain
deferred BEGIN (`Database.read()`). PostgreSQL needs neither.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, Insert, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from fleet_manager.models import Base

log = logging.getLogger(__name__)

_BEGIN_OPTION = "edgefleet_sqlite_begin"
SQLITE_BUSY_TIMEOUT_S = 30.0


class UnsupportedDatabaseError(ValueError):
    """The database URL names a database the fleet manager does not run on."""


class Database:
    """Engines and session factories for one database URL."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            # Connections are cheap; the API's worker threads each hold one briefly.
            self.engine = create_engine(
                url,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                pool_size=pool_size * 2,
                max_overflow=pool_size * 4,
            )
            _sqlite_setup(self.engine)
            self.write_engine: Engine = self.engine.execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        elif self.dialect == "postgresql":
            self.engine = create_engine(url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True)
            self.write_engine = self.engine
        else:
            raise UnsupportedDatabaseError(
                f"unsupported database {parsed.drivername!r}: use sqlite:/// or postgresql+psycopg://"
            )
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)

    def read_session(self) -> Session:
        """A new read session (it connects on its first query); the caller closes it."""
        return self._read()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; rolled back at the end."""
        with self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction is committed at the end (rolled back on an exception)."""
        with self._write() as session, session.begin():
            yield session

    def migrate(self) -> None:
        """Bring the schema up to date (`alembic upgrade head`); safe to run at every start."""
        from alembic import command

        config = alembic_config(self.url)
        with self.write_engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def dispose(self) -> None:
        self.engine.dispose()

    def insert_ignore(self, table: Any, key: Sequence[str]) -> Insert:
        """INSERT ... ON CONFLICT (key) DO NOTHING, for idempotent ingest."""
        if self.dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(key))
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(key))

    def insert_ignore_many(
        self,
        session: Session,
        table: Table,
        key: Sequence[str],
        rows: Sequence[Mapping[str, Any]],
        converted: dict[Any, Any] | None = None,
    ) -> int:
        """`insert_ignore` of many rows (all with the same keys) as one driver-level executemany; returns
        how many rows were inserted (the others' keys were there already).

        SQLAlchemy compiles and processes the parameters of every row of an executemany, which costs several
        times what SQLite then spends inserting them (benchmarks/fleet.py). Here each column's bind processor
        (e.g. datetime to text on SQLite) is looked up once and applied in a plain loop; datetimes are
        converted once per value, in `converted` (share it between the calls of one transaction: a
        detection event and its objects have the same receive time).
        """
        if not rows:
            return 0
        columns = list(rows[0])
        dialect = self.engine.dialect
        quote = dialect.identifier_preparer.quote
        marker = "?" if dialect.paramstyle == "qmark" else "%s"
        sql = (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
            f"VALUES ({', '.join([marker] * len(columns))}) "
            f"ON CONFLICT ({', '.join(quote(k) for k in key)}) DO NOTHING"
        )
        converted = {} if converted is None else converted
        processors = [
            (index, processor, _is_datetime(table.c[name].type))
            for index, name in enumerate(columns)
            if (processor := table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        parameters: list[tuple[Any, ...]] = []
        for row in rows:
            values = [row[name] for name in columns]
            for index, processor, memo in processors:
                value = values[index]
                if not memo:
                    values[index] = processor(value)
                elif (done := converted.get(value)) is not None:
                    values[index] = done
                else:
                    values[index] = converted[value] = processor(value)
            parameters.append(tuple(values))
        result = session.connection().exec_driver_sql(sql, parameters)
        return int(result.rowcount)


def _is_datetime(column_type: Any) -> bool:
    """A DateTime column, also behind a TypeDecorator (such as `UtcDateTime`)."""
    return isinstance(getattr(column_type, "impl_instance", column_type), DateTime)


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(connection.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    package = resources.files("fleet_manager")
    config = Config(str(package / "alembic.ini"))
    config.set_main_option("script_location", str(package / "migrations"))
    config.attributes["database_url"] = url
    return config


def run_migrations(url: str) -> None:
    """`alembic upgrade head` on `url`."""
    database = Database(url, pool_size=1)
    try:
        database.migrate()
    finally:
        database.dispose()


__all__ = ["Base", "Database", "run_migrations"]
