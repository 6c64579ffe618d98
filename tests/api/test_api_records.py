"""Record endpoints over HTTP: policy-driven field encryption for resident, tax and mynumber."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from api_support import (
    CHIYODA,
    assert_problem,
    assert_slot_error,
    key_version,
    record_batch,
    record_call,
)

from keygate.policy.records import Treatment, load_policies
from keygate.testing.synthetic import SyntheticRecords

pytestmark = pytest.mark.api

POLICIES = load_policies()
GEN = SyntheticRecords(seed=4242)
SAMPLES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "resident": list(GEN.resident(12)),
    "tax": list(GEN.tax(12)),
    "mynumber": list(GEN.mynumber(12)),
}


def _check_encrypted(record_type: str, plain: dict[str, Any], enc: dict[str, Any]) -> None:
    """Encrypted fields hold kg1 ciphertexts, clear fields their value, as the policy says."""
    policy = POLICIES[record_type]
    assert set(enc) == set(plain)
    for name, value in plain.items():
        if policy.field_for(name).treatment is Treatment.CLEAR:
            assert enc[name] == value, name
        else:
            assert isinstance(enc[name], str) and enc[name].startswith("kg1."), name
            assert key_version(enc[name]) >= 1


@pytest.mark.parametrize("record_type", ["resident", "tax", "mynumber"])
def test_record_round_trip(full: httpx.Client, record_type: str) -> None:
    """A synthetic record encrypts field by field per its policy and decrypts back to itself,
    JSON types included."""
    record_id, record = SAMPLES[record_type][0]
    r = record_call(full, record_type, "encrypt", record_id, record)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"record"}
    enc = r.json()["record"]
    _check_encrypted(record_type, record, enc)

    r = record_call(full, record_type, "decrypt", record_id, enc)
    assert r.status_code == 200, r.text
    out = r.json()["record"]
    assert out == record
    assert {k: type(v) for k, v in out.items()} == {k: type(v) for k, v in record.items()}


@pytest.mark.parametrize("record_type", ["resident", "tax", "mynumber"])
def test_record_batch_round_trip(full: httpx.Client, record_type: str) -> None:
    """Record batches encrypt and decrypt many records in request order."""
    items = SAMPLES[record_type]
    r = record_batch(full, record_type, "encrypt", items)
    assert r.status_code == 200, r.text
    out = r.json()["items"]
    assert len(out) == len(items)
    for (_, plain), slot in zip(items, out, strict=True):
        assert set(slot) == {"record"}
        _check_encrypted(record_type, plain, slot["record"])

    enc_items = [(rid, slot["record"]) for (rid, _), slot in zip(items, out, strict=True)]
    r = record_batch(full, record_type, "decrypt", enc_items)
    assert r.status_code == 200, r.text
    assert [slot["record"] for slot in r.json()["items"]] == [rec for _, rec in items]


def test_tax_integers_come_back_as_integers(full: httpx.Client) -> None:
    """Integer amounts of a tax record are restored as JSON integers, not strings."""
    record_id, record = SAMPLES["tax"][1]
    enc = record_call(full, "tax", "encrypt", record_id, record).json()["record"]
    assert isinstance(enc["所得金額"], str)
    out = record_call(full, "tax", "decrypt", record_id, enc).json()["record"]
    assert isinstance(out["所得金額"], int) and not isinstance(out["所得金額"], bool)
    assert out["所得金額"] == record["所得金額"]
    assert out["課税年度"] == record["課税年度"]


def test_json_scalar_types_restored(full: httpx.Client) -> None:
    """int, float, bool, null and str field values each come back with their JSON type."""
    record = {
        "name": "佐藤 花子",
        "count": 3,
        "flag": True,
        "ratio": 0.25,
        "note": None,
        "group": "g1",
    }
    enc = record_call(full, "typed", "encrypt", "X-1", record).json()["record"]
    for name in ("name", "count", "flag", "ratio", "note"):
        assert isinstance(enc[name], str) and enc[name].startswith("kg1."), name
    assert enc["group"] == "g1"
    out = record_call(full, "typed", "decrypt", "X-1", enc).json()["record"]
    assert out == record
    assert out["flag"] is True and out["note"] is None
    assert type(out["count"]) is int and type(out["ratio"]) is float


def test_resident_null_optional_field_round_trips(full: httpx.Client) -> None:
    """A null in an optional encrypted field of a resident record comes back as null."""
    record_id, record = SAMPLES["resident"][2]
    record = {**record, "本籍": None}
    enc = record_call(full, "resident", "encrypt", record_id, record).json()["record"]
    assert enc["本籍"] != None  # noqa: E711 - a ciphertext, not JSON null
    out = record_call(full, "resident", "decrypt", record_id, enc).json()["record"]
    assert out["本籍"] is None


def test_api_md_record_example(full: httpx.Client) -> None:
    """The API.md record example encrypts 氏名 and 個人番号 and leaves 世帯番号 clear."""
    record = {"氏名": "山田 太郎", "個人番号": "123456789018", "世帯番号": "H-0042"}
    r = record_call(full, "resident", "encrypt", "R-000123", record)
    assert r.status_code == 200, r.text
    enc = r.json()["record"]
    assert enc["氏名"].startswith("kg1") and enc["個人番号"].startswith("kg1")
    assert enc["世帯番号"] == "H-0042"
    r = record_call(full, "resident", "decrypt", "R-000123", enc)
    assert r.json() == {"record": record}


def test_record_field_bound_to_record_id_and_field(full: httpx.Client) -> None:
    """An encrypted field does not decrypt under another record_id or in another field."""
    record_id, record = SAMPLES["resident"][3]
    enc = record_call(full, "resident", "encrypt", record_id, record).json()["record"]
    r = record_call(full, "resident", "decrypt", "R-999999", enc)
    assert_problem(r, 422, "DECRYPTION_FAILED")
    swapped = {**enc, "氏名": enc["住所"], "住所": enc["氏名"]}
    r = record_call(full, "resident", "decrypt", record_id, swapped)
    assert_problem(r, 422, "DECRYPTION_FAILED")


def test_limited_reader_gets_other_purposes_still_encrypted(
    full: httpx.Client, reader: httpx.Client
) -> None:
    """A caller without the mynumber purpose reads a record but 個人番号 stays encrypted."""
    record_id, record = SAMPLES["resident"][4]
    enc = record_call(full, "resident", "encrypt", record_id, record).json()["record"]
    r = record_call(reader, "resident", "decrypt", record_id, enc)
    assert r.status_code == 200, r.text
    out = r.json()["record"]
    assert out["個人番号"] == enc["個人番号"]
    assert out["個人番号"] != record["個人番号"]
    for name, value in record.items():
        if name != "個人番号":
            assert out[name] == value, name

    # The same for a tax record, in a batch.
    tax_id, tax = SAMPLES["tax"][4]
    tax_enc = record_call(full, "tax", "encrypt", tax_id, tax).json()["record"]
    r = record_batch(reader, "tax", "decrypt", [(tax_id, tax_enc)])
    out = r.json()["items"][0]["record"]
    assert out["個人番号"] == tax_enc["個人番号"]
    assert out["所得金額"] == tax["所得金額"]


def test_record_batch_one_bad_record(full: httpx.Client) -> None:
    """A record failing validation gets an error slot; the others in the batch succeed."""
    items = SAMPLES["mynumber"][:3]
    bad = (items[1][0], {**items[1][1], "個人番号": "123456789010"})
    r = record_batch(full, "mynumber", "encrypt", [items[0], bad, items[2]])
    assert r.status_code == 200, r.text
    out = r.json()["items"]
    assert set(out[0]) == {"record"} and set(out[2]) == {"record"}
    err = assert_slot_error(out[1], 422, "VALIDATION_FAILED")
    assert "個人番号" in err["detail"]
    assert "123456789010" not in err["detail"]


def test_record_round_trip_for_tenant_slug(star: httpx.Client) -> None:
    """Record endpoints accept a central organisation's slug as tenant."""
    record_id, record = SAMPLES["mynumber"][5]
    enc = record_call(star, "mynumber", "encrypt", record_id, record, tenant="digital-agency")
    assert enc.status_code == 200, enc.text
    r = record_call(star, "mynumber", "decrypt", record_id, enc.json()["record"], tenant=CHIYODA)
    assert_problem(r, 422, "DECRYPTION_FAILED")
    r = record_call(
        star, "mynumber", "decrypt", record_id, enc.json()["record"], tenant="digital-agency"
    )
    assert r.json()["record"] == record
