"""Tenant names: a local government's 全国地方公共団体コード, or a slug for a central organisation.

A *local government code* (LG code) is six ASCII digits: the two-digit 都道府県コード (01–47), a
three-digit 市区町村 part (``000`` for the prefecture itself) and a check digit (総務省
「全国地方公共団体コード」).  The check digit is computed from the first five digits *d1…d5*::

    r     = (6·d1 + 5·d2 + 4·d3 + 3·d4 + 2·d5) mod 11
    check = (11 − r) mod 10

so ``131016`` (千代田区) has r = 27 mod 11 = 5 and check 6.  Only the format, the prefecture range
and the check digit are verified; whether the code names a municipality that exists today is not.

The scheme maps both r = 0 and r = 10 to check digit 1, so about 1.8 % of single-digit typos in the
first five digits go undetected (``130001`` 東京都 and ``330001`` 岡山県 share a check digit).

A *slug* names a central organisation: 2–63 characters, a lowercase ASCII letter followed by
lowercase letters, digits and hyphens (``[a-z][a-z0-9-]{1,62}``).  keygate also refuses a trailing
hyphen and two hyphens in a row, as DNS labels do, so a slug is safe in key labels, URLs and file
names and two slugs cannot differ only by hyphenation artefacts.
"""

from __future__ import annotations

import re
from enum import StrEnum
from operator import mul
from typing import Final

from keygate.core.errors import InvalidTenant

__all__ = [
    "MAX_SLUG_LEN",
    "TenantKind",
    "is_valid_lgcode",
    "lg_check_digit",
    "validate_tenant",
]

#: the longest slug; also the longest tenant accepted at all
MAX_SLUG_LEN: Final = 63
#: values with more digits than this are never echoed in errors: they may be a My Number (12
#: digits, perhaps written 1234-5678-9018) or a 住民票コード (11) sent in the wrong field
_MAX_ECHO_DIGITS: Final = 8

_LG_WEIGHTS: Final = (6, 5, 4, 3, 2)
#: Σ weight · ord("0"): subtracted once instead of converting each ASCII digit to int
_ZERO_OFFSET: Final = ord("0") * sum(_LG_WEIGHTS)
_ASCII_DIGITS = re.compile(r"[0-9]+")
_FIVE_DIGITS = re.compile(r"[0-9]{5}")
_SLUG = re.compile(r"[a-z][a-z0-9-]{1,62}")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


class TenantKind(StrEnum):
    """Which of the two tenant forms a valid tenant name has."""

    LGCODE = "lgcode"
    SLUG = "slug"


def lg_check_digit(first5: str) -> int:
    """The check digit of a local government code whose first five digits are ``first5``.

    Raises :class:`ValueError` unless ``first5`` is exactly five ASCII digits, and
    :class:`TypeError` if it is not a string: programmer errors, since untrusted input goes
    through :func:`validate_tenant`.
    """
    if _FIVE_DIGITS.fullmatch(first5) is None:
        raise ValueError("first5 must be exactly five ASCII digits")
    return _check_digit(first5)


def _check_digit(digits: str) -> int:
    """The check digit for the first five of ``digits``, which must be ASCII digits."""
    weighted: int = sum(map(mul, digits[:5].encode("ascii"), _LG_WEIGHTS)) - _ZERO_OFFSET
    return (11 - weighted % 11) % 10


def _lgcode_problem(code: str) -> str | None:
    """Why ``code`` (a string of ASCII digits) is not a valid LG code, or None when it is."""
    if len(code) != 6:
        return "a local government code has exactly 6 digits"
    if not 1 <= int(code[:2]) <= 47:
        return "a local government code starts with a prefecture code from 01 to 47"
    if _check_digit(code) != int(code[5]):
        return "the local government code's check digit does not match"
    return None


def is_valid_lgcode(value: object) -> bool:
    """Whether ``value`` is a string holding a well-formed LG code with a valid check digit."""
    return (
        isinstance(value, str)
        and _ASCII_DIGITS.fullmatch(value) is not None
        and _lgcode_problem(value) is None
    )


def _slug_problem(value: str) -> str | None:
    if _SLUG.fullmatch(value) is None:
        return (
            "neither a 6-digit local government code nor a slug (2-63 characters: a lowercase "
            "ASCII letter, then lowercase letters, digits or hyphens)"
        )
    if value.endswith("-"):
        return "a slug must not end with a hyphen"
    if "--" in value:
        return "a slug must not contain two hyphens in a row"
    return None


def _invalid(value: str, rule: str) -> InvalidTenant:
    """An InvalidTenant naming ``rule``.

    The value is echoed only if it is printable ASCII of at most 63 characters with at most eight
    digits: more digits might be personal data sent in the wrong field.
    """
    echo = (
        len(value) <= MAX_SLUG_LEN
        and _PRINTABLE_ASCII.fullmatch(value) is not None
        and sum(char.isdigit() for char in value) <= _MAX_ECHO_DIGITS
    )
    if echo:
        return InvalidTenant(f"invalid tenant '{value}': {rule}")
    return InvalidTenant(f"invalid tenant: {rule}")


def validate_tenant(value: object) -> TenantKind:
    """Check that ``value`` names a tenant and say which kind of name it is.

    Raises :class:`~keygate.core.errors.InvalidTenant` with a message naming the rule broken.
    """
    if not isinstance(value, str):
        raise InvalidTenant(f"invalid tenant: must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidTenant("invalid tenant: empty")
    if len(value) > MAX_SLUG_LEN:
        raise InvalidTenant(f"invalid tenant: longer than {MAX_SLUG_LEN} characters")
    if _ASCII_DIGITS.fullmatch(value) is not None:
        problem = _lgcode_problem(value)
        if problem is not None:
            raise _invalid(value, problem)
        return TenantKind.LGCODE
    problem = _slug_problem(value)
    if problem is not None:
        if value.isascii():
            raise _invalid(value, problem)
        raise _invalid(
            value,
            "must be ASCII: a 6-digit local government code or a slug "
            "(full-width digits and letters are not accepted)",
        )
    return TenantKind.SLUG
