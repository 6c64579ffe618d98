"""M-of-N approvals: the bootstrap rule, too few approvals, the same custodian twice, expiry,
forged approvals, removed custodians, vetoes, and the actions a request can carry."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from custody_support import ACTOR, CHIYODA, OSAKA, Env, Key
from pydantic import ValidationError

from keygate.config import load_settings
from keygate.core.errors import ConfigurationError, Forbidden, InvalidRequest, NotFound
from keygate.custody import ACTIONS, Custody, register_action
from keygate.custody.canonical import (
    CustodyRequest,
    approval_message,
    request_bytes,
    request_digest,
)
from keygate.custody.store import requests_table
from keygate.policy.access import hash_token, new_token


def _tenant_enabled(env: Env, tenant: str = CHIYODA) -> bool:
    rec = env.gw.registry.get_tenant(tenant)
    assert rec is not None
    return bool(rec.enabled)


# ---------------------------------------------------------------------------- bootstrap rule


def test_bootstrap_then_direct_paths_refused(make_env: Callable[..., Env]) -> None:
    """Direct sensitive changes work until M custodians are enrolled, then refuse with a
    pointer to `keygate request …`; the refusal is audited; key disable stays direct."""
    env = make_env()
    env.enrol("temp")
    env.custody.remove_custodian(ACTOR, "temp")  # bootstrap: removal is direct too
    with pytest.raises(InvalidRequest, match="never reused"):
        env.enrol("temp")
    env.gw.set_tenant_enabled(ACTOR, OSAKA, False)  # no custodians: works as before
    env.gw.set_tenant_enabled(ACTOR, OSAKA, True)
    env.enrol("alice")
    assert not env.custody.status().active
    env.gw.set_tenant_enabled(ACTOR, OSAKA, False)  # one custodian of a quorum of 2
    env.enrol("bob")
    status = env.custody.status()
    assert status.active and status.custodians == 2 and status.quorum == 2

    with pytest.raises(Forbidden, match="keygate request enable-tenant 271004"):
        env.gw.set_tenant_enabled(ACTOR, OSAKA, True)
    with pytest.raises(Forbidden, match="keygate request disable-tenant 131016"):
        env.gw.set_tenant_enabled(ACTOR, CHIYODA, False)
    with pytest.raises(Forbidden, match="keygate request revoke-token juki-app"):
        env.gw.revoke_identity(ACTOR, "juki-app")
    with pytest.raises(Forbidden, match="keygate request add-token"):
        env.gw.add_identity(
            ACTOR, "other", tenants=[CHIYODA], purposes=["*"], record_types=[], operations=["*"]
        )
    with pytest.raises(Forbidden, match="keygate request add-custodian carol"):
        env.enrol("carol")
    with pytest.raises(Forbidden, match="keygate request remove-custodian bob"):
        env.custody.remove_custodian(ACTOR, "bob")
    assert _tenant_enabled(env)

    denied = [e for e in env.events("tenant.disabled") if e.outcome == "denied"]
    assert len(denied) == 1 and denied[0].code == "FORBIDDEN" and denied[0].tenant == CHIYODA
    assert any(e.outcome == "denied" for e in env.events("custodian.added"))

    # Disabling a key version is an emergency brake and stays direct; so does enabling it.
    env.gw.set_key_state(ACTOR, CHIYODA, "tax", 1, enabled=False)
    env.gw.set_key_state(ACTOR, CHIYODA, "tax", 1, enabled=True)


def test_dual_control_stays_on_once_activated(make_env: Callable[..., Env]) -> None:
    """Dual control never switches back off, even if a later configuration asks for a larger
    quorum than custodians are enrolled."""
    env = make_env()
    env.enrol("alice", "bob")
    bigger = Custody(env.gw, quorum=3, clock=env.clock)
    assert bigger.status().active
    with pytest.raises(InvalidRequest, match="needs at least 3 enrolled custodians"):
        req = bigger.new_request(ACTOR, "disable-tenant", {"tenant": CHIYODA})
        bigger.submit(ACTOR, req)


def test_quorum_below_two_needs_the_development_mode(make_env: Callable[..., Env]) -> None:
    """M >= 2 unless single-custodian mode is explicit; in that mode one signed request
    executes at once."""
    with pytest.raises(ValidationError, match="custody_quorum must be at least 2"):
        load_settings(custody_quorum=1)
    assert load_settings(custody_quorum=1, custody_allow_single_custodian=True).custody_quorum == 1
    env = make_env(quorum=1, allow_single_custodian=True)
    with pytest.raises(ConfigurationError, match="at least 2"):
        Custody(env.gw, quorum=1)
    env.enrol("alice")
    _, outcome = env.request("disable-tenant", {"tenant": CHIYODA}, by="alice")
    assert outcome.executed and not _tenant_enabled(env)


# ---------------------------------------------------------------------------- approvals


def test_too_few_approvals_leave_the_request_pending(env: Env) -> None:
    """An unsigned request needs M approvals; with one it waits and nothing changes; the M-th
    executes it, once, on behalf of the request."""
    req, outcome = env.request("disable-tenant", {"tenant": CHIYODA})
    assert outcome.approvals == 0 and outcome.request.status == "pending"
    outcome = env.approve(req, "alice")
    assert (outcome.approvals, outcome.executed, outcome.request.status) == (1, False, "pending")
    assert _tenant_enabled(env)

    outcome = env.approve(req, "bob")
    assert outcome.executed and outcome.approvals == 2
    assert outcome.request.status == "executed"
    assert not _tenant_enabled(env)
    changed = [e for e in env.events("tenant.disabled") if e.outcome == "ok"]
    assert [e.actor for e in changed] == [f"custody:{req.id}"]
    executed = env.events("custody.executed", req.id)
    assert len(executed) == 1 and executed[0].outcome == "ok"
    assert executed[0].request_id == req.id and executed[0].detail["approvals"] == 2
    # A late approval finds the request closed.
    with pytest.raises(InvalidRequest, match="executed"):
        env.approve(req, "carol")


def test_the_signing_requester_is_the_first_approval(env: Env) -> None:
    """A custodian who signs their own request counts as one approval: one more executes it."""
    req, outcome = env.request("disable-tenant", {"tenant": CHIYODA}, by="alice")
    assert outcome.approvals == 1 and outcome.request.requester == "alice"
    assert env.approve(req, "bob").executed


def test_the_same_custodian_twice_counts_once(env: Env) -> None:
    """A second decision by the same custodian is refused; the count stays at one."""
    req, _ = env.request("disable-tenant", {"tenant": CHIYODA}, by="alice")
    with pytest.raises(InvalidRequest, match="already decided"):
        env.approve(req, "alice")
    again = env.custody.get(req.id)
    assert again.status == "pending" and env.custody.valid_approvals(again) == 1
    assert _tenant_enabled(env)


def test_one_key_cannot_be_two_custodians(make_env: Callable[..., Env]) -> None:
    """Registering the same public key under a second name is refused (it would count twice)."""
    env = make_env()
    env.enrol("alice")
    env.keys["alias"] = env.keys["alice"]
    with pytest.raises(InvalidRequest, match="already registered"):
        env.enrol("alias")


def test_an_expired_request_takes_no_approvals(env: Env) -> None:
    """After its lifetime (24 h by default) a request is expired: approvals are refused and the
    expiry is audited once."""
    req, _ = env.request("disable-tenant", {"tenant": CHIYODA}, by="alice")
    assert (req.expires_at - req.created_at).total_seconds() == 24 * 3600
    env.clock.advance(hours=23, minutes=59)
    assert env.custody.get(req.id).status == "pending"
    env.clock.advance(minutes=1)
    with pytest.raises(InvalidRequest, match="expired"):
        env.approve(req, "bob")
    assert env.custody.get(req.id).status == "expired"
    assert _tenant_enabled(env)
    assert len(env.events("custody.expired")) == 1
    env.custody.requests()  # listing expires nothing twice
    assert len(env.events("custody.expired")) == 1


def test_listing_expires_pending_requests(env: Env) -> None:
    """`requests list` marks requests past their expiry as expired (and audits it)."""
    req, _ = env.request("disable-tenant", {"tenant": CHIYODA})
    env.clock.advance(days=2)
    assert [r.id for r in env.custody.requests(pending_only=True)] == []
    assert env.custody.get(req.id).status == "expired"
    assert [e.request_id for e in env.events("custody.expired")] == [req.id]


# ---------------------------------------------------------------------------- forged approvals


def _forgeries(env: Env, req: CustodyRequest) -> dict[str, tuple[str, bytes]]:
    """(claimed custodian, signature) pairs that must all be refused for ``req``."""
    other, _ = env.request("disable-tenant", {"tenant": OSAKA})
    mallory = Key()
    bob = env.keys["bob"]
    return {
        "random bytes": ("bob", b"\x01" * 64),
        "empty": ("bob", b""),
        "unregistered key": ("bob", mallory.approval(req, "bob")),
        "another custodian's key": ("bob", env.keys["carol"].approval(req, "bob")),
        "over other request bytes": ("bob", bob.sign(request_bytes(req))),
        "replayed from another request": ("bob", bob.approval(other, "bob")),
        "a rejection presented as approval": ("bob", bob.approval(req, "bob", "reject")),
        "signed for another approver name": ("bob", bob.approval(req, "carol")),
        "not a custodian": ("mallory", mallory.approval(req, "mallory")),
    }


def test_forged_approvals_are_refused_and_audited(env: Env) -> None:
    """Bad signatures, unregistered keys, signatures over other bytes and replays from another
    request are refused (FORBIDDEN), audited as denied, and change nothing."""
    req, _ = env.request("disable-tenant", {"tenant": CHIYODA}, by="alice")
    forgeries = _forgeries(env, req)
    for case, (name, signature) in forgeries.items():
        with pytest.raises(Forbidden):
            env.custody.approve(req.id, name, signature)
        current = env.custody.get(req.id)
        assert current.status == "pending", case
        assert env.custody.valid_approvals(current) == 1, case
    assert _tenant_enabled(env)
    denied = [e for e in env.events("custody.approved") if e.outcome == "denied"]
    assert len(denied) == len(forgeries)
    assert all(e.code == "FORBIDDEN" and e.request_id == req.id for e in denied)
    # The real bob still can.
    assert env.approve(req, "bob").executed


def test_a_changed_request_row_no_longer_verifies(env: Env) -> None:
    """Approvals sign the request's exact bytes: editing its parameters in the database voids
    them, so the edited request cannot run on the old approvals."""
    req, _ = env.request("disable-tenant", {"tenant": OSAKA}, by="alice")
    engine = env.gw.registry._engine  # behind keygate's back, on the database itself
    with engine.begin() as conn:
        conn.execute(
            sa.update(requests_table)
            .where(requests_table.c.id == req.id)
            .values(params=json.dumps({"tenant": CHIYODA}))
        )
    tampered = env.custody.get(req.id)
    assert env.custody.valid_approvals(tampered) == 0
    # bob's approval (over the row as it now reads) is alone: no execution
    outcome = env.approve(tampered, "bob")
    assert outcome.approvals == 1 and not outcome.executed
    assert _tenant_enabled(env) and _tenant_enabled(env, OSAKA)


def test_a_removed_custodian_no_longer_counts(make_env: Callable[..., Env]) -> None:
    """Removing a custodian (itself an approved request) voids their earlier approvals and
    refuses their later ones."""
    env = make_env()
    env.enrol("alice", "bob")
    env.enrol_by_request("carol")
    env.enrol_by_request("dave")
    pending, _ = env.request("disable-tenant", {"tenant": CHIYODA})
    env.approve(pending, "carol")
    assert env.custody.valid_approvals(env.custody.get(pending.id)) == 1

    removal, _ = env.request("remove-custodian", {"name": "carol"}, by="alice")
    assert env.approve(removal, "bob").executed
    assert [c.name for c in env.custody.custodians(include_removed=False)] == [
        "alice",
        "bob",
        "dave",
    ]
    assert env.custody.valid_approvals(env.custody.get(pending.id)) == 0
    with pytest.raises(Forbidden, match="was removed"):
        env.approve(pending, "carol")
    # Removal never goes below the quorum while dual control is on... (3 left, quorum 2)
    env.request("remove-custodian", {"name": "dave"}, by="alice")
    # ...and a removal that would leave fewer than M custodians is refused at request time.
    env2 = make_env()
    env2.enrol("alice", "bob")
    with pytest.raises(InvalidRequest, match="would leave 1 custodians"):
        env2.request("remove-custodian", {"name": "bob"}, by="alice")
    assert len(env.events("custodian.removed")) == 1


def test_a_rejection_vetoes_the_request(env: Env) -> None:
    """One signed rejection ends the request; approvals after it are refused."""
    req, _ = env.request("disable-tenant", {"tenant": CHIYODA}, by="alice")
    current = env.custody.get(req.id)
    outcome = env.custody.reject(
        req.id, "carol", env.keys["carol"].approval(current, "carol", "reject")
    )
    assert outcome.request.status == "rejected"
    with pytest.raises(InvalidRequest, match="rejected"):
        env.approve(req, "bob")
    assert _tenant_enabled(env)
    rejected = env.events("custody.rejected")
    assert len(rejected) == 1 and rejected[0].detail["approver"] == "carol"
    # an approval signature does not count as a rejection either
    req2, _ = env.request("disable-tenant", {"tenant": CHIYODA})
    with pytest.raises(Forbidden):
        env.custody.reject(req2.id, "bob", env.keys["bob"].approval(req2, "bob"))


def test_unknown_request_and_action(env: Env) -> None:
    """Unknown ids are NOT_FOUND, malformed ids and unknown actions INVALID_REQUEST."""
    with pytest.raises(NotFound):
        env.custody.get("kgr-0000000000000000")
    with pytest.raises(InvalidRequest, match="request ids"):
        env.custody.get("42")
    with pytest.raises(InvalidRequest, match="unknown dual-control action"):
        env.custody.new_request(ACTOR, "format-disk", {})
    with pytest.raises(InvalidRequest, match="unknown parameters"):
        env.custody.new_request(ACTOR, "disable-tenant", {"tenant": CHIYODA, "force": True})
    with pytest.raises(InvalidRequest, match="already enabled"):
        env.custody.new_request(ACTOR, "enable-tenant", {"tenant": CHIYODA})


# ---------------------------------------------------------------------------- actions


def test_access_changes_through_requests(env: Env) -> None:
    """add-token: the token is made by the requester and works only after approval;
    revoke-token revokes; enable-tenant re-enables."""
    token = new_token()
    params: dict[str, Any] = {
        "name": "zei-app",
        "tenants": [CHIYODA],
        "purposes": ["tax"],
        "operations": ["encrypt", "decrypt"],
        "credential": hash_token(token),
    }
    req, outcome = env.request("add-token", params, by="alice")
    assert not outcome.executed
    assert env.gw.authenticate(token) is None
    assert env.approve(req, "carol").executed
    principal = env.gw.authenticate(token)
    assert principal is not None and principal.name == "zei-app"

    req, _ = env.request("revoke-token", {"name": "zei-app"}, by="bob")
    assert env.approve(req, "alice").executed
    assert env.gw.authenticate(token) is None

    req, _ = env.request("disable-tenant", {"tenant": CHIYODA}, by="bob")
    env.approve(req, "carol")
    req, _ = env.request(
        "enable-tenant",
        {"tenant": CHIYODA},
        by="bob",
    )
    env.approve(req, "alice")
    assert _tenant_enabled(env)
    with pytest.raises(InvalidRequest, match="credential"):
        env.request("add-token", {**params, "name": "x", "credential": token}, by="alice")


def test_custodians_are_added_by_request_once_dual_control_is_on(env: Env) -> None:
    """add-custodian carries the public key (signed); the fingerprint is filled in."""
    dave = Key()
    env.keys["dave"] = dave
    req, _ = env.request("add-custodian", {"name": "dave", "public_key": dave.public_pem}, by="bob")
    assert len(str(req.params["fingerprint"])) == 64 and req.params["algorithm"] == "ed25519"
    assert env.approve(req, "carol").executed
    assert "dave" in [c.name for c in env.custody.custodians()]
    other, _ = env.request("disable-tenant", {"tenant": CHIYODA}, by="dave")
    assert env.approve(other, "alice").executed
    with pytest.raises(InvalidRequest, match="taken"):
        env.request("add-custodian", {"name": "dave", "public_key": Key().public_pem}, by="bob")


def test_registered_actions_run_exactly_once(env: Env) -> None:
    """A lead-registered action goes through the same quorum; its executor runs once, under
    the request's authority, and its result is stored and audited."""
    calls: list[dict[str, Any]] = []

    def validate(ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("region") not in {"jp-east", "jp-west"}:
            raise InvalidRequest("region must be in Japan")
        return {"tenant": params["tenant"], "region": params["region"]}

    def execute(ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
        calls.append(params)
        return {"region": params["region"], "by": ctx.actor}

    register_action("set-residency-test", validate=validate, execute=execute)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_action("set-residency-test", validate=validate, execute=execute)
        with pytest.raises(InvalidRequest, match="Japan"):
            env.request("set-residency-test", {"tenant": CHIYODA, "region": "us-east-1"})
        req, _ = env.request(
            "set-residency-test", {"tenant": CHIYODA, "region": "jp-west"}, by="alice"
        )
        outcome = env.approve(req, "bob")
        assert outcome.executed and calls == [{"tenant": CHIYODA, "region": "jp-west"}]
        assert outcome.request.result == {"region": "jp-west", "by": f"custody:{req.id}"}
        with pytest.raises(InvalidRequest):
            env.approve(req, "carol")
        assert len(calls) == 1
    finally:
        ACTIONS.pop("set-residency-test", None)


def test_a_failed_execution_is_recorded(env: Env) -> None:
    """If the state changed so that the action no longer validates, the request ends failed
    with the error code, audited, and nothing is changed."""
    req, _ = env.request("revoke-token", {"name": "juki-app"}, by="alice")
    other, _ = env.request("revoke-token", {"name": "juki-app"}, by="bob")
    assert env.approve(other, "carol").executed
    outcome = env.approve(req, "carol")
    assert not outcome.executed and outcome.error is not None
    assert outcome.error.code == "INVALID_REQUEST"
    assert env.custody.get(req.id).status == "failed"
    failed = [e for e in env.events("custody.executed") if e.outcome == "error"]
    assert len(failed) == 1 and failed[0].request_id == req.id


# ---------------------------------------------------------------------------- encoding


def _fixed_request() -> CustodyRequest:
    from datetime import UTC, datetime

    return CustodyRequest(
        id="kgr-00112233445566ff",
        action="destroy-key",
        params={"tenant": "131016", "purpose": "resident", "version": 1, "waiting_days": 7,
                "reason": "住民記録の旧鍵"},
        requester="alice",
        created_at=datetime(2026, 11, 22, 9, 0, tzinfo=UTC),
        expires_at=datetime(2026, 11, 23, 9, 0, tzinfo=UTC),
        required=2,
    )  # fmt: skip


def test_canonical_request_bytes_are_pinned() -> None:
    """The signed encoding is domain-separated sorted-key JSON; pinned byte for byte."""
    req = _fixed_request()
    assert request_bytes(req) == (
        b"keygate-custody-request-v1\x00"
        + '{"action":"destroy-key","created_at":"2026-11-22T09:00:00.000000Z",'
        '"expires_at":"2026-11-23T09:00:00.000000Z","id":"kgr-00112233445566ff",'
        '"params":{"purpose":"resident","reason":"住民記録の旧鍵","tenant":"131016",'
        '"version":1,"waiting_days":7},"requester":"alice","required":2}'.encode()
    )
    digest = request_digest(req)
    assert approval_message(req, "bob", "approve") == (
        b"keygate-custody-approval-v1\x00"
        + f'{{"approver":"bob","decision":"approve","request":"{digest}"}}'.encode()
    )
    # any field changes the digest
    from dataclasses import replace

    for changed in (
        replace(req, id="kgr-00112233445566fe"),
        replace(req, required=3),
        replace(req, requester="carol"),
        replace(req, params={**req.params, "version": 2}),
        replace(req, params={**req.params, "version": "1"}),
    ):
        assert request_digest(changed) != digest
    assert base64.b64encode(bytes.fromhex(digest))  # 32 bytes of hex
