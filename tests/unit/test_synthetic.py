"""The synthetic Japanese record generator: valid under the policies, consistent, deterministic."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import date

import pytest
from faker.providers.person.ja_JP import Provider as FakerPerson

from keygate.policy.mynumber import is_valid_mynumber
from keygate.policy.records import DEFAULT_POLICIES_DIR, load_policies
from keygate.policy.tenants import is_valid_lgcode
from keygate.testing.synthetic import _MUNICIPALITIES, REFERENCE_DATE, SyntheticRecords

pytestmark = pytest.mark.unit

POLICIES = load_policies(DEFAULT_POLICIES_DIR)
N = 1000

LAST_PAIRS = {(kanji, kana) for kanji, kana, _ in FakerPerson.last_name_pairs}
FIRST_PAIRS = {
    (kanji, kana)
    for kanji, kana, _ in FakerPerson.first_name_male_pairs + FakerPerson.first_name_female_pairs
}
MUNICIPALITY_BY_CODE = {
    code: (pref, city, prefixes) for pref, city, code, prefixes in _MUNICIPALITIES
}


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


@pytest.mark.parametrize("record_type", ["resident", "tax", "mynumber"])
def test_records_validate_under_their_policy(record_type: str) -> None:
    """A thousand records of each type validate under the shipped policy of that type."""
    policy = POLICIES[record_type]
    records = list(getattr(SyntheticRecords(seed=3), record_type)(N))
    assert len(records) == N
    prefix = {"resident": "R", "tax": "T", "mynumber": "M"}[record_type]
    assert [record_id for record_id, _ in records[:2]] == [f"{prefix}-000001", f"{prefix}-000002"]
    assert len({record_id for record_id, _ in records}) == N
    for _, record in records:
        policy.validate(record)


@pytest.mark.parametrize("record_type", ["resident", "tax", "mynumber"])
def test_same_seed_same_records(record_type: str) -> None:
    """The same seed gives the same records; another seed gives others."""
    first = list(getattr(SyntheticRecords(seed=42), record_type)(200))
    again = list(getattr(SyntheticRecords(seed=42), record_type)(200))
    other = list(getattr(SyntheticRecords(seed=43), record_type)(200))
    assert first == again
    assert first != other


def test_output_does_not_depend_on_earlier_calls() -> None:
    """Each method restarts its own streams, so call order does not change the output."""
    generator = SyntheticRecords(seed=5)
    list(generator.tax(50))
    list(generator.opaque_values(10, 16))
    assert list(generator.resident(100)) == list(SyntheticRecords(seed=5).resident(100))
    assert list(generator.resident(100)) == list(generator.resident(100))


def test_default_seed_is_zero() -> None:
    """SyntheticRecords() is SyntheticRecords(seed=0)."""
    assert list(SyntheticRecords().mynumber(20)) == list(SyntheticRecords(0).mynumber(20))


def test_kanji_and_kana_names_correspond() -> None:
    """氏名 and 氏名カナ are the same person's name: both halves are Faker kanji/kana pairs."""
    for _, record in SyntheticRecords(seed=1).resident(N):
        last, first = str(record["氏名"]).split(" ")
        last_kana, first_kana = str(record["氏名カナ"]).split(" ")
        assert (last, last_kana) in LAST_PAIRS
        assert (first, first_kana) in FIRST_PAIRS


def test_my_numbers_are_valid_and_unique() -> None:
    """My Numbers are valid and never repeat within one generator; so are 住民票コード unique."""
    records = [record for _, record in SyntheticRecords(seed=9).resident(20_000)]
    numbers = [record["個人番号"] for record in records]
    assert all(is_valid_mynumber(number) for number in numbers[:2000])
    assert len(set(numbers)) == len(numbers)
    codes = [record["住民票コード"] for record in records]
    assert len(set(codes)) == len(codes)


def test_addresses_match_their_municipality() -> None:
    """住所 starts with the 都道府県 and 市区町村 of 市区町村コード; 郵便番号 uses its prefixes."""
    for code in MUNICIPALITY_BY_CODE:
        assert is_valid_lgcode(code)
    for _, record in SyntheticRecords(seed=2).resident(N):
        prefecture, city, prefixes = MUNICIPALITY_BY_CODE[str(record["市区町村コード"])]
        assert str(record["住所"]).startswith(prefecture + city)
        assert str(record["郵便番号"])[:3] in prefixes
        assert "丁目" in str(record["住所"])


def test_households_are_consistent() -> None:
    """Members of a 世帯 share surname, address and head; each has exactly one 世帯主."""
    households: defaultdict[object, list[Mapping[str, object]]] = defaultdict(list)
    for _, record in SyntheticRecords(seed=4).resident(N):
        households[record["世帯番号"]].append(record)
    assert len(households) < N  # some households have several members
    for members in households.values():
        heads = [m for m in members if m["続柄"] == "世帯主"]
        assert len(heads) == 1
        assert {m["住所"] for m in members} == {heads[0]["住所"]}
        assert {m["世帯主氏名"] for m in members} == {heads[0]["氏名"]}
        assert {str(m["氏名"]).split(" ")[0] for m in members} == {
            str(heads[0]["氏名"]).split(" ")[0]
        }
        assert {m["続柄"] for m in members} <= {"世帯主", "妻", "夫", "子"}


