"""Checkpointing from a running gateway: keys made on first use, no wedge, back-off on failure."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keygate.audit.writer import Checkpointer
from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.hsm.softhsm import SoftHsmToken

pytestmark = [pytest.mark.hsm]


def test_gateway_without_init_checkpoints_and_keeps_answering(
    make_token: Callable[[str], SoftHsmToken], tmp_path: Path
) -> None:
    """With audit keys not created beforehand, the Nth event's checkpoint creates them and no
    call waits on the audit trail (the signer once took the append lock twice and wedged)."""
    token = make_token("kg-ckpt")
    settings = load_settings(
        data_dir=tmp_path,
        hsm_token_label=token.label,
        hsm_pin=token.user_pin,
        audit_checkpoint_events=5,
        audit_timeout_s=3.0,
    )
    gw = build_gateway(settings, start_refresher=False)
    try:
        gw.add_tenant("custodian:t", "131016")
        gw.create_key("custodian:t", "131016", "resident")
        _, app_token = gw.add_identity(
            "custodian:t", "app", tenants=["131016"], purposes=["*"], record_types=[],
            operations=["*"],
        )  # fmt: skip
        assert app_token is not None
        caller = gw.authenticate(app_token)
        assert caller is not None
        start = time.monotonic()
        for i in range(40):
            text, _ = gw.encrypt(caller, f"r{i}", "131016", "resident", {}, b"x")
            assert gw.decrypt(caller, f"d{i}", "131016", "resident", {}, text) == b"x"
        assert time.monotonic() - start < 30
        checkpoints = gw.audit_store.checkpoints()
        assert len(checkpoints) >= 10
        head_seq, _ = gw.audit_store.head()
        assert head_seq - checkpoints[-1].seq < 5 + 2
    finally:
        gw.close()


class _Store:
    def __init__(self) -> None:
        self.calls = 0

    def last_checkpoint(self) -> Any:
        return None

    def checkpoint(self, signer: Any) -> Any:
        self.calls += 1
        raise RuntimeError("signing failed")


def test_failed_checkpoint_backs_off() -> None:
    """A failing checkpoint is retried after the back-off, not on every following append."""
    store = _Store()
    now = [100.0]
    cp = Checkpointer(
        store, lambda *a: ("", ""), every_events=1, every_s=60, clock=lambda: now[0], retry_s=5
    )
    for seq in range(1, 50):
        cp.after_append(seq)
    assert store.calls == 1
    assert cp.failures == 1
    now[0] += 5.1
    cp.after_append(60)
    assert store.calls == 2
