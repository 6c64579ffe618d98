"""Tenant isolation, adversarially: a caller of tenant B (大阪市) attacks tenant A (千代田区)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from api_support import (
    CHIYODA,
    OSAKA,
    ApiEnv,
    assert_problem,
    assert_slot_error,
    batch,
    ciphertext_of,
    decrypt,
    record_batch,
    record_call,
    rewrite_tenant,
)

from keygate.testing.synthetic import SyntheticRecords

pytestmark = pytest.mark.api

SECRET = "千代田区の秘密"
CONTEXT = {"record_id": "R-000001", "field": "氏名"}
RECORD_ID, RECORD = next(SyntheticRecords(seed=99).resident(1))


@pytest.fixture(scope="module")
def chiyoda_ct(api: ApiEnv) -> str:
    """A ciphertext of tenant A made by A's own application."""
    return ciphertext_of(api.clients["full"], SECRET, context=CONTEXT)


@pytest.fixture(scope="module")
def chiyoda_record(api: ApiEnv) -> dict[str, Any]:
    """An encrypted resident record of tenant A."""
    r = record_call(api.clients["full"], "resident", "encrypt", RECORD_ID, RECORD)
    assert r.status_code == 200, r.text
    return dict(r.json()["record"])


def test_claiming_tenant_a_is_forbidden(osaka: httpx.Client, chiyoda_ct: str) -> None:
    """Claiming tenant A is 403 on every operation."""
    assert_problem(decrypt(osaka, chiyoda_ct, tenant=CHIYODA, context=CONTEXT), 403, "FORBIDDEN")
    items = [{"context": CONTEXT, "ciphertext": chiyoda_ct}]
    assert_problem(batch(osaka, "decrypt", items, tenant=CHIYODA), 403, "FORBIDDEN")
    r = batch(osaka, "rewrap", [{"ciphertext": chiyoda_ct}], tenant=CHIYODA)
    assert_problem(r, 403, "FORBIDDEN")


@pytest.mark.parametrize("purpose", ["resident", "tax", "mynumber"])
def test_claiming_own_tenant_fails_opaquely(
    osaka: httpx.Client, chiyoda_ct: str, purpose: str
) -> None:
    """Presenting A's ciphertext as B's own is 422 DECRYPTION_FAILED, whatever the purpose."""
    r = decrypt(osaka, chiyoda_ct, tenant=OSAKA, purpose=purpose, context=CONTEXT)
    assert_problem(r, 422, "DECRYPTION_FAILED")
    r = batch(osaka, "decrypt", [{"context": CONTEXT, "ciphertext": chiyoda_ct}], tenant=OSAKA)
    assert_slot_error(r.json()["items"][0], 422, "DECRYPTION_FAILED")


def test_rewritten_tenant_in_header_fails(osaka: httpx.Client, chiyoda_ct: str) -> None:
    """A's ciphertext with the tenant inside its envelope header rewritten to B is 422."""
    forged = rewrite_tenant(chiyoda_ct, CHIYODA, OSAKA)
    assert forged != chiyoda_ct
    r = decrypt(osaka, forged, tenant=OSAKA, context=CONTEXT)
    assert_problem(r, 422, "DECRYPTION_FAILED")
    r = batch(osaka, "decrypt", [{"context": CONTEXT, "ciphertext": forged}], tenant=OSAKA)
    assert_slot_error(r.json()["items"][0], 422, "DECRYPTION_FAILED")
    r = batch(osaka, "rewrap", [{"ciphertext": forged}], tenant=OSAKA)
    assert r.status_code == 200
    assert_slot_error(r.json()["items"][0], 422, "DECRYPTION_FAILED")


