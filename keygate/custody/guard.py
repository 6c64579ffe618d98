"""The gateway's dual-control guard: direct sensitive changes stop once custodians are enrolled.

:class:`~keygate.service.Gateway` asks :meth:`DualControlGuard.check_direct` before it changes a
tenant's state or a service identity.  While dual control is off (the *bootstrap*: fewer than M
custodians have ever been enrolled) every change goes through as before.  Once it is on, such a
change is refused with :class:`~keygate.core.errors.Forbidden` naming the ``keygate request …``
command to use instead — unless it is being made by the execution of an approved request
(:func:`executing`).

Enabling a key version whose destruction is scheduled is refused in every mode: the scheduled
destruction must be cancelled (``keygate request cancel-destruction``) instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

from keygate.core.errors import Forbidden
from keygate.custody.store import CustodyStore

__all__ = ["GUARDED_CHANGES", "CustodyStatus", "DualControlGuard", "executing"]

#: audit action of a direct change → the request that replaces it once dual control is on
GUARDED_CHANGES: Final[dict[str, str]] = {
    "tenant.disabled": "keygate request disable-tenant {tenant}",
    "tenant.enabled": "keygate request enable-tenant {tenant}",
    "identity.added": "keygate request add-token {name} …",
    "identity.revoked": "keygate request revoke-token {name}",
    "custodian.added": "keygate request add-custodian {name} --public-key FILE",
    "custodian.removed": "keygate request remove-custodian {name}",
    "provider.set": (
        "keygate request submit provider-set --param tenant={tenant} --param purpose={purpose} "
        "--param uri=URI"
    ),
    "provider.migrated": (
        "keygate request submit provider-migrate --param tenant={tenant} "
        "--param purpose={purpose} --param uri=URI"
    ),
    "provider.migration_finished": (
        "keygate request submit provider-finish --param tenant={tenant} --param purpose={purpose}"
    ),
}

#: the id of the approved request whose execution is running in this context
_EXECUTING: ContextVar[str | None] = ContextVar("keygate_custody_executing", default=None)


@contextlib.contextmanager
def executing(request_id: str) -> Iterator[None]:
    """Within this block, guarded changes are made on behalf of approved ``request_id``."""
    token = _EXECUTING.set(request_id)
    try:
        yield
    finally:
        _EXECUTING.reset(token)


@dataclass(frozen=True, slots=True)
class CustodyStatus:
    #: dual control is on (it never goes off once on)
    active: bool
    quorum: int
    #: custodians enrolled and not removed
    custodians: int
    activated_at: str | None


class DualControlGuard:
    """Refuses direct sensitive changes while dual control is on."""

    def __init__(self, store: CustodyStore, *, quorum: int) -> None:
        self.store = store
        self.quorum = quorum

    def status(self) -> CustodyStatus:
        with self.store.read("read dual-control status") as conn:
            activated = self.store.activated_at(conn)
            count = len(self.store.custodians(conn, active_only=True))
        return CustodyStatus(
            active=activated is not None or count >= self.quorum,
            quorum=self.quorum,
            custodians=count,
            activated_at=activated,
        )

    def check_direct(self, change: str, **params: Any) -> None:
        """Raise :class:`Forbidden` if ``change`` may not be made directly now."""
        if _EXECUTING.get() is not None:
            return
        if change == "key.enabled":
            self._check_no_destruction(params)
            return
        hint = GUARDED_CHANGES.get(change)
        if hint is None:
            return
        status = self.status()
        if status.active:
            raise self.refusal(change, status.custodians, **params)

    def refusal(self, change: str, custodians: int, **params: Any) -> Forbidden:
        """The error refusing direct ``change`` while dual control is on."""
        hint = GUARDED_CHANGES.get(change, "keygate request …")
        try:
            command = hint.format(**{k: v for k, v in params.items() if isinstance(v, str)})
        except (KeyError, IndexError):
            command = "keygate request …"
        return Forbidden(
            f"dual control is on ({custodians} custodians enrolled, quorum {self.quorum}): "
            f"{change} needs {self.quorum} custodian approvals; use `{command}`"
        )

    @staticmethod
    def is_executing() -> bool:
        """Whether an approved request's execution is running in this context."""
        return _EXECUTING.get() is not None

    def _check_no_destruction(self, params: dict[str, Any]) -> None:
        tenant, purpose, version = (
            params.get("tenant"),
            params.get("purpose"),
            params.get("version"),
        )
        if not (isinstance(tenant, str) and isinstance(purpose, str) and isinstance(version, int)):
            return
        with self.store.read("read scheduled key destructions") as conn:
            pending = self.store.destructions(
                conn, statuses=("scheduled", "destroying"), version=(tenant, purpose, version)
            )
        if pending:
            d = pending[0]
            raise Forbidden(
                f"key version {tenant}/{purpose}/v{version} is scheduled for destruction by "
                f"request {d.request_id} (due {d.due_at.isoformat(timespec='seconds')}); it "
                f"stays disabled unless the destruction is cancelled: "
                f"`keygate request cancel-destruction {d.request_id}`"
            )
