"""The key registry: tenants, keys, key versions and service identities, kept in SQL.

SQLite is the embedded default; PostgreSQL lets several gateway instances share one registry.  The
registry stores *references* (HSM labels, limits, states), never key material.

Concurrency
    Every write runs in one transaction that first bumps the ``generation`` counter in ``kg_meta``.
    That statement takes the write lock: on SQLite the transaction starts with ``BEGIN IMMEDIATE``
    (one writer at a time across processes, waiting up to ``busy_timeout``); on PostgreSQL the
    ``UPDATE`` takes the row lock of the single counter row, so writers queue behind each other and
    each one reads the rows its predecessors committed (READ COMMITTED takes a fresh snapshot per
    statement).  Rotation therefore always computes ``max(version) + 1`` from committed data.  The
    schema backs this up: the version number is part of the primary key and a partial unique index
    allows at most one ``active`` version per tenant × purpose, so a write that somehow raced would
    fail with :class:`~keygate.core.errors.InvalidRequest` rather than leave two active versions.

Generation
    Gateways poll :meth:`Registry.generation` (one row, one column) and reload a
    :meth:`Registry.snapshot` when it changes.  Every successful write bumps it by exactly one;
    a refused write leaves it unchanged (the bump is rolled back with the rest).

Errors
    Storage-invariant violations raise :class:`~keygate.core.errors.InvalidRequest` (bad input,
    duplicates, refused state transitions) or :class:`~keygate.core.errors.NotFound`.  Database
    failures (locked for too long, server down, disk full) raise
    :class:`~keygate.core.errors.Unavailable` with the cause chained; the message names the
    database with its password masked.

The engine helpers :func:`make_engine` and :func:`database_errors` are shared with
:mod:`keygate.audit.store`, which may use the same database.
"""

from __future__ import annotations

import contextlib
import math
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Dialect, Engine, make_url
from sqlalchemy.pool import StaticPool

from keygate.core.errors import ConfigurationError, InvalidRequest, NotFound, Unavailable
from keygate.core.model import KeyState

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_S",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "MAX_ID_LEN",
    "MAX_NAME_LEN",
    "MAX_TOKEN_HASH_LEN",
    "IdentityRecord",
    "KeyRecord",
    "KeyVersionRecord",
    "ProviderKeyRecord",
    "ProviderKeyState",
    "Registry",
    "RegistrySnapshot",
    "TenantRecord",
    "UTCDateTime",
    "connection_guard",
    "database_errors",
    "describe_database_error",
    "is_postgresql",
    "make_engine",
    "redacted_url",
    "sqlite_begin_immediate",
]

#: identifiers: tenant ids, purposes, HSM labels, identity names, scope entries
MAX_ID_LEN: Final = 64
#: a tenant's display name (e.g. 東京都千代田区 or a ministry's full name)
MAX_NAME_LEN: Final = 256
#: a token digest as text (hex SHA-256 is 64 characters; room for an algorithm prefix)
MAX_TOKEN_HASH_LEN: Final = 128
#: how long a SQLite writer waits for another process's write lock before giving up
DEFAULT_BUSY_TIMEOUT_S: Final = 10.0
#: how long a PostgreSQL connection attempt may take
DEFAULT_CONNECT_TIMEOUT_S: Final = 10
#: SQLite can't hold more than this in an INTEGER; PostgreSQL BIGINT neither
_MAX_BIGINT: Final = 2**63 - 1
#: advisory lock serialising concurrent ``create_schema`` calls on PostgreSQL ("kgschema")
_SCHEMA_LOCK_ID: Final = 0x6B67736368656D61
_TENANT_KINDS: Final = frozenset({"lgcode", "slug"})
_STATE_VALUES: Final = frozenset(state.value for state in KeyState)
_GENERATION: Final = "generation"
_SQLITE_BEGIN_OPTION: Final = "keygate_sqlite_begin"


# --------------------------------------------------------------------------------------------
# Engine helpers (shared with keygate.audit.store)
# --------------------------------------------------------------------------------------------


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (naive text) and PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        # SQLite stores fixed-width text; comparisons and ordering then work on UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def redacted_url(url: str | URL) -> str:
    """The URL as text with its password masked, safe for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _is_memory_sqlite(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database


def connection_guard(url: str | URL) -> contextlib.AbstractContextManager[Any]:
    """A lock for users of an in-memory SQLite database (one shared connection); else a no-op."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and _is_memory_sqlite(parsed):
        return threading.RLock()
    return contextlib.nullcontext()