def test_rewrap_under_own_tenant_fails(osaka: httpx.Client, chiyoda_ct: str) -> None:
    """Rewrapping A's ciphertext under B's key gives an error slot, never a B ciphertext."""
    r = batch(osaka, "rewrap", [{"ciphertext": chiyoda_ct}], tenant=OSAKA)
    assert r.status_code == 200, r.text
    assert_slot_error(r.json()["items"][0], 422, "DECRYPTION_FAILED")
    for purpose in ("tax", "mynumber"):
        r = batch(osaka, "rewrap", [{"ciphertext": chiyoda_ct}], tenant=OSAKA, purpose=purpose)
        assert_slot_error(r.json()["items"][0], 422, "DECRYPTION_FAILED")


def test_record_claiming_tenant_a_is_forbidden(
    osaka: httpx.Client, chiyoda_record: dict[str, Any]
) -> None:
    """Record decrypt claiming tenant A is 403, single and batch."""
    r = record_call(osaka, "resident", "decrypt", RECORD_ID, chiyoda_record, tenant=CHIYODA)
    assert_problem(r, 403, "FORBIDDEN")
    r = record_batch(osaka, "resident", "decrypt", [(RECORD_ID, chiyoda_record)], tenant=CHIYODA)
    assert_problem(r, 403, "FORBIDDEN")


def test_record_claiming_own_tenant_fails(
    osaka: httpx.Client, chiyoda_record: dict[str, Any]
) -> None:
    """Record decrypt of A's record claiming B is 422 (error slot in a batch)."""
    r = record_call(osaka, "resident", "decrypt", RECORD_ID, chiyoda_record, tenant=OSAKA)
    problem = assert_problem(r, 422, "DECRYPTION_FAILED")
    for value in RECORD.values():
        assert str(value) not in problem["detail"]
    r = record_batch(osaka, "resident", "decrypt", [(RECORD_ID, chiyoda_record)], tenant=OSAKA)
    assert r.status_code == 200
    assert_slot_error(r.json()["items"][0], 422, "DECRYPTION_FAILED")


def test_record_with_rewritten_headers_fails(
    osaka: httpx.Client, chiyoda_record: dict[str, Any]
) -> None:
    """A's record with every field's envelope header rewritten to tenant B is 422."""
    forged = {
        k: rewrite_tenant(v, CHIYODA, OSAKA) if isinstance(v, str) and v.startswith("kg1.") else v
        for k, v in chiyoda_record.items()
    }
    r = record_call(osaka, "resident", "decrypt", RECORD_ID, forged, tenant=OSAKA)
    assert_problem(r, 422, "DECRYPTION_FAILED")
    # One field at a time, too: no field may open.
    for name, value in chiyoda_record.items():
        if isinstance(value, str) and value.startswith("kg1."):
            single = {name: rewrite_tenant(value, CHIYODA, OSAKA)}
            r = record_call(osaka, "resident", "decrypt", RECORD_ID, single, tenant=OSAKA)
            assert_problem(r, 422, "DECRYPTION_FAILED")


def test_any_tenant_caller_still_bound_by_ciphertext_tenant(
    star: httpx.Client, chiyoda_ct: str
) -> None:
    """Even a caller allowed every tenant cannot open A's ciphertext under B's name."""
    r = decrypt(star, chiyoda_ct, tenant=OSAKA, context=CONTEXT)
    assert_problem(r, 422, "DECRYPTION_FAILED")
    forged = rewrite_tenant(chiyoda_ct, CHIYODA, OSAKA)
    assert_problem(decrypt(star, forged, tenant=OSAKA, context=CONTEXT), 422, "DECRYPTION_FAILED")
    assert decrypt(star, chiyoda_ct, tenant=CHIYODA, context=CONTEXT).status_code == 200


def test_b_ciphertext_cannot_be_passed_off_as_a(full: httpx.Client, osaka: httpx.Client) -> None:
    """The reverse direction holds too: B's ciphertext does not open as A's."""
    ct = ciphertext_of(osaka, "大阪市の秘密", tenant=OSAKA, context=CONTEXT)
    assert_problem(decrypt(full, ct, context=CONTEXT), 422, "DECRYPTION_FAILED")
    forged = rewrite_tenant(ct, OSAKA, CHIYODA)
    assert_problem(decrypt(full, forged, context=CONTEXT), 422, "DECRYPTION_FAILED")
