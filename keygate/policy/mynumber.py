"""個人番号 (My Number): the check digit, validation, and valid numbers for synthetic data.

A My Number is twelve digits: eleven digits and a check digit.  The check digit (検査用数字) is
defined under 行政手続における特定の個人を識別するための番号の利用等に関する法律施行令 by the
総務省令 on 個人番号とすべき番号の生成 (平成26年総務省令第85号)::

    P_n   the n-th digit of the first eleven, counted from the right (n = 1 … 11)
    Q_n   n + 1 for 1 ≤ n ≤ 6,  n − 5 for 7 ≤ n ≤ 11
    r     = (Σ P_n · Q_n) mod 11
    check = 0 if r ≤ 1, else 11 − r

Read left to right the weights are 6 5 4 3 2 7 6 5 4 3 2.  ``123456789018`` is the usual example.

What the check digit does and does not catch (exact figures, see tests/unit/test_mynumber.py):

- Any change to the check digit itself is caught.
- A change to one of the first eleven digits always changes r (every weight is non-zero mod 11
  and a digit changes by at most 9), but r = 0 and r = 1 share check digit 0, so the change goes
  unnoticed exactly when r moves between 0 and 1: about 1.8 % of such typos
  (``123456789700`` and ``323456789700`` are both valid).
- Swapping two adjacent different digits is missed for the same reason about 1.8 % of the time
  (about 2.0 % when the check digit is one of the two).
"""

from __future__ import annotations

import random
import re
from operator import mul
from typing import Final

__all__ = [
    "MYNUMBER_LEN",
    "generate_mynumber",
    "is_valid_mynumber",
    "mynumber_check_digit",
]

#: digits in a My Number, check digit included
MYNUMBER_LEN: Final = 12

#: Q_n for the first eleven digits read left to right (n = 11 … 1)
_WEIGHTS: Final = (6, 5, 4, 3, 2, 7, 6, 5, 4, 3, 2)
_ELEVEN_DIGITS = re.compile(r"[0-9]{11}")
_TWELVE_DIGITS = re.compile(r"[0-9]{12}")


#: Σ Q_n · ord("0"): subtracted once instead of converting each ASCII digit to int
_ZERO_OFFSET: Final = ord("0") * sum(_WEIGHTS)


def _check_digit(digits: str) -> int:
    """The check digit for the first eleven of ``digits``, which must be ASCII digits."""
    weighted: int = sum(map(mul, digits[:11].encode("ascii"), _WEIGHTS)) - _ZERO_OFFSET
    remainder = weighted % 11
    return 0 if remainder <= 1 else 11 - remainder


def mynumber_check_digit(first11: str) -> int:
    """The check digit of the My Number whose first eleven digits are ``first11``.

    Raises :class:`ValueError` unless ``first11`` is exactly eleven ASCII digits, and
    :class:`TypeError` if it is not a string: programmer errors, since untrusted input goes
    through :func:`is_valid_mynumber`.
    """
    if _ELEVEN_DIGITS.fullmatch(first11) is None:
        raise ValueError("first11 must be exactly eleven ASCII digits")
    return _check_digit(first11)


def is_valid_mynumber(value: object) -> bool:
    """Whether ``value`` is a string of exactly twelve ASCII digits with a valid check digit."""
    return (
        isinstance(value, str)
        and _TWELVE_DIGITS.fullmatch(value) is not None
        and _check_digit(value) == int(value[11])
    )


def generate_mynumber(rng: random.Random) -> str:
    """A uniformly random twelve-digit number with a valid check digit, for synthetic data.

    There is no reserved test range for My Numbers, so a random valid number may, by chance,
    equal one that has really been issued; it is never *derived* from a real person.
    """
    first11 = f"{rng.randrange(10**11):011d}"
    return f"{first11}{_check_digit(first11)}"