def make_engine(url: str | URL) -> Engine:
    """Create an engine configured for keygate's storage.

    SQLite: WAL journal, ``busy_timeout`` (the URL's ``timeout`` query parameter, in seconds, or
    :data:`DEFAULT_BUSY_TIMEOUT_S`), foreign keys on, ``synchronous=FULL`` (a commit is on disk
    when it returns), and explicit ``BEGIN`` so that reads are repeatable and writers take the
    lock up front (``BEGIN IMMEDIATE``).  An in-memory database (``sqlite://``) is one shared
    connection, for tests.  PostgreSQL: ``pool_pre_ping`` and a connect timeout.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        # The message of this error may echo the URL, password included: leave it behind.
        raise ConfigurationError("the database URL cannot be parsed") from None
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            return _make_sqlite_engine(parsed)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if backend == "postgresql" and "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": DEFAULT_CONNECT_TIMEOUT_S}
        return sa.create_engine(parsed, **kwargs)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError, ValueError) as exc:
        raise ConfigurationError(
            f"database {redacted_url(parsed)}: unsupported URL or driver not installed "
            f"({type(exc).__name__})"
        ) from exc


def _make_sqlite_engine(url: URL) -> Engine:
    memory = _is_memory_sqlite(url)
    raw_timeout = url.query.get("timeout")
    busy_timeout_s = float(raw_timeout) if isinstance(raw_timeout, str) else DEFAULT_BUSY_TIMEOUT_S
    connect_args: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    if raw_timeout is None:
        connect_args["timeout"] = busy_timeout_s
    if memory:
        connect_args["check_same_thread"] = False
        kwargs["poolclass"] = StaticPool
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN (below) instead of the sqlite3 module's legacy handling.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def describe_database_error(exc: BaseException, url: str | URL | None = None) -> str:
    """``Type: first line`` of the driver's message, without SQL, parameters or the password."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    text = lines[0][:300] if lines else ""
    password = make_url(url).password if url is not None else None
    if isinstance(password, str) and password:
        text = text.replace(password, "***")
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


@contextlib.contextmanager
def database_errors(what: str, url: str | URL) -> Iterator[None]:
    """Turn database failures into :class:`Unavailable` (cause chained, password masked).

    :class:`sqlalchemy.exc.IntegrityError` passes through: callers decide what a constraint
    violation means to them.
    """
    try:
        yield
    except sa.exc.IntegrityError:
        raise
    except sa.exc.SQLAlchemyError as exc:
        raise Unavailable(
            f"{what}: database {redacted_url(url)} is unavailable "
            f"({describe_database_error(exc, url)})"
        ) from exc


def sqlite_begin_immediate(connection: Connection) -> None:
    """Make the next transaction on ``connection`` take SQLite's write lock at ``BEGIN``."""
    connection.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: str
    kind: str
    name: str
    enabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyRecord:
    tenant: str
    purpose: str
    dek_max_records: int
    dek_max_age_s: float
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyVersionRecord:
    tenant: str
    purpose: str
    version: int
    state: KeyState
    hsm_label: str
    created_at: datetime
    updated_at: datetime


class ProviderKeyState(StrEnum):
    """A provider (cloud KMS) key's role for its tenant × purpose."""

    #: new DEKs are wrapped by it (at most one per tenant × purpose)
    ACTIVE = "active"
    #: a migration moved away from it: it still unwraps existing ciphertexts until the migration
    #: is finished
    DECRYPT_ONLY = "decrypt-only"
    #: the migration is finished: keygate never calls it again for this tenant × purpose
    RETIRED = "retired"


#: the longest provider key URI (the envelope's key-id bound)
MAX_PROVIDER_URI_LEN: Final = 512


@dataclass(frozen=True, slots=True)
class ProviderKeyRecord:
    """A cloud KMS key that wraps (outer layer) the DEKs of one tenant × purpose."""

    tenant: str
    purpose: str
    uri: str
    scheme: str
    region: str
    state: ProviderKeyState
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """A service identity.  ``"*"`` in a scope set means any value."""

    name: str
    token_hash: str
    tenants: frozenset[str]
    purposes: frozenset[str]
    record_types: frozenset[str]
    operations: frozenset[str]
    created_at: datetime
    revoked_at: datetime | None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    """Everything a gateway needs, read in one transaction at one ``generation``."""

    generation: int
    tenants: dict[str, TenantRecord]
    keys: dict[tuple[str, str], KeyRecord]
    #: per tenant × purpose, ascending by version
    versions: dict[tuple[str, str], tuple[KeyVersionRecord, ...]]
    #: active (not revoked) identities only
    identities_by_hash: dict[str, IdentityRecord]
    #: per tenant × purpose, its provider keys (any state), oldest first
    providers: dict[tuple[str, str], tuple[ProviderKeyRecord, ...]] = field(default_factory=dict)

    def active_provider(self, tenant: str, purpose: str) -> ProviderKeyRecord | None:
        for rec in self.providers.get((tenant, purpose), ()):
            if rec.state is ProviderKeyState.ACTIVE:
                return rec
        return None

    def provider_key(self, tenant: str, purpose: str, uri: str) -> ProviderKeyRecord | None:
        for rec in self.providers.get((tenant, purpose), ()):
            if rec.uri == uri:
                return rec
        return None


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

metadata: Final = sa.MetaData()

