"""The pure parts of the bulk engine: specs and fingerprints, context rules, cells, job
ownership in the store, header census labels.  No HSM, no subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keygate.bulk.spec import ContextRule, JobSpec, RunOptions, redact_dsn
from keygate.bulk.store import JobStore, RecordError, current_owner, owner_is_alive
from keygate.bulk.transform import CellBatch, RowError, Scope
from keygate.bulk.verify import INVALID, header_label, parse_label
from keygate.core.errors import InvalidRequest, NotFound, Unavailable
from keygate.policy.records import load_policies

pytestmark = [pytest.mark.unit]


def _spec(**kw: object) -> JobSpec:
    base: dict[str, object] = {
        "operation": "reencrypt", "kind": "jsonl", "tenant": "131016", "purpose": "resident",
        "fields": ("a", "b"), "input": "/in.jsonl", "output": "/out.jsonl",
    }  # fmt: skip
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def test_fingerprint_is_the_scope_and_never_holds_a_password() -> None:
    """Same scope, same fingerprint; DSN passwords are dropped before storing or hashing."""
    a = _spec(kind="postgresql", input=None, output=None, table="t", key_column="id",
              dsn="postgresql://app:s3cret@db:5432/juki")  # fmt: skip
    b = _spec(kind="postgresql", input=None, output=None, table="t", key_column="id",
              dsn="postgresql://app:other@db:5432/juki")  # fmt: skip
    assert a.fingerprint() == b.fingerprint()
    assert "s3cret" not in str(a.stored())
    assert _spec().fingerprint() != _spec(fields=("a",)).fingerprint()
    assert JobSpec.from_stored(_spec().stored()) == _spec()
    assert redact_dsn("host=db password=x user=app") == "host=db user=app"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"purpose": None}, "--purpose"),
        ({"fields": ()}, "--fields"),
        ({"record_type": "resident"}, "leave out"),
        ({"output": "/in.jsonl"}, "in place"),
        ({"operation": "rewrap", "context": (ContextRule("k", "column", "c"),)}, "reencrypt"),
        ({"operation": "migrate"}, "--to"),
        ({"fields": ("a", "a")}, "twice"),
    ],
)
def test_incoherent_specs_are_refused(kw: dict[str, object], message: str) -> None:
    """Each incoherent combination gets one clear line."""
    with pytest.raises(InvalidRequest, match=message):
        _spec(**kw).validate()


def test_context_rules() -> None:
    """column, field and const rules build the context of each value of a row."""
    rules = (
        ContextRule.parse("column", "record_id=id"),
        ContextRule.parse("field", "column"),
        ContextRule.parse("const", "system=juki"),
    )
    scope = Scope(_spec(context=rules), {})
    cells = CellBatch()
    row = {"id": 42, "a": "kg1.x", "b": None}
    scope.value_cells(cells, 0, row.get)
    assert cells.contexts == [{"record_id": "42", "column": "a", "system": "juki"}]
    only_field = Scope(_spec(context=(ContextRule.parse("field", "f"),)), {})
    cells = CellBatch()
    only_field.value_cells(cells, 3, {"a": "kg1.a", "b": "kg1.b"}.get)
    assert cells.contexts == [{"f": "a"}, {"f": "b"}] and cells.rows == [3, 3]
    with pytest.raises(RowError) as info:
        scope.value_cells(cells, 1, {"id": None, "a": "kg1.y"}.get)
    assert "context column 'id' is empty" in info.value.error.detail
    assert len(cells) == 2  # a failed row adds nothing
    for bad in ("k", "=v", "k="):
        with pytest.raises(InvalidRequest):
            ContextRule.parse("column", bad)


def test_record_cells_follow_the_policy() -> None:
    """Records: each encrypted field under its policy purpose, with the record context."""
    policies = load_policies()
    scope = Scope(_spec(purpose=None, fields=(), record_type="resident"), policies)
    cells = CellBatch()
    scope.record_cells(cells, 0, {"氏名": "kg1.a", "個人番号": "kg1.b", "世帯番号": "H-1"}, 7)
    assert cells.purposes == ["resident", "mynumber"]
    assert cells.contexts[1] == {"record_type": "resident", "record_id": "7", "field": "個人番号"}
    with pytest.raises(RowError) as info:
        scope.record_cells(cells, 1, {"氏名": 12}, "R-1")
    assert info.value.field_name == "氏名" and info.value.error.code == "VALIDATION_FAILED"
    with pytest.raises(RowError):
        scope.record_cells(cells, 1, {"unknown": "kg1.a"}, "R-1")
    with pytest.raises(RowError):
        scope.record_cells(cells, 1, {"氏名": "kg1.a"}, "")  # no record id to bind


def test_store_ownership_and_checkpoints(tmp_path: Path) -> None:
    """One owner at a time; a dead owner's job is taken over; checkpoints are compare-and-set."""
    store = JobStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    dead = "nohost-at-all:1:1"  # another host, fresh heartbeat: not taken over
    job = store.create(fingerprint="f" * 64, operation="rewrap", kind="jsonl", tenant="131016",
                       actor="a", spec={}, input_identity=None, owner=dead)  # fmt: skip
    with pytest.raises(InvalidRequest, match="running in another process"):
        store.claim(job.id, current_owner())
    # the same host, a pid that does not exist: taken over at once
    import socket

    gone = f"{socket.gethostname()}:{2**22 + 12345}:1"
    job2 = store.create(fingerprint="e" * 64, operation="rewrap", kind="jsonl", tenant="131016",
                        actor="a", spec={}, input_identity=None, owner=gone)  # fmt: skip
    me = current_owner()
    assert store.claim(job2.id, me).owner == me
    with pytest.raises(Unavailable, match="taken over"):
        store.checkpoint(job2.id, gone, {"lines": 1}, {"read": 1})
    errors = [RecordError(f"line {i}", "v", "DECRYPTION_FAILED", "x") for i in range(3)]
    store.checkpoint(job2.id, me, {"lines": 9}, {"read": 9, "failed": 3}, errors)
    assert store.get(job2.id).checkpoint == {"lines": 9}
    assert [e.position for e in store.errors(job2.id)] == ["line 0", "line 1", "line 2"]
    assert store.find_unfinished("e" * 64) is not None
    store.finish(job2.id, me, state="done")
    assert store.find_unfinished("e" * 64) is None
    with pytest.raises(NotFound):
        store.get("nope")
    assert owner_is_alive(me) is True and owner_is_alive(gone) is False
    assert owner_is_alive(f"elsewhere:{os.getpid()}:1") is None
    store.close()


def test_header_labels() -> None:
    """Census labels come from the header alone; anything else is 'invalid'."""
    assert header_label("hello") == INVALID
    assert header_label("kg1.AAAAAAAAAAAAAAAAAAAAAAAA") == INVALID
    assert parse_label("131016/resident/v3/hsm") == ("131016", "resident", 3, "hsm")
    assert parse_label(INVALID) is None


def test_run_options_are_checked() -> None:
    with pytest.raises(InvalidRequest):
        RunOptions(workers=0)
    with pytest.raises(InvalidRequest):
        RunOptions(engine="spark")


def test_exported_members() -> None:
    """keygate.bulk re-exports a sorted __all__, every name of which exists."""
    import keygate.bulk

    assert keygate.bulk.__all__ == sorted(keygate.bulk.__all__)
    for name in keygate.bulk.__all__:
        assert hasattr(keygate.bulk, name), name
