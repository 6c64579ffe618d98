"""The whole gateway on PostgreSQL: registry and audit trail shared by two gateway instances."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.core.errors import DecryptionFailed
from keygate.hsm.softhsm import SoftHsmToken
from keygate.testing.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.hsm]


def test_two_gateways_share_one_postgresql_registry_and_trail(
    pg_server: PostgresServer, make_token: Callable[[str], SoftHsmToken], tmp_path: Path
) -> None:
    """Keys made by one gateway work in another; rotation propagates; both audit to one trail."""
    token = make_token("kg-pg")
    url = pg_server.create_schema("gateway_e2e")
    settings = load_settings(
        data_dir=tmp_path,
        database_url=url,
        hsm_token_label=token.label,
        hsm_pin=token.user_pin,
    )
    first = build_gateway(settings, start_refresher=False)
    second = build_gateway(settings, start_refresher=False)
    try:
        first.add_tenant("custodian:a", "131016", name="千代田区")
        first.create_key("custodian:a", "131016", "resident")
        _, app_token = first.add_identity(
            "custodian:a",
            "app",
            tenants=["131016"],
            purposes=["resident"],
            record_types=[],
            operations=["encrypt", "decrypt"],
        )
        assert app_token is not None
        second.keys.refresh(force=True)
        caller = second.authenticate(app_token)
        assert caller is not None
        context = {"record_id": "R-1"}
        text, version = second.encrypt(caller, "req-1", "131016", "resident", context, b"yamada")
        assert version == 1
        assert first.decrypt(caller, "req-2", "131016", "resident", context, text) == b"yamada"
        with pytest.raises(DecryptionFailed):
            first.decrypt(caller, "req-3", "131016", "resident", {"record_id": "R-2"}, text)

        first.rotate_key("custodian:a", "131016", "resident")
        second.keys.refresh()
        _, version2 = second.encrypt(caller, "req-4", "131016", "resident", context, b"x")
        assert version2 == 2
        assert second.decrypt(caller, "req-5", "131016", "resident", context, text) == b"yamada"

        events = list(first.audit_store.query())
        by_request = {e.request_id: e for e in events}
        assert {"req-1", "req-2", "req-3", "req-4", "req-5"} <= set(by_request)
        assert by_request["req-3"].outcome == "error"
        assert by_request["req-3"].code == "DECRYPTION_FAILED"
        assert [e.action for e in events].count("key.rotated") == 1
        assert len(events) == len({e.event_id for e in events})
    finally:
        first.close()
        second.close()
