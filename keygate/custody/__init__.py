"""Dual control for key custodians: M-of-N signed approvals and scheduled key destruction.

See docs/dual-control.md.  :class:`Custody` holds the use cases, :mod:`.actions` the registry of
what a request can do (:func:`register_action`), :mod:`.canonical` the exact bytes custodians
sign, :mod:`.credentials` their keys, :mod:`.guard` the gateway's check on direct changes.
"""

from keygate.custody.actions import ACTIONS, Action, ActionContext, register_action
from keygate.custody.canonical import (
    Approval,
    CustodyRequest,
    approval_message,
    request_bytes,
    request_digest,
)
from keygate.custody.credentials import (
    CustodianKey,
    Ed25519FileSigner,
    Pkcs11Signer,
    generate_ed25519_file,
    generate_pkcs11_key,
    parse_public_key,
    verify_signature,
)
from keygate.custody.guard import CustodyStatus, DualControlGuard
from keygate.custody.service import Custody, DestructionOutcome, Outcome
from keygate.custody.store import CustodianRecord, CustodyStore, DestructionRecord

__all__ = [
    "ACTIONS",
    "Action",
    "ActionContext",
    "Approval",
    "CustodianKey",
    "CustodianRecord",
    "Custody",
    "CustodyRequest",
    "CustodyStatus",
    "CustodyStore",
    "DestructionOutcome",
    "DestructionRecord",
    "DualControlGuard",
    "Ed25519FileSigner",
    "Outcome",
    "Pkcs11Signer",
    "approval_message",
    "generate_ed25519_file",
    "generate_pkcs11_key",
    "parse_public_key",
    "register_action",
    "request_bytes",
    "request_digest",
    "verify_signature",
]
