"""Scheduled key destruction: never the active version, disabled during the waiting period,
cancellable by quorum, then the HSM object is gone and ciphertexts answer 410 KEY_DESTROYED."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest
import uvicorn
from custody_support import ACTOR, CHIYODA, Env
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

import keygate.api.app as app_module
from keygate.api.app import create_app
from keygate.api.metrics import Metrics
from keygate.config import load_settings
from keygate.core.errors import (
    ConfigurationError,
    Forbidden,
    InvalidRequest,
    KeyDestroyed,
    KeyNotUsable,
)
from keygate.core.model import KeyState
from keygate.custody import Custody
from keygate.hsm.pkcs11 import Pkcs11Hsm

PURPOSE = "resident"


def _state(env: Env, version: int) -> KeyState:
    rec = env.gw.registry.get_version(CHIYODA, PURPOSE, version)
    assert rec is not None
    return rec.state


def _label(env: Env, version: int) -> str:
    rec = env.gw.registry.get_version(CHIYODA, PURPOSE, version)
    assert rec is not None
    return str(rec.hsm_label)


def _on_token(env: Env, label: str) -> bool:
    """Whether the HSM token holds a KEK with this label, asked over a session of its own."""
    hsm = Pkcs11Hsm(env.token.hsm_config())
    try:
        return hsm.kek_exists(label)
    finally:
        hsm.close()


def _encrypt(env: Env) -> str:
    principal = env.gw.authenticate(env.app_token)
    assert principal is not None
    text, _ = env.gw.encrypt(principal, "t", CHIYODA, PURPOSE, {"f": "x"}, b"old secret")
    return text


def _decrypt(env: Env, text: str) -> bytes:
    principal = env.gw.authenticate(env.app_token)
    assert principal is not None
    return env.gw.decrypt(principal, "t", CHIYODA, PURPOSE, {"f": "x"}, text)


def _schedule(env: Env, version: int = 1, **params: object) -> str:
    req, _ = env.request(
        "destroy-key",
        {"tenant": CHIYODA, "purpose": PURPOSE, "version": version, **params},
        by="alice",
    )
    outcome = env.approve(req, "bob")
    assert outcome.executed, outcome.error
    return req.id


def test_the_active_version_is_refused_at_request(env: Env) -> None:
    """destroy-key refuses the active version (rotate first) and a destroyed one."""
    with pytest.raises(InvalidRequest, match="active version"):
        env.request("destroy-key", {"tenant": CHIYODA, "purpose": PURPOSE, "version": 1})
    assert _state(env, 1) is KeyState.ACTIVE


def test_the_waiting_period_is_7_to_30_days(env: Env) -> None:
    """The waiting period is validated in the configuration, the service and each request."""
    for days in (6, 31):
        with pytest.raises(ValidationError):
            load_settings(custody_destruction_wait_days=days)
        with pytest.raises(ConfigurationError):
            Custody(env.gw, destruction_wait_days=days)
    env.gw.rotate_key(ACTOR, CHIYODA, PURPOSE)
    for days in (0, 6, 31):
        with pytest.raises(InvalidRequest, match="7 to 30 days"):
            env.request(
                "destroy-key",
                {"tenant": CHIYODA, "purpose": PURPOSE, "version": 1, "waiting_days": days},
            )
    req, _ = env.request(
        "destroy-key", {"tenant": CHIYODA, "purpose": PURPOSE, "version": 1, "waiting_days": 30}
    )
    assert req.params["waiting_days"] == 30
    env.gw.rotate_key(ACTOR, CHIYODA, "tax")
    req, _ = env.request("destroy-key", {"tenant": CHIYODA, "purpose": "tax", "version": 1})
    # the default comes from the configuration, and is what the custodians sign
    assert req.params["waiting_days"] == 7


@contextmanager
def _serve(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The gateway's API over real HTTP on a loopback port (a uvicorn thread)."""
    monkeypatch.setattr(app_module, "Metrics", lambda: Metrics(registry=CollectorRegistry()))
    app = create_app(env.settings, gateway=env.gw)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def test_destruction_after_the_waiting_period(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Approved: v1 is disabled (409) at once and cannot be re-enabled; before the due time
    destroy_due does nothing; after it the KEK is gone from the token and the registry, and
    ciphertexts under v1 answer 410 KEY_DESTROYED over HTTP; v2's still decrypt."""
    old = _encrypt(env)
    env.gw.rotate_key(ACTOR, CHIYODA, PURPOSE)
    new = _encrypt(env)
    label = _label(env, 1)
    assert _on_token(env, label)

    rid = _schedule(env)
    assert _state(env, 1) is KeyState.DISABLED
    (d,) = env.custody.destructions(open_only=True)
    assert d.request_id == rid and d.status == "scheduled" and d.previous_state == "decrypt-only"
    assert d.due_at == env.clock.now + timedelta(days=7)
    with pytest.raises(KeyNotUsable):
        _decrypt(env, old)
    with pytest.raises(Forbidden, match=f"cancel-destruction {rid}"):
        env.gw.set_key_state(ACTOR, CHIYODA, PURPOSE, 1, enabled=True)
    (scheduled,) = env.events("key.destruction_scheduled")
    assert scheduled.key_version == 1 and scheduled.actor == f"custody:{rid}"
    with pytest.raises(InvalidRequest, match="already scheduled"):
        env.request("destroy-key", {"tenant": CHIYODA, "purpose": PURPOSE, "version": 1})

    env.clock.advance(days=7, seconds=-1)
    assert env.custody.destroy_due() == []
    assert _on_token(env, label)

    env.clock.advance(seconds=1)
    (done,) = env.custody.destroy_due()
    assert done.ok and done.destruction.status == "destroyed"
    assert _state(env, 1) is KeyState.DESTROYED
    assert not _on_token(env, label)  # the HSM object is gone, found by its label
    assert env.custody.destroy_due() == []  # once
    (destroyed,) = env.events("key.destroyed")
    assert destroyed.outcome == "ok" and destroyed.detail["hsm_label"] == label

    with pytest.raises(KeyDestroyed):
        _decrypt(env, old)
    assert _decrypt(env, new) == b"old secret"
    with _serve(env, monkeypatch) as url:
        auth = {"Authorization": f"Bearer {env.app_token}"}
        for text, status in ((old, 410), (new, 200)):
            r = httpx.post(
                url + "/v1/decrypt",
                json={"tenant": CHIYODA, "purpose": PURPOSE, "context": {"f": "x"},
                      "ciphertext": text},
                headers=auth,
                timeout=30,
            )  # fmt: skip
            assert r.status_code == status, r.text
        r = httpx.post(
            url + "/v1/decrypt",
            json={"tenant": CHIYODA, "purpose": PURPOSE, "context": {"f": "x"}, "ciphertext": old},
            headers=auth,
            timeout=30,
        )
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "KEY_DESTROYED"
        r = httpx.post(
            url + "/v1/decrypt",
            json={"tenant": CHIYODA, "purpose": PURPOSE, "context": {"f": "x"}, "ciphertext": new},
            headers=auth,
            timeout=30,
        )
        assert base64.b64decode(r.json()["plaintext"]) == b"old secret"
    with pytest.raises(InvalidRequest, match="destroyed"):
        env.gw.set_key_state(ACTOR, CHIYODA, PURPOSE, 1, enabled=True)


def test_a_cancelled_destruction_restores_the_version(env: Env) -> None:
    """cancel-destruction (also M of N) during the waiting period restores decrypt-only; the
    due time then passes without destruction; a second cancel is refused."""
    old = _encrypt(env)
    env.gw.rotate_key(ACTOR, CHIYODA, PURPOSE)
    rid = _schedule(env)
    env.clock.advance(days=3)
    cancel, outcome = env.request("cancel-destruction", {"destroy_request": rid}, by="carol")
    assert not outcome.executed
    assert cancel.params == {
        "destroy_request": rid,
        "tenant": CHIYODA,
        "purpose": PURPOSE,
        "version": 1,
    }  # the custodians sign which version they save
    assert env.approve(cancel, "bob").executed
    assert _state(env, 1) is KeyState.DECRYPT_ONLY
    assert _decrypt(env, old) == b"old secret"
    env.clock.advance(days=30)
    assert env.custody.destroy_due() == []
    assert _on_token(env, _label(env, 1))
    (d,) = env.custody.destructions()
    assert d.status == "cancelled" and d.cancel_request_id == cancel.id
    with pytest.raises(InvalidRequest, match="only a scheduled destruction"):
        env.request("cancel-destruction", {"destroy_request": rid}, by="alice")
    assert len(env.events("key.destruction_cancelled")) == 1
    # After cancelling it can be scheduled again.
    _schedule(env)


def test_a_disabled_version_stays_disabled_after_cancel(env: Env) -> None:
    """A version that was already disabled when scheduled is disabled again after a cancel."""
    env.gw.rotate_key(ACTOR, CHIYODA, PURPOSE)
    env.gw.set_key_state(ACTOR, CHIYODA, PURPOSE, 1, enabled=False)
    rid = _schedule(env)
    cancel, _ = env.request("cancel-destruction", {"destroy_request": rid}, by="carol")
    env.approve(cancel, "alice")
    assert _state(env, 1) is KeyState.DISABLED


def _make_v1_active_behind_the_guard(env: Env) -> None:
    """Bend the registry (not through keygate's commands) so that v1 is active again."""
    reg = env.gw.registry
    reg.set_version_state(CHIYODA, PURPOSE, 2, KeyState.DISABLED)
    reg.set_version_state(CHIYODA, PURPOSE, 2, KeyState.DESTROYED)
    if _state(env, 1) is KeyState.DECRYPT_ONLY:
        reg.set_version_state(CHIYODA, PURPOSE, 1, KeyState.DISABLED)
    assert reg.set_version_state(CHIYODA, PURPOSE, 1, KeyState.ACTIVE).state is KeyState.ACTIVE
    env.gw.keys.refresh(force=True)


def test_the_active_version_is_refused_again_at_execution(env: Env) -> None:
    """If v1 became active between the request and its approval, the approved request fails
    and nothing is scheduled."""
    env.gw.rotate_key(ACTOR, CHIYODA, PURPOSE)
    req, _ = env.request(
        "destroy-key", {"tenant": CHIYODA, "purpose": PURPOSE, "version": 1}, by="alice"
    )
    _make_v1_active_behind_the_guard(env)
    outcome = env.approve(req, "bob")
    assert not outcome.executed and outcome.error is not None
    assert "active version" in outcome.error.detail
    assert env.custody.get(req.id).status == "failed"
    assert env.custody.destructions() == []
    assert _state(env, 1) is KeyState.ACTIVE


def test_the_active_version_is_refused_again_at_destruction(env: Env) -> None:
    """destroy_due re-checks: a scheduled version that is active by then is not destroyed."""
    env.gw.rotate_key(ACTOR, CHIYODA, PURPOSE)
    _schedule(env)
    _make_v1_active_behind_the_guard(env)
    env.clock.advance(days=8)
    (done,) = env.custody.destroy_due()
    assert not done.ok and done.destruction.status == "failed"
    assert done.error is not None and done.error.code == "INVALID_REQUEST"
    assert _state(env, 1) is KeyState.ACTIVE
    assert _on_token(env, _label(env, 1))
    (event,) = env.events("key.destroyed")
    assert event.outcome == "error"


def test_an_unavailable_hsm_is_finished_by_a_later_run(env: Env) -> None:
    """With the HSM token gone, destroy_due marks the version destroyed in the registry but
    keeps the destruction open; once its claim is stale a later run destroys the KEK."""
    env.gw.rotate_key(ACTOR, CHIYODA, PURPOSE)
    _schedule(env)
    label = _label(env, 1)
    env.clock.advance(days=7)
    with env.token.detached():
        (first,) = env.custody.destroy_due()
    assert not first.ok and first.error is not None and first.error.code == "UNAVAILABLE"
    assert first.destruction.status == "destroying"
    assert _state(env, 1) is KeyState.DESTROYED  # ciphertexts under v1 already answer 410
    assert env.custody.destroy_due() == []  # another run does not take over a fresh claim
    env.clock.advance(minutes=11)
    time.sleep(1)  # the adapter's reconnect back-off
    (second,) = env.custody.destroy_due()
    assert second.ok and second.destruction.status == "destroyed", second.error
    assert not _on_token(env, label)
    assert [e.outcome for e in env.events("key.destroyed")] == ["error", "ok"]
