"""Helpers for the dual-control tests (a module with a unique name: test modules import it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keygate.config import Settings, load_settings
from keygate.custody import Custody, CustodyRequest, approval_message
from keygate.hsm.softhsm import SoftHsmToken
from keygate.service import Gateway

ACTOR = "custodian:tests"
CHIYODA = "131016"
OSAKA = "271004"
PURPOSES = ("resident", "tax")


class FakeClock:
    """A settable UTC clock."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 22, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Key:
    """A custodian's in-memory Ed25519 key."""

    private: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    @property
    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def approval(self, request: CustodyRequest, name: str, decision: str = "approve") -> bytes:
        return self.sign(approval_message(request, name, decision))


def make_settings(token: SoftHsmToken, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "hsm_token_label": token.label,
        "hsm_pin": token.user_pin,
        "hsm_pin_file": None,
        "refresh_interval_s": 0.2,
    }
    values.update(overrides)
    return load_settings(**values)


@dataclass
class Env:
    gw: Gateway
    settings: Settings
    token: SoftHsmToken
    clock: FakeClock
    custody: Custody
    keys: dict[str, Key]
    app_token: str

    def enrol(self, *names: str) -> None:
        for name in names:
            key = self.keys.setdefault(name, Key())
            self.custody.add_custodian(ACTOR, name, key.public_pem)

    def enrol_by_request(self, name: str, *, by: str = "alice", approver: str = "bob") -> None:
        """Enrol a custodian once dual control is on: a signed request and one approval."""
        key = self.keys.setdefault(name, Key())
        req, _ = self.request("add-custodian", {"name": name, "public_key": key.public_pem}, by=by)
        assert self.approve(req, approver).executed

    def request(
        self, action: str, params: dict[str, Any], *, by: str | None = None
    ) -> tuple[CustodyRequest, Any]:
        """Make (and submit) a request; signed by custodian ``by`` when given."""
        req = self.custody.new_request(ACTOR, action, params, requester=by)
        sig = self.keys[by].approval(req, by) if by is not None else None
        return req, self.custody.submit(ACTOR, req, signature=sig)

    def approve(self, request: CustodyRequest, name: str) -> Any:
        current = self.custody.get(request.id)
        return self.custody.approve(request.id, name, self.keys[name].approval(current, name))

    def events(self, action: str | None = None, request_id: str | None = None) -> list[Any]:
        return [
            e
            for e in self.gw.audit_store.query()
            if (action is None or e.action == action)
            and (request_id is None or e.request_id == request_id)
        ]