def test_dates_are_plausible() -> None:
    """Births precede moving in, and everything happens on or before the reference date."""
    sexes: Counter[object] = Counter()
    for _, record in SyntheticRecords(seed=6).resident(N):
        birth = date.fromisoformat(str(record["生年月日"]))
        moved_in = date.fromisoformat(str(record["住民となった年月日"]))
        changed = date.fromisoformat(str(record["異動年月日"]))
        assert birth <= moved_in <= changed <= REFERENCE_DATE
        assert 0 <= age_on(birth, REFERENCE_DATE) <= 100
        if record["異動事由"] == "出生":
            assert moved_in == birth
        sexes[record["性別"]] += 1
    assert set(sexes) == {"男", "女"}


def test_card_expiry_is_a_birthday_after_issue() -> None:
    """有効期限 is the 10th (adults) or 5th (minors) birthday after 交付年月日."""
    cards = 0
    for _, record in SyntheticRecords(seed=8).mynumber(N):
        if "交付年月日" not in record:
            continue
        cards += 1
        birth = date.fromisoformat(str(record["生年月日"]))
        issued = date.fromisoformat(str(record["交付年月日"]))
        expires = date.fromisoformat(str(record["有効期限"]))
        assert date(2016, 1, 1) <= issued <= REFERENCE_DATE
        assert issued >= birth
        years = 10 if age_on(birth, issued) >= 18 else 5
        assert expires.year - issued.year in (years - 1, years)
        if (birth.month, birth.day) != (2, 29):
            assert (expires.month, expires.day) == (birth.month, birth.day)
        assert expires > issued
    assert 0.7 * N < cards < 0.9 * N


def test_tax_records_are_adults_with_consistent_amounts() -> None:
    """Tax records are for adults; 非課税 means no tax, and 課税 amounts include the 均等割."""
    statuses: Counter[object] = Counter()
    birth_by_mynumber = {
        record["個人番号"]: date.fromisoformat(str(record["生年月日"]))
        for _, record in SyntheticRecords(seed=10).resident(3 * N)
    }
    for _, record in SyntheticRecords(seed=10).tax(N):
        assert age_on(birth_by_mynumber[record["個人番号"]], REFERENCE_DATE) >= 18
        income, taxable = record["所得金額"], record["課税標準額"]
        city, prefecture = record["市町村民税額"], record["道府県民税額"]
        assert isinstance(income, int) and isinstance(taxable, int)
        assert isinstance(city, int) and isinstance(prefecture, int)
        assert 0 <= taxable <= income
        statuses[record["課税区分"]] += 1
        if record["課税区分"] == "非課税":
            assert city == prefecture == 0
        else:
            assert city >= 3_000 and prefecture >= 1_000
            assert city % 100 == 0 and prefecture % 100 == 0
            assert prefecture <= city
        assert record["課税年度"] == REFERENCE_DATE.year
    assert statuses["課税"] > statuses["非課税"] > 0


def test_same_person_across_record_types() -> None:
    """Person i has the same 個人番号 and 氏名 in resident and mynumber output."""
    generator = SyntheticRecords(seed=11)
    pairs = zip(generator.resident(100), generator.mynumber(100), strict=True)
    for (_, resident), (_, card) in pairs:
        assert resident["個人番号"] == card["個人番号"]
        assert resident["氏名"] == card["氏名"]


def test_opaque_values() -> None:
    """opaque_values yields n distinct byte strings of the requested size, deterministically."""
    values = list(SyntheticRecords(seed=1).opaque_values(100, 1024))
    assert len(values) == 100
    assert all(len(v) == 1024 for v in values)
    assert len(set(values)) == 100
    assert values == list(SyntheticRecords(seed=1).opaque_values(100, 1024))
    assert list(SyntheticRecords(seed=1).opaque_values(3, 0)) == [b"", b"", b""]


@pytest.mark.parametrize("method", ["resident", "tax", "mynumber"])
def test_negative_counts_are_refused(method: str) -> None:
    """A negative record count is a ValueError, not an empty or endless stream."""
    with pytest.raises(ValueError, match="n must be"):
        list(getattr(SyntheticRecords(), method)(-1))
    with pytest.raises(ValueError, match="size must be"):
        list(SyntheticRecords().opaque_values(1, -1))


def test_generation_is_fast() -> None:
    """20,000 resident records take well under the time budget (100k in a few seconds)."""
    start = time.perf_counter()
    count = sum(1 for _ in SyntheticRecords(seed=12).resident(20_000))
    assert count == 20_000
    assert time.perf_counter() - start < 10