tenants_table: Final = sa.Table(
    "kg_tenants",
    metadata,
    sa.Column("id", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.String(MAX_NAME_LEN), nullable=False),
    sa.Column("enabled", sa.Boolean(create_constraint=True), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('lgcode', 'slug')", name="ck_kg_tenants_kind"),
)

keys_table: Final = sa.Table(
    "kg_keys",
    metadata,
    sa.Column("tenant", sa.String(MAX_ID_LEN), sa.ForeignKey("kg_tenants.id"), primary_key=True),
    sa.Column("purpose", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("dek_max_records", sa.BigInteger(), nullable=False),
    sa.Column("dek_max_age_s", sa.Float(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("dek_max_records > 0", name="ck_kg_keys_dek_max_records"),
    sa.CheckConstraint("dek_max_age_s > 0", name="ck_kg_keys_dek_max_age_s"),
)

versions_table: Final = sa.Table(
    "kg_key_versions",
    metadata,
    sa.Column("tenant", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("purpose", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("version", sa.Integer(), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("hsm_label", sa.String(MAX_ID_LEN), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(
        ["tenant", "purpose"], ["kg_keys.tenant", "kg_keys.purpose"], name="fk_kg_key_versions_key"
    ),
    sa.UniqueConstraint("hsm_label", name="uq_kg_key_versions_hsm_label"),
    sa.CheckConstraint("version > 0", name="ck_kg_key_versions_version"),
    sa.CheckConstraint(
        "state IN ('active', 'decrypt-only', 'disabled', 'destroyed')",
        name="ck_kg_key_versions_state",
    ),
)
# At most one active version per tenant × purpose, enforced by the database itself.
sa.Index(
    "uq_kg_key_versions_one_active",
    versions_table.c.tenant,
    versions_table.c.purpose,
    unique=True,
    sqlite_where=sa.text("state = 'active'"),
    postgresql_where=sa.text("state = 'active'"),
)

identities_table: Final = sa.Table(
    "kg_identities",
    metadata,
    sa.Column("name", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("token_hash", sa.String(MAX_TOKEN_HASH_LEN), nullable=False),
    sa.Column("tenants", sa.JSON(), nullable=False),
    sa.Column("purposes", sa.JSON(), nullable=False),
    sa.Column("record_types", sa.JSON(), nullable=False),
    sa.Column("operations", sa.JSON(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("token_hash", name="uq_kg_identities_token_hash"),
)

provider_keys_table: Final = sa.Table(
    "kg_provider_keys",
    metadata,
    sa.Column("tenant", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("purpose", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("uri", sa.String(MAX_PROVIDER_URI_LEN), primary_key=True),
    sa.Column("scheme", sa.String(32), nullable=False),
    sa.Column("region", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(
        ["tenant", "purpose"],
        ["kg_keys.tenant", "kg_keys.purpose"],
        name="fk_kg_provider_keys_key",
    ),
    sa.CheckConstraint(
        "state IN ('active', 'decrypt-only', 'retired')", name="ck_kg_provider_keys_state"
    ),
)
# At most one active provider key per tenant × purpose.
sa.Index(
    "uq_kg_provider_keys_one_active",
    provider_keys_table.c.tenant,
    provider_keys_table.c.purpose,
    unique=True,
    sqlite_where=sa.text("state = 'active'"),
    postgresql_where=sa.text("state = 'active'"),
)

meta_table: Final = sa.Table(
    "kg_meta",
    metadata,
    sa.Column("name", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("value", sa.BigInteger(), nullable=False),
)


# --------------------------------------------------------------------------------------------
# Validation (storage invariants only; tenant-code check digits are verified by the policy layer)
# --------------------------------------------------------------------------------------------


def _check_text(field: str, value: object, max_len: int = MAX_ID_LEN) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidRequest(f"{field} must be a non-empty string of at most {max_len} characters")
    if value != value.strip() or any(unicodedata.category(ch) == "Cc" for ch in value):
        raise InvalidRequest(
            f"{field} must not contain control characters or surrounding whitespace"
        )
    return value


def _check_positive_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_BIGINT:
        raise InvalidRequest(f"{field} must be a positive integer")
    return value


def _check_positive_seconds(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{field} must be a positive number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequest(f"{field} must be a positive number of seconds")
    return seconds


def _check_scope(field: str, values: object) -> list[str]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidRequest(f"{field} must be a collection of strings, not a single string")
    return sorted({_check_text(f"{field} entry", v) for v in values})


def _check_state(value: object) -> KeyState:
    if isinstance(value, str) and value in _STATE_VALUES:
        return KeyState(value)
    allowed = ", ".join(s.value for s in KeyState)
    raise InvalidRequest(f"unknown key state {value!r} (expected one of: {allowed})")


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------
# Row conversion
# --------------------------------------------------------------------------------------------


def _tenant(row: sa.Row[Any]) -> TenantRecord:
    return TenantRecord(
        id=row.id,
        kind=row.kind,
        name=row.name,
        enabled=bool(row.enabled),
        created_at=row.created_at,
    )


def _key(row: sa.Row[Any]) -> KeyRecord:
    return KeyRecord(
        tenant=row.tenant,
        purpose=row.purpose,
        dek_max_records=int(row.dek_max_records),
        dek_max_age_s=float(row.dek_max_age_s),
        created_at=row.created_at,
    )


def _version(row: sa.Row[Any]) -> KeyVersionRecord:
    return KeyVersionRecord(
        tenant=row.tenant,
        purpose=row.purpose,
        version=int(row.version),
        state=KeyState(row.state),
        hsm_label=row.hsm_label,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _provider_key(row: sa.Row[Any]) -> ProviderKeyRecord:
    return ProviderKeyRecord(
        tenant=row.tenant,
        purpose=row.purpose,
        uri=row.uri,
        scheme=row.scheme,
        region=row.region,
        state=ProviderKeyState(row.state),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _identity(row: sa.Row[Any]) -> IdentityRecord:
    return IdentityRecord(
        name=row.name,
        token_hash=row.token_hash,
        tenants=frozenset(row.tenants),
        purposes=frozenset(row.purposes),
        record_types=frozenset(row.record_types),
        operations=frozenset(row.operations),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


_VERSION_ORDER: Final = (
    versions_table.c.tenant,
    versions_table.c.purpose,
    versions_table.c.version,
)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


class Registry:
    """Tenants, keys, key versions and identities in one SQL database."""

    def __init__(self, url: str) -> None:
        self._engine = make_engine(url)  # ConfigurationError for a bad URL or a missing driver
        self._url = self._engine.url
        self._guard = connection_guard(self._url)

    def __repr__(self) -> str:
        return f"Registry({redacted_url(self._url)!r})"

    @property
    def on_postgresql(self) -> bool:
        return is_postgresql(self._engine)

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(
        self, what: str, *, write: bool, advisory_lock: int | None = None
    ) -> Iterator[Connection]:
        """One transaction on the registry's database, for the registry and for stores that keep
        their tables beside it (dual control): writes take SQLite's write lock at BEGIN; reads on
        PostgreSQL see one snapshot; ``advisory_lock`` (PostgreSQL) also serialises the writers of
        one store.  An integrity conflict is :class:`InvalidRequest`, other database trouble
        :class:`Unavailable`."""
        with self._guard, database_errors(what, self._url), self._engine.connect() as conn:
            if write:
                sqlite_begin_immediate(conn)
            elif is_postgresql(self._engine):
                conn.execution_options(isolation_level="REPEATABLE READ")
            try:
                with conn.begin():
                    if write and advisory_lock is not None and is_postgresql(self._engine):
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(advisory_lock)))
                    yield conn
            except sa.exc.IntegrityError as exc:
                raise InvalidRequest(
                    f"{what}: conflicts with a concurrent change to the registry; retry "
                    f"({describe_database_error(exc, self._url)})"
                ) from exc

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[Connection]:
        """A write transaction that first bumps ``generation`` (and so takes the write lock)."""
        with self.transaction(what, write=True) as conn:
            bumped = conn.execute(
                sa.update(meta_table)
                .where(meta_table.c.name == _GENERATION)
                .values(value=meta_table.c.value + 1)
            )
            if bumped.rowcount != 1:
                raise Unavailable(f"{what}: the registry schema is not initialised")
            yield conn

    def _read(self, what: str) -> contextlib.AbstractContextManager[Connection]:
        return self.transaction(what, write=False)

    # -- lifecycle --------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the tables and the generation counter if they do not exist (idempotent)."""
        with self.transaction("create registry schema", write=True) as conn:
            if is_postgresql(self._engine):
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
            metadata.create_all(conn, checkfirst=True)
            exists = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.name == _GENERATION)
            ).first()
            if exists is None:
                conn.execute(sa.insert(meta_table).values(name=_GENERATION, value=0))

    def ping(self) -> None:
        """Raise :class:`Unavailable` unless the database answers."""
        with self._read("ping registry") as conn:
            conn.execute(sa.select(sa.literal(1)))

    def generation(self) -> int:
        with self._read("read registry generation") as conn:
            value = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.name == _GENERATION)
            ).scalar_one_or_none()
        if value is None:
            raise Unavailable("read registry generation: the registry schema is not initialised")
        return int(value)

    def close(self) -> None:
        self._engine.dispose()

    def snapshot(self) -> RegistrySnapshot:
        """Read everything in one transaction (a consistent view at one generation)."""
        with self._read("read registry snapshot") as conn:
            generation = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.name == _GENERATION)
            ).scalar_one_or_none()
            if generation is None:
                raise Unavailable("read registry snapshot: the registry schema is not initialised")
            tenants = {
                r.id: r
                for r in map(
                    _tenant, conn.execute(sa.select(tenants_table).order_by(tenants_table.c.id))
                )
            }
            keys = {
                (r.tenant, r.purpose): r
                for r in map(
                    _key,
                    conn.execute(
                        sa.select(keys_table).order_by(keys_table.c.tenant, keys_table.c.purpose)
                    ),
                )
            }
            grouped: dict[tuple[str, str], list[KeyVersionRecord]] = {}
            for row in conn.execute(sa.select(versions_table).order_by(*_VERSION_ORDER)):
                record = _version(row)
                grouped.setdefault((record.tenant, record.purpose), []).append(record)
            identities = {
                r.token_hash: r
                for r in map(
                    _identity,
                    conn.execute(
                        sa.select(identities_table).where(identities_table.c.revoked_at.is_(None))
                    ),
                )
            }
            providers: dict[tuple[str, str], list[ProviderKeyRecord]] = {}
            for row in conn.execute(
                sa.select(provider_keys_table).order_by(
                    provider_keys_table.c.tenant,
                    provider_keys_table.c.purpose,
                    provider_keys_table.c.created_at,
                    provider_keys_table.c.uri,
                )
            ):
                prov = _provider_key(row)
                providers.setdefault((prov.tenant, prov.purpose), []).append(prov)
        return RegistrySnapshot(
            generation=int(generation),
            tenants=tenants,
            keys=keys,
            versions={k: tuple(v) for k, v in grouped.items()},
            identities_by_hash=identities,
            providers={k: tuple(v) for k, v in providers.items()},
        )

    # -- tenants ----------------------------------------------------------------------------

    def add_tenant(self, tenant_id: str, *, kind: str, name: str) -> TenantRecord:
        _check_text("tenant", tenant_id)
        if kind not in _TENANT_KINDS:
            raise InvalidRequest(f"tenant kind must be 'lgcode' or 'slug', not {kind!r}")
        _check_text("tenant name", name, MAX_NAME_LEN)
        record = TenantRecord(id=tenant_id, kind=kind, name=name, enabled=True, created_at=_now())
        with self._write(f"add tenant {tenant_id}") as conn:
            if self._tenant_row(conn, tenant_id) is not None:
                raise InvalidRequest(f"tenant {tenant_id!r} already exists")
            conn.execute(
                sa.insert(tenants_table).values(
                    id=record.id,
                    kind=record.kind,
                    name=record.name,
                    enabled=record.enabled,
                    created_at=record.created_at,
                )
            )
        return record

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._read(f"read tenant {tenant_id}") as conn:
            row = self._tenant_row(conn, tenant_id)
        return _tenant(row) if row is not None else None

    def list_tenants(self) -> list[TenantRecord]:
        with self._read("list tenants") as conn:
            rows = conn.execute(sa.select(tenants_table).order_by(tenants_table.c.id)).all()
        return [_tenant(r) for r in rows]

    def set_tenant_enabled(self, tenant_id: str, enabled: bool) -> TenantRecord:
        if not isinstance(enabled, bool):
            raise InvalidRequest("enabled must be true or false")
        with self._write(f"set tenant {tenant_id} enabled={enabled}") as conn:
            row = self._tenant_row(conn, tenant_id)
            if row is None:
                raise NotFound(f"tenant {tenant_id!r} not found")
            conn.execute(
                sa.update(tenants_table)
                .where(tenants_table.c.id == tenant_id)
                .values(enabled=enabled)
            )
        return TenantRecord(
            id=row.id, kind=row.kind, name=row.name, enabled=enabled, created_at=row.created_at
        )

    # -- keys and versions ------------------------------------------------------------------

    def create_key(
        self,
        tenant: str,
        purpose: str,
        *,
        hsm_label: str,
        dek_max_records: int,
        dek_max_age_s: float,
    ) -> KeyVersionRecord:
        """Register a key for tenant × purpose with version 1, active."""
        _check_text("tenant", tenant)
        _check_text("purpose", purpose)
        _check_text("hsm_label", hsm_label)
        max_records = _check_positive_int("dek_max_records", dek_max_records)
        max_age = _check_positive_seconds("dek_max_age_s", dek_max_age_s)
        now = _now()
        with self._write(f"create key {tenant}/{purpose}") as conn:
            if self._tenant_row(conn, tenant) is None:
                raise NotFound(f"tenant {tenant!r} not found")
            if self._key_row(conn, tenant, purpose) is not None:
                raise InvalidRequest(f"key {tenant}/{purpose} already exists")
            self._check_label_free(conn, hsm_label)
            conn.execute(
                sa.insert(keys_table).values(
                    tenant=tenant,
                    purpose=purpose,
                    dek_max_records=max_records,
                    dek_max_age_s=max_age,
                    created_at=now,
                )
            )
            record = KeyVersionRecord(tenant, purpose, 1, KeyState.ACTIVE, hsm_label, now, now)
            self._insert_version(conn, record)
        return record

    def add_version(self, tenant: str, purpose: str, *, hsm_label: str) -> KeyVersionRecord:
        """Rotate: add version ``max + 1`` as active; the previous active becomes decrypt-only."""
        _check_text("hsm_label", hsm_label)
        now = _now()
        with self._write(f"rotate key {tenant}/{purpose}") as conn:
            if self._key_row(conn, tenant, purpose) is None:
                raise NotFound(f"key {tenant}/{purpose} not found")
            self._check_label_free(conn, hsm_label)
            newest = conn.execute(
                sa.select(sa.func.max(versions_table.c.version)).where(
                    versions_table.c.tenant == tenant, versions_table.c.purpose == purpose
                )
            ).scalar_one()
            # Demote first: the partial unique index allows one active version at any moment.
            conn.execute(
                sa.update(versions_table)
                .where(
                    versions_table.c.tenant == tenant,
                    versions_table.c.purpose == purpose,
                    versions_table.c.state == KeyState.ACTIVE.value,
                )
                .values(state=KeyState.DECRYPT_ONLY.value, updated_at=now)
            )
            record = KeyVersionRecord(
                tenant, purpose, int(newest or 0) + 1, KeyState.ACTIVE, hsm_label, now, now
            )
            self._insert_version(conn, record)
        return record

    def set_version_state(
        self, tenant: str, purpose: str, version: int, state: KeyState
    ) -> KeyVersionRecord:
        """Change a version's state, enforcing the allowed transitions.

        - active → disabled; decrypt-only → disabled;
        - disabled → active: *enable*.  The version becomes active if it is the newest
          non-destroyed version and no other version is active, otherwise decrypt-only (so
          enabling never silently demotes the current active version);
        - disabled → decrypt-only: decrypt-only;
        - any state but destroyed → destroyed; destroyed is final.

        Everything else (including "no change") raises :class:`InvalidRequest` naming both states.
        The returned record carries the state actually stored.
        """
        target = _check_state(state)
        with self._write(f"set key {tenant}/{purpose}/v{version} {target.value}") as conn:
            row = self._version_row(conn, tenant, purpose, version)
            if row is None:
                raise NotFound(f"key version {tenant}/{purpose}/v{version} not found")
            current = KeyState(row.state)
            new_state = self._transition(conn, row, current, target)
            now = _now()
            conn.execute(
                sa.update(versions_table)
                .where(
                    versions_table.c.tenant == tenant,
                    versions_table.c.purpose == purpose,
                    versions_table.c.version == version,
                )
                .values(state=new_state.value, updated_at=now)
            )
        return KeyVersionRecord(
            tenant, purpose, int(row.version), new_state, row.hsm_label, row.created_at, now
        )

    def _transition(
        self, conn: Connection, row: sa.Row[Any], current: KeyState, target: KeyState
    ) -> KeyState:
        ref = f"{row.tenant}/{row.purpose}/v{row.version}"
        if current is KeyState.DESTROYED:
            raise InvalidRequest(
                f"key version {ref}: cannot change state from destroyed to {target.value} "
                "(destroyed is final)"
            )
        if target is KeyState.DESTROYED:
            return target
        if target is KeyState.DISABLED and current in (KeyState.ACTIVE, KeyState.DECRYPT_ONLY):
            return target
        if current is KeyState.DISABLED and target is KeyState.DECRYPT_ONLY:
            return target
        if current is KeyState.DISABLED and target is KeyState.ACTIVE:
            others = conn.execute(
                sa.select(versions_table.c.version, versions_table.c.state).where(
                    versions_table.c.tenant == row.tenant,
                    versions_table.c.purpose == row.purpose,
                    versions_table.c.version != row.version,
                )
            ).all()
            newest = all(v < row.version for v, s in others if s != KeyState.DESTROYED.value)
            other_active = any(s == KeyState.ACTIVE.value for _, s in others)
            return KeyState.ACTIVE if newest and not other_active else KeyState.DECRYPT_ONLY
        raise InvalidRequest(
            f"key version {ref}: cannot change state from {current.value} to {target.value}"
        )

    def get_version(self, tenant: str, purpose: str, version: int) -> KeyVersionRecord | None:
        with self._read(f"read key version {tenant}/{purpose}/v{version}") as conn:
            row = self._version_row(conn, tenant, purpose, version)
        return _version(row) if row is not None else None

    def active_version(self, tenant: str, purpose: str) -> KeyVersionRecord | None:
        with self._read(f"read active version of {tenant}/{purpose}") as conn:
            row = conn.execute(
                sa.select(versions_table).where(
                    versions_table.c.tenant == tenant,
                    versions_table.c.purpose == purpose,
                    versions_table.c.state == KeyState.ACTIVE.value,
                )
            ).first()
        return _version(row) if row is not None else None

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        query = sa.select(keys_table).order_by(keys_table.c.tenant, keys_table.c.purpose)
        if tenant is not None:
            query = query.where(keys_table.c.tenant == tenant)
        with self._read("list keys") as conn:
            rows = conn.execute(query).all()
        return [_key(r) for r in rows]

    def get_key(self, tenant: str, purpose: str) -> KeyRecord | None:
        with self._read(f"read key {tenant}/{purpose}") as conn:
            row = self._key_row(conn, tenant, purpose)
        return _key(row) if row is not None else None

    def list_versions(self, tenant: str, purpose: str) -> list[KeyVersionRecord]:
        """All versions of tenant × purpose, ascending; empty if there is no such key."""
        with self._read(f"list versions of {tenant}/{purpose}") as conn:
            rows = conn.execute(
                sa.select(versions_table)
                .where(versions_table.c.tenant == tenant, versions_table.c.purpose == purpose)
                .order_by(versions_table.c.version)
            ).all()
        return [_version(r) for r in rows]

    def update_key_limits(
        self,
        tenant: str,
        purpose: str,
        *,
        dek_max_records: int | None = None,
        dek_max_age_s: float | None = None,
    ) -> KeyRecord:
        """Change the DEK reuse limits; ``None`` leaves a limit as it is."""
        values: dict[str, Any] = {}
        if dek_max_records is not None:
            values["dek_max_records"] = _check_positive_int("dek_max_records", dek_max_records)
        if dek_max_age_s is not None:
            values["dek_max_age_s"] = _check_positive_seconds("dek_max_age_s", dek_max_age_s)
        if not values:
            record = self.get_key(tenant, purpose)
            if record is None:
                raise NotFound(f"key {tenant}/{purpose} not found")
            return record
        with self._write(f"update limits of key {tenant}/{purpose}") as conn:
            if self._key_row(conn, tenant, purpose) is None:
                raise NotFound(f"key {tenant}/{purpose} not found")
            conn.execute(
                sa.update(keys_table)
                .where(keys_table.c.tenant == tenant, keys_table.c.purpose == purpose)
                .values(**values)
            )
            row = self._key_row(conn, tenant, purpose)
        assert row is not None  # noqa: S101 - read back in the same transaction
        return _key(row)

    # -- identities -------------------------------------------------------------------------

    def add_identity(
        self,
        name: str,
        *,
        token_hash: str,
        tenants: Iterable[str],
        purposes: Iterable[str],
        record_types: Iterable[str],
        operations: Iterable[str],
    ) -> IdentityRecord:
        """Register a service identity by the hash of its token (never the token itself)."""
        _check_text("identity name", name)
        _check_text("token_hash", token_hash, MAX_TOKEN_HASH_LEN)
        scopes = {
            "tenants": _check_scope("tenants", tenants),
            "purposes": _check_scope("purposes", purposes),
            "record_types": _check_scope("record_types", record_types),
            "operations": _check_scope("operations", operations),
        }
        now = _now()
        with self._write(f"add identity {name}") as conn:
            if self._identity_row(conn, identities_table.c.name == name) is not None:
                raise InvalidRequest(f"identity {name!r} already exists")
            if self._identity_row(conn, identities_table.c.token_hash == token_hash) is not None:
                raise InvalidRequest(f"identity {name!r}: this token is already registered")
            conn.execute(
                sa.insert(identities_table).values(
                    name=name, token_hash=token_hash, created_at=now, revoked_at=None, **scopes
                )
            )
        return IdentityRecord(
            name=name,
            token_hash=token_hash,
            tenants=frozenset(scopes["tenants"]),
            purposes=frozenset(scopes["purposes"]),
            record_types=frozenset(scopes["record_types"]),
            operations=frozenset(scopes["operations"]),
            created_at=now,
            revoked_at=None,
        )

    def revoke_identity(self, name: str) -> IdentityRecord:
        now = _now()
        with self._write(f"revoke identity {name}") as conn:
            row = self._identity_row(conn, identities_table.c.name == name)
            if row is None:
                raise NotFound(f"identity {name!r} not found")
            if row.revoked_at is not None:
                raise InvalidRequest(f"identity {name!r} is already revoked")
            conn.execute(
                sa.update(identities_table)
                .where(identities_table.c.name == name)
                .values(revoked_at=now)
            )
            row = self._identity_row(conn, identities_table.c.name == name)
        assert row is not None  # noqa: S101 - read back in the same transaction
        return _identity(row)

    def get_identity_by_token_hash(self, token_hash: str) -> IdentityRecord | None:
        """The identity holding this token hash, or ``None`` if unknown or revoked."""
        with self._read("look up identity") as conn:
            row = self._identity_row(
                conn,
                identities_table.c.token_hash == token_hash,
                identities_table.c.revoked_at.is_(None),
            )
        return _identity(row) if row is not None else None

    def list_identities(self) -> list[IdentityRecord]:
        """Every identity, revoked ones included, by name."""
        with self._read("list identities") as conn:
            rows = conn.execute(sa.select(identities_table).order_by(identities_table.c.name)).all()
        return [_identity(r) for r in rows]

    # -- provider keys (outer wrap) ---------------------------------------------------------

    def list_provider_keys(
        self, tenant: str | None = None, purpose: str | None = None
    ) -> list[ProviderKeyRecord]:
        query = sa.select(provider_keys_table).order_by(
            provider_keys_table.c.tenant,
            provider_keys_table.c.purpose,
            provider_keys_table.c.created_at,
            provider_keys_table.c.uri,
        )
        if tenant is not None:
            query = query.where(provider_keys_table.c.tenant == tenant)
        if purpose is not None:
            query = query.where(provider_keys_table.c.purpose == purpose)
        with self._read("list provider keys") as conn:
            rows = conn.execute(query).all()
        return [_provider_key(r) for r in rows]

    def switch_provider_key(
        self,
        tenant: str,
        purpose: str,
        uri: str | None,
        *,
        scheme: str = "",
        region: str = "",
        first: bool = False,
    ) -> list[ProviderKeyRecord]:
        """Make ``uri`` the active provider key of tenant × purpose (``None``: HSM layer only).

        The previous active key becomes decrypt-only (it keeps unwrapping existing ciphertexts
        until :meth:`finish_provider_migration`).  With ``first=True`` (``keygate provider set``)
        the call is refused if a provider key is already active.  A key already known to
        tenant × purpose (decrypt-only or retired) may be made active again.  Returns the
        tenant × purpose's provider keys after the change.
        """
        what = f"set provider key of {tenant}/{purpose}"
        if uri is not None:
            _check_text("provider key URI", uri, MAX_PROVIDER_URI_LEN)
            _check_text("provider scheme", scheme, 32)
            _check_text("provider region", region, 255)
        now = _now()
        table = provider_keys_table
        mine = (table.c.tenant == tenant, table.c.purpose == purpose)
        with self._write(what) as conn:
            if self._key_row(conn, tenant, purpose) is None:
                raise NotFound(f"key {tenant}/{purpose} not found")
            active = conn.execute(
                sa.select(table).where(*mine, table.c.state == ProviderKeyState.ACTIVE.value)
            ).first()
            if active is not None and first:
                raise InvalidRequest(
                    f"{tenant}/{purpose} already has the provider key {active.uri}; "
                    "moving to another key is a migration: keygate provider migrate"
                )
            if active is None and uri is None:
                raise InvalidRequest(f"{tenant}/{purpose} has no active provider key")
            if active is not None and active.uri == uri:
                raise InvalidRequest(
                    f"{uri} is already the active provider key of {tenant}/{purpose}"
                )
            if active is not None:
                conn.execute(
                    sa.update(table)
                    .where(*mine, table.c.uri == active.uri)
                    .values(state=ProviderKeyState.DECRYPT_ONLY.value, updated_at=now)
                )
            if uri is not None:
                known = conn.execute(sa.select(table).where(*mine, table.c.uri == uri)).first()
                if known is None:
                    conn.execute(
                        sa.insert(table).values(
                            tenant=tenant,
                            purpose=purpose,
                            uri=uri,
                            scheme=scheme,
                            region=region,
                            state=ProviderKeyState.ACTIVE.value,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                else:
                    conn.execute(
                        sa.update(table)
                        .where(*mine, table.c.uri == uri)
                        .values(state=ProviderKeyState.ACTIVE.value, updated_at=now)
                    )
            rows = conn.execute(sa.select(table).where(*mine).order_by(table.c.created_at)).all()
        return [_provider_key(r) for r in rows]

    def finish_provider_migration(self, tenant: str, purpose: str) -> list[ProviderKeyRecord]:
        """Retire every decrypt-only provider key of tenant × purpose; returns those retired."""
        now = _now()
        table = provider_keys_table
        mine = (table.c.tenant == tenant, table.c.purpose == purpose)
        with self._write(f"finish provider migration of {tenant}/{purpose}") as conn:
            rows = conn.execute(
                sa.select(table).where(*mine, table.c.state == ProviderKeyState.DECRYPT_ONLY.value)
            ).all()
            if not rows:
                raise InvalidRequest(f"{tenant}/{purpose} has no provider migration to finish")
            conn.execute(
                sa.update(table)
                .where(*mine, table.c.state == ProviderKeyState.DECRYPT_ONLY.value)
                .values(state=ProviderKeyState.RETIRED.value, updated_at=now)
            )
        return [
            ProviderKeyRecord(
                r.tenant,
                r.purpose,
                r.uri,
                r.scheme,
                r.region,
                ProviderKeyState.RETIRED,
                r.created_at,
                now,
            )
            for r in rows
        ]

    # -- row helpers ------------------------------------------------------------------------

    @staticmethod
    def _tenant_row(conn: Connection, tenant_id: str) -> sa.Row[Any] | None:
        return conn.execute(sa.select(tenants_table).where(tenants_table.c.id == tenant_id)).first()

    @staticmethod
    def _key_row(conn: Connection, tenant: str, purpose: str) -> sa.Row[Any] | None:
        return conn.execute(
            sa.select(keys_table).where(
                keys_table.c.tenant == tenant, keys_table.c.purpose == purpose
            )
        ).first()

    @staticmethod
    def _version_row(
        conn: Connection, tenant: str, purpose: str, version: int
    ) -> sa.Row[Any] | None:
        if isinstance(version, bool) or not isinstance(version, int):
            raise InvalidRequest("key version must be an integer")
        return conn.execute(
            sa.select(versions_table).where(
                versions_table.c.tenant == tenant,
                versions_table.c.purpose == purpose,
                versions_table.c.version == version,
            )
        ).first()

    @staticmethod
    def _identity_row(conn: Connection, *where: sa.ColumnElement[bool]) -> sa.Row[Any] | None:
        return conn.execute(sa.select(identities_table).where(*where)).first()

    @staticmethod
    def _check_label_free(conn: Connection, hsm_label: str) -> None:
        used = conn.execute(
            sa.select(
                versions_table.c.tenant, versions_table.c.purpose, versions_table.c.version
            ).where(versions_table.c.hsm_label == hsm_label)
        ).first()
        if used is not None:
            raise InvalidRequest(
                f"hsm_label {hsm_label!r} is already used by "
                f"{used.tenant}/{used.purpose}/v{used.version}"
            )

    @staticmethod
    def _insert_version(conn: Connection, record: KeyVersionRecord) -> None:
        conn.execute(
            sa.insert(versions_table).values(
                tenant=record.tenant,
                purpose=record.purpose,
                version=record.version,
                state=record.state.value,
                hsm_label=record.hsm_label,
                created_at=record.created_at,
                updated_at=record.updated_at,
            )
        )
