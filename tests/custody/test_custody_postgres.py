"""Dual control on PostgreSQL: two gateway instances share the custody tables; concurrent
final approvals through both execute the request once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from custody_support import ACTOR, CHIYODA, FakeClock, Key

from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.core.errors import Forbidden, GatewayError
from keygate.custody import Custody, approval_message
from keygate.hsm.softhsm import SoftHsmToken
from keygate.testing.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.hsm]


def test_two_gateways_share_dual_control_on_postgresql(
    pg_server: PostgresServer, make_token: Callable[[str], SoftHsmToken], tmp_path: Path
) -> None:
    """Custodians enrolled through one instance bind the other; approvals given through both
    at once execute the request exactly once."""
    token = make_token("kg-custody-pg")
    settings = load_settings(
        data_dir=tmp_path,
        database_url=pg_server.create_schema("custody_e2e"),
        hsm_token_label=token.label,
        hsm_pin=token.user_pin,
    )
    first = build_gateway(settings, start_refresher=False)
    second = build_gateway(settings, start_refresher=False)
    try:
        clock = FakeClock()
        one = Custody.from_settings(first, settings, clock=clock)
        two = Custody.from_settings(second, settings, clock=clock)
        first.add_tenant(ACTOR, CHIYODA, name="千代田区")
        keys = {name: Key() for name in ("alice", "bob", "carol")}
        one.add_custodian(ACTOR, "alice", keys["alice"].public_pem)
        one.add_custodian(ACTOR, "bob", keys["bob"].public_pem)
        with pytest.raises(Forbidden):  # dual control is on for the other instance too
            second.set_tenant_enabled(ACTOR, CHIYODA, False)
        req = two.new_request(
            ACTOR,
            "add-custodian",
            {"name": "carol", "public_key": keys["carol"].public_pem},
            requester="alice",
        )
        two.submit(
            ACTOR, req, signature=keys["alice"].sign(approval_message(req, "alice", "approve"))
        )
        assert one.approve(
            req.id, "bob", keys["bob"].sign(approval_message(one.get(req.id), "bob", "approve"))
        ).executed

        req = one.new_request(ACTOR, "disable-tenant", {"tenant": CHIYODA}, requester="alice")
        one.submit(
            ACTOR, req, signature=keys["alice"].sign(approval_message(req, "alice", "approve"))
        )
        stored = two.get(req.id)
        results: list[Any] = []
        barrier = threading.Barrier(2)

        def approve(custody: Custody, name: str) -> None:
            signature = keys[name].sign(approval_message(stored, name, "approve"))
            barrier.wait()
            try:
                results.append(custody.approve(req.id, name, signature).executed)
            except GatewayError as exc:
                results.append(exc.code)

        threads = [
            threading.Thread(target=approve, args=(one, "bob")),
            threading.Thread(target=approve, args=(two, "carol")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(map(str, results)) == ["INVALID_REQUEST", "True"], results
        tenant = second.registry.get_tenant(CHIYODA)
        assert tenant is not None and not tenant.enabled
        executed = [
            e for e in first.audit_store.query()
            if e.action == "custody.executed" and e.request_id == req.id
        ]  # fmt: skip
        assert len(executed) == 1
    finally:
        first.close()
        second.close()
