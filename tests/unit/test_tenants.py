"""Tenant names: 全国地方公共団体コード check digits and central-organisation slugs."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keygate.core.errors import InvalidTenant
from keygate.policy.tenants import TenantKind, is_valid_lgcode, lg_check_digit, validate_tenant

pytestmark = pytest.mark.unit

# Real 全国地方公共団体コード.  Every row was compared with the open data set
# code4fukui/localgovjp (localgovjp-utf8.csv and prefjp-utf8.csv, compiled from J-LIS and GSI
# data), which lists each code next to the municipality's name; the check digit is then verified
# below by the algorithm.
REAL_CODES = [
    ("010006", "北海道"),
    ("011002", "札幌市"),
    ("011011", "札幌市中央区"),
    ("012025", "函館市"),
    ("020001", "青森県"),
    ("130001", "東京都"),
    ("131016", "千代田区"),
    ("131024", "中央区"),
    ("131032", "港区"),
    ("131041", "新宿区"),
    ("131121", "世田谷区"),
    ("131130", "渋谷区"),
    ("131237", "江戸川区"),
    ("132012", "八王子市"),
    ("141003", "横浜市"),
    ("141305", "川崎市"),
    ("141500", "相模原市"),
    ("151009", "新潟市"),
    ("270008", "大阪府"),
    ("272035", "豊中市"),
    ("280003", "兵庫県"),
    ("281000", "神戸市"),
    ("282014", "姫路市"),
    ("292010", "奈良市"),
    ("302015", "和歌山市"),
    ("330001", "岡山県"),
    ("470007", "沖縄県"),
    ("472018", "那覇市"),
]


def reference_check_digit(first5: str) -> int:
    """The 総務省 rule written out step by step, independently of the implementation."""
    weights = [6, 5, 4, 3, 2]
    total = 0
    for position in range(5):
        total += int(first5[position]) * weights[position]
    remainder = total % 11
    return (11 - remainder) % 10


@pytest.mark.parametrize(("code", "name"), REAL_CODES, ids=[name for _, name in REAL_CODES])
def test_real_codes_are_valid_lgcodes(code: str, name: str) -> None:
    """Each real local government code validates as an LG code and its check digit matches."""
    assert validate_tenant(code) is TenantKind.LGCODE
    assert is_valid_lgcode(code)
    assert lg_check_digit(code[:5]) == int(code[5])


def test_check_digit_worked_example() -> None:
    """131016 (千代田区): 1·6 + 3·5 + 1·4 + 0·3 + 1·2 = 27, 27 mod 11 = 5, (11 − 5) mod 10 = 6."""
    assert lg_check_digit("13101") == 6


def test_check_digit_matches_the_rule_for_every_prefix() -> None:
    """lg_check_digit agrees with the written-out rule on all 100,000 five-digit prefixes."""
    for number in range(100_000):
        first5 = f"{number:05d}"
        assert lg_check_digit(first5) == reference_check_digit(first5), first5


def test_check_digit_verifies_format_not_existence() -> None:
    """那覇市 is 472018; 471003 has a valid check digit but no such city exists (format only)."""
    assert validate_tenant("472018") is TenantKind.LGCODE
    # The check digit cannot know which codes exist: 471003 passes the format checks.
    assert is_valid_lgcode("471003")


@pytest.mark.parametrize(("code", "name"), REAL_CODES, ids=[name for _, name in REAL_CODES])
def test_single_digit_errors_in_real_codes(code: str, name: str) -> None:
    """Every single-digit change to a real code is rejected, except where the rule cannot see it."""
    for position in range(6):
        for digit in "0123456789":
            if digit == code[position]:
                continue
            mutant = code[:position] + digit + code[position + 1 :]
            expected = (
                position < 5
                and 1 <= int(mutant[:2]) <= 47
                and reference_check_digit(mutant[:5]) == int(mutant[5])
            )
            assert is_valid_lgcode(mutant) is expected, mutant
            if position == 5:
                assert not expected  # a changed check digit is always caught


def test_known_blind_spot_of_the_check_digit() -> None:
    """r = 0 and r = 10 share check digit 1: 東京都 130001 and 岡山県 330001 differ by one digit."""
    assert is_valid_lgcode("130001")
    assert is_valid_lgcode("330001")


@given(st.integers(min_value=0, max_value=99_999), st.integers(0, 4), st.integers(1, 9))
def test_single_digit_error_is_missed_only_between_residues_0_and_10(
    number: int, position: int, delta: int
) -> None:
    """A changed digit among the first five keeps the check digit only if r moves 0 ↔ 10."""
    first5 = f"{number:05d}"
    changed = first5[:position] + str((int(first5[position]) + delta) % 10) + first5[position + 1 :]
    weights = (6, 5, 4, 3, 2)
    r_before = sum(int(d) * w for d, w in zip(first5, weights, strict=True)) % 11
    r_after = sum(int(d) * w for d, w in zip(changed, weights, strict=True)) % 11
    assert r_before != r_after  # weights are non-zero mod 11 and |Δdigit| < 11
    same_check = lg_check_digit(first5) == lg_check_digit(changed)
    assert same_check == ({r_before, r_after} == {0, 10})


@pytest.mark.parametrize(
    "value",
    [
        "131017",  # wrong check digit
        "131010",
        "13101",  # five digits (JIS X 0402 without check digit)
        "1310160",
        "000001",  # prefecture 00 (the check digit would be right)
        "481009",  # prefecture 48
        "990006",
    ],
)
def test_rejects_malformed_lgcodes(value: str) -> None:
    """Digit strings that are not well-formed LG codes raise InvalidTenant."""
    with pytest.raises(InvalidTenant) as info:
        validate_tenant(value)
    assert info.value.code == "INVALID_TENANT"
    assert not is_valid_lgcode(value)


@pytest.mark.parametrize(
    "value",
    ["ab", "a1", "digital-agency", "soumu-2024", "mhlw", "a-b-c", "x" * 63, "z9"],
)
def test_accepts_slugs(value: str) -> None:
    """Well-formed slugs are accepted as SLUG tenants."""
    assert validate_tenant(value) is TenantKind.SLUG


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("a", "neither"),  # too short
        ("x" * 64, "longer than 63"),
        ("-ab", "neither"),
        ("1ab", "neither"),
        ("Ab", "neither"),
        ("ab-", "end with a hyphen"),
        ("a--b", "two hyphens"),
        ("a_b", "neither"),
        ("a.b", "neither"),
        ("ab/cd", "neither"),
        (" ab", "neither"),
        ("ab ", "neither"),
        ("ab\n", "neither"),
        ("\t131016", "neither"),
        ("131016\n", "neither"),
        ("", "empty"),
    ],
)
def test_rejects_bad_slugs_naming_the_rule(value: str, rule: str) -> None:
    """Malformed slugs raise InvalidTenant whose message names the rule broken."""
    with pytest.raises(InvalidTenant) as info:
        validate_tenant(value)
    assert rule in info.value.detail


@pytest.mark.parametrize(
    "value",
    [
        "１３１０１６",  # full-width digits
        "١٣١٠١٦",  # Arabic-Indic digits (str.isdigit() is True)
        "ａｂ",  # full-width letters
        "аb",  # Cyrillic а
        "ab\u200b",  # zero-width space
        "ab\x00",
        "\x00",
        "ab\u3000",  # ideographic space
        "ｍｈｌｗ",
    ],
)
def test_rejects_lookalikes_and_control_characters_without_echo(value: str) -> None:
    """Unicode look-alikes, full-width digits and NUL are rejected and never echoed."""
    with pytest.raises(InvalidTenant) as info:
        validate_tenant(value)
    assert value not in info.value.detail
    assert info.value.detail.isascii()


@pytest.mark.parametrize("value", [None, 131016, 13.1016, b"131016", ["131016"], {"t": 1}, True])
def test_rejects_non_strings(value: object) -> None:
    """Values that are not strings raise InvalidTenant naming the type, not the value."""
    with pytest.raises(InvalidTenant) as info:
        validate_tenant(value)
    assert "must be a string" in info.value.detail


def test_very_long_input_is_rejected_without_echo() -> None:
    """A megabyte of input is rejected quickly and the message stays short."""
    value = "a" * 1_000_000
    with pytest.raises(InvalidTenant) as info:
        validate_tenant(value)
    assert len(info.value.detail) < 100


def test_short_printable_ascii_is_echoed() -> None:
    """A short printable ASCII value is echoed to help the caller find the typo."""
    with pytest.raises(InvalidTenant) as info:
        validate_tenant("131017")
    assert "'131017'" in info.value.detail


@pytest.mark.parametrize("value", ["123456789018", "1234-5678-9018", "12345678901"])
def test_numbers_that_may_be_personal_data_are_not_echoed(value: str) -> None:
    """A My Number or 住民票コード sent as a tenant by mistake never appears in the message."""
    with pytest.raises(InvalidTenant) as info:
        validate_tenant(value)
    assert value not in info.value.detail
    assert "1234" not in info.value.detail


@given(st.text(max_size=80))
def test_arbitrary_text_either_validates_or_raises_invalid_tenant(value: str) -> None:
    """Any string yields a tenant kind consistent with its format, or InvalidTenant."""
    try:
        kind = validate_tenant(value)
    except InvalidTenant as exc:
        assert exc.detail.isascii()
        return
    if kind is TenantKind.LGCODE:
        assert re.fullmatch(r"[0-9]{6}", value)
    else:
        assert re.fullmatch(r"[a-z][a-z0-9-]{1,62}", value)


@given(st.from_regex(r"[a-z][a-z0-9-]{1,62}", fullmatch=True))
def test_slug_pattern_with_hyphen_rules(value: str) -> None:
    """A pattern-shaped slug is valid exactly when it has no trailing and no doubled hyphen."""
    expected = not value.endswith("-") and "--" not in value
    try:
        validate_tenant(value)
    except InvalidTenant:
        assert not expected
    else:
        assert expected


@pytest.mark.parametrize("bad", ["1234", "123456", "１２３４５", "1234a", ""])
def test_lg_check_digit_rejects_bad_prefixes(bad: str) -> None:
    """lg_check_digit is for five ASCII digits only; anything else is a ValueError."""
    with pytest.raises(ValueError, match="five ASCII digits"):
        lg_check_digit(bad)
