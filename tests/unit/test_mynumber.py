"""個人番号 (My Number): check digit, validation, generation, and what the check digit catches."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keygate.policy.mynumber import generate_mynumber, is_valid_mynumber, mynumber_check_digit

pytestmark = pytest.mark.unit


def reference_remainder(first11: str) -> int:
    """Σ P_n·Q_n mod 11, literally as the 総務省令 words it: P_n is the n-th digit from the right,
    Q_n = n + 1 for n ≤ 6 and n − 5 for 7 ≤ n ≤ 11."""
    total = 0
    for n in range(1, 12):
        p_n = int(first11[-n])
        q_n = n + 1 if n <= 6 else n - 5
        total += p_n * q_n
    return total % 11


def reference_check_digit(first11: str) -> int:
    remainder = reference_remainder(first11)
    return 0 if remainder <= 1 else 11 - remainder


# (first eleven digits, check digit), worked by hand with weights 6 5 4 3 2 7 6 5 4 3 2:
HAND_WORKED = [
    ("12345678901", 8),  # Σ = 212, 212 mod 11 = 3, 11 − 3 = 8: the usual example 123456789018
    ("00000000000", 0),  # Σ = 0, r = 0 ≤ 1 → 0
    ("11111111111", 8),  # Σ = 47, r = 3 → 8
    ("99999999999", 6),  # Σ = 423, r = 5 → 6
    ("98765432109", 3),  # Σ = 228, r = 8 → 3
    ("12345678970", 0),  # Σ = 231, r = 0 → 0
]

eleven_digits = st.integers(0, 10**11 - 1).map(lambda number: f"{number:011d}")
valid_numbers = st.integers(0, 2**32).map(lambda seed: generate_mynumber(random.Random(seed)))


def test_known_example_is_valid() -> None:
    """123456789018, the example used in official explanations, is valid."""
    assert mynumber_check_digit("12345678901") == 8
    assert is_valid_mynumber("123456789018")


@pytest.mark.parametrize(("first11", "check"), HAND_WORKED)
def test_hand_worked_check_digits(first11: str, check: int) -> None:
    """Check digits worked out by hand match."""
    assert mynumber_check_digit(first11) == check
    assert is_valid_mynumber(f"{first11}{check}")


@given(eleven_digits)
def test_check_digit_matches_the_statutory_wording(first11: str) -> None:
    """The implementation agrees with a literal transcription of the rule (P_n, Q_n)."""
    assert mynumber_check_digit(first11) == reference_check_digit(first11)


@given(eleven_digits)
def test_exactly_one_check_digit_is_valid(first11: str) -> None:
    """Of the ten possible twelfth digits exactly one makes a valid number."""
    valid = [d for d in "0123456789" if is_valid_mynumber(first11 + d)]
    assert valid == [str(mynumber_check_digit(first11))]


@pytest.mark.parametrize(
    "value",
    [
        "123456789010",  # wrong check digit
        "12345678901",  # 11 digits
        "1234567890180",  # 13 digits
        "１２３４５６７８９０１８",  # full-width digits
        "١٢٣٤٥٦٧٨٩٠١٨",  # Arabic-Indic digits
        "1234-5678-9018",
        "1234 5678 9018",
        " 123456789018",
        "123456789018\n",
        "",
        "12345678901x",
    ],
)
def test_rejects_malformed_strings(value: str) -> None:
    """Anything but exactly twelve ASCII digits with the right check digit is invalid."""
    assert not is_valid_mynumber(value)


@pytest.mark.parametrize("value", [123456789018, None, b"123456789018", ["123456789018"], 1.0])
def test_rejects_non_strings(value: object) -> None:
    """Numbers, bytes and other non-strings are never valid My Numbers."""
    assert not is_valid_mynumber(value)


@pytest.mark.parametrize(
    "bad", ["1234567890", "123456789012", "1234567890x", "１２３４５６７８９０１"]
)
def test_check_digit_rejects_bad_input(bad: str) -> None:
    """mynumber_check_digit takes exactly eleven ASCII digits; anything else is a ValueError."""
    with pytest.raises(ValueError, match="eleven ASCII digits"):
        mynumber_check_digit(bad)


@given(st.integers(0, 2**64))
def test_generated_numbers_are_valid_and_deterministic(seed: int) -> None:
    """generate_mynumber yields a valid twelve-digit number, the same one for the same seed."""
    number = generate_mynumber(random.Random(seed))
    assert len(number) == 12
    assert is_valid_mynumber(number)
    assert generate_mynumber(random.Random(seed)) == number


def test_generated_numbers_cover_every_check_digit() -> None:
    """Generated numbers are spread out: every check digit 0–9 occurs in a thousand of them."""
    rng = random.Random(7)
    numbers = {generate_mynumber(rng) for _ in range(1000)}
    assert len(numbers) == 1000
    assert {number[-1] for number in numbers} == set("0123456789")


# --- what the check digit detects -------------------------------------------------------------


@given(valid_numbers, st.integers(0, 11), st.integers(1, 9))
def test_single_digit_error_detection_is_exactly_characterised(
    number: str, position: int, delta: int
) -> None:
    """A one-digit change is caught unless it is in the first eleven and r moves between 0 and 1.

    This is not "every single-digit error is detected": r = 0 and r = 1 share check digit 0.
    """
    changed = number[:position] + str((int(number[position]) + delta) % 10) + number[position + 1 :]
    if position == 11:
        assert not is_valid_mynumber(changed)
        return
    r_before = reference_remainder(number[:11])
    r_after = reference_remainder(changed[:11])
    assert r_before != r_after  # every weight is non-zero mod 11 and |Δdigit| ≤ 9
    assert is_valid_mynumber(changed) == ({r_before, r_after} == {0, 1})


def test_an_undetected_single_digit_error_exists() -> None:
    """123456789700 (r = 0) and 323456789700 (r = 1) are both valid: the blind spot is real."""
    assert reference_remainder("12345678970") == 0
    assert reference_remainder("32345678970") == 1
    assert is_valid_mynumber("123456789700")
    assert is_valid_mynumber("323456789700")


@given(valid_numbers, st.integers(0, 9))
def test_adjacent_transposition_within_first_eleven_is_characterised(
    number: str, position: int
) -> None:
    """Swapping adjacent different digits among the first eleven is missed only if r moves 0 ↔ 1."""
    a, b = number[position], number[position + 1]
    if a == b:
        return
    swapped = number[:position] + b + a + number[position + 2 :]
    r_before = reference_remainder(number[:11])
    r_after = reference_remainder(swapped[:11])
    assert r_before != r_after  # adjacent weights differ by 1 or 5, both non-zero mod 11
    assert is_valid_mynumber(swapped) == ({r_before, r_after} == {0, 1})


WEIGHTS = (6, 5, 4, 3, 2, 7, 6, 5, 4, 3, 2)


def remainder_counts(excluded: set[int]) -> list[int]:
    """How many ways the first eleven digits, leaving out ``excluded`` positions, reach each
    partial sum mod 11 (exact counting by dynamic programming over residues)."""
    counts = [1] + [0] * 10
    for position, weight in enumerate(WEIGHTS):
        if position in excluded:
            continue
        new = [0] * 11
        for residue, ways in enumerate(counts):
            for digit in range(10):
                new[(residue + digit * weight) % 11] += ways
        counts = new
    return counts


def check_of(remainder: int) -> int:
    return 0 if remainder <= 1 else 11 - remainder


def test_exact_single_digit_detection_rate() -> None:
    """Over all numbers and substitutions, 1.8 % of errors in the first eleven digits go unseen."""
    for position, weight in enumerate(WEIGHTS):
        counts = remainder_counts({position})
        missed = total = 0
        for rest, ways in enumerate(counts):
            for old in range(10):
                for new in range(10):
                    if new == old:
                        continue
                    total += ways
                    before = (rest + old * weight) % 11
                    after = (rest + new * weight) % 11
                    missed += ways * (check_of(before) == check_of(after))
        rate = Fraction(missed, total)
        assert Fraction(18, 1000) < rate < Fraction(19, 1000), position


def test_exact_adjacent_transposition_detection_rates() -> None:
    """Adjacent transpositions go unseen 1.8 % of the time, 2.0 % when the check digit moves."""
    for position in range(11):
        counts = remainder_counts({position, position + 1} - {11})
        missed = total = 0
        for rest, ways in enumerate(counts):
            if position < 10:
                w1, w2 = WEIGHTS[position], WEIGHTS[position + 1]
                for a in range(10):
                    for b in range(10):
                        if a == b:
                            continue
                        total += ways
                        before = (rest + a * w1 + b * w2) % 11
                        after = (rest + b * w1 + a * w2) % 11
                        missed += ways * (check_of(before) == check_of(after))
            else:
                # The 11th digit d swaps with the check digit c: valid iff check(… c) == d.
                for d in range(10):
                    c = check_of((rest + d * WEIGHTS[10]) % 11)
                    if c == d:
                        continue
                    total += ways
                    missed += ways * (check_of((rest + c * WEIGHTS[10]) % 11) == d)
        rate = Fraction(missed, total)
        upper = Fraction(21, 1000) if position == 10 else Fraction(19, 1000)
        assert Fraction(18, 1000) < rate < upper, position
