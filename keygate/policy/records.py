"""Record-type policies: which fields of a record are encrypted (under which purpose), which are
left clear, and how each is validated.

One TOML file per record type lives in ``policies/`` (the format is described field by field in
``policies/README.md``).  :func:`load_policies` reads them all; the record endpoints then call
:meth:`RecordPolicy.validate` on each incoming record and :meth:`RecordPolicy.field_for` on each of
its fields to learn the treatment and purpose.

Error details name the field and the rule it broke, never the field's value: a record is full of
personal data (氏名, 個人番号 …) and error details reach logs and callers.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Final

from keygate.core.errors import ConfigurationError, ValidationFailed
from keygate.policy.mynumber import is_valid_mynumber
from keygate.policy.tenants import is_valid_lgcode

__all__ = [
    "DEFAULT_POLICIES_DIR",
    "MAX_FIELD_NAME_LEN",
    "POLICIES_DIR_ENV",
    "RESERVED_POLICY_FILES",
    "VALIDATOR_NAMES",
    "FieldPolicy",
    "RecordPolicy",
    "Treatment",
    "Validator",
    "is_valid_record_type",
    "load_policies",
    "load_policy_file",
    "parse_validator",
]

#: environment variable naming the policy directory when none is passed to :func:`load_policies`
POLICIES_DIR_ENV: Final = "KEYGATE_POLICIES_DIR"
#: the policies shipped with keygate: ``policies/`` at the repository root
DEFAULT_POLICIES_DIR: Final = Path(__file__).resolve().parents[2] / "policies"
#: policy files in the same directory that are not record types (``residency.toml``)
RESERVED_POLICY_FILES: Final = frozenset({"residency"})
#: the longest field name, in characters
MAX_FIELD_NAME_LEN: Final = 64
#: the most problems spelled out in one ValidationFailed detail
_MAX_PROBLEMS_SHOWN: Final = 10
#: JSON integers beyond ±(2^53 − 1) lose precision in many JSON parsers (RFC 7493 §2.2)
_MAX_SAFE_INTEGER: Final = 2**53 - 1

#: record type and purpose names
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class Treatment(StrEnum):
    """What the record endpoints do with a field."""

    #: encrypted under the KEK of the field's purpose
    ENCRYPT = "encrypt"
    #: passed through as it is
    CLEAR = "clear"


# --- validators ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Validator:
    """One named check on a field's (non-null) value."""

    #: as written in the policy file, e.g. ``"max_length:60"``
    spec: str
    #: what a valid value looks like, for error details; never mentions the value itself
    rule: str
    check: Callable[[object], bool] = field(repr=False, compare=False)

    def __call__(self, value: object) -> bool:
        return self.check(value)


def _is_string(value: object) -> bool:
    return isinstance(value, str)


def _is_integer(value: object) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER
    )


def _is_nonnegative(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _is_date(value: object) -> bool:
    # The pattern pins the format (fromisoformat alone also takes "20240101", "2024-W01-1" …);
    # fromisoformat then rejects dates that do not exist, such as 2023-02-29.
    if not isinstance(value, str) or _DATE.fullmatch(value) is None:
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


_POSTAL_CODE = re.compile(r"[0-9]{3}-[0-9]{4}")


def _is_postal_code(value: object) -> bool:
    return isinstance(value, str) and _POSTAL_CODE.fullmatch(value) is not None


# ァ (U+30A1) … ヺ (U+30FA), ・ (U+30FB), ー (U+30FC), ヽ ヾ (U+30FD, U+30FE), ASCII and
# ideographic spaces.  ・ separates the parts of foreign residents' names (スミス・ジョン).
_KATAKANA = re.compile(r"[\u30a1-\u30fe \u3000]+")


def _is_katakana(value: object) -> bool:
    return (
        isinstance(value, str)
        and _KATAKANA.fullmatch(value) is not None
        and value.strip(" \u3000") != ""
    )


_SIMPLE_VALIDATORS: Final[Mapping[str, tuple[str, Callable[[object], bool]]]] = {
    "string": ("must be a string", _is_string),
    "integer": (
        "must be a JSON integer (not a boolean) between -(2^53-1) and 2^53-1",
        _is_integer,
    ),
    "nonnegative": ("must be a number greater than or equal to 0", _is_nonnegative),
    "mynumber": (
        "must be a My Number: 12 ASCII digits with a valid check digit",
        is_valid_mynumber,
    ),
    "lgcode": (
        "must be a 6-digit local government code with a valid check digit",
        is_valid_lgcode,
    ),
    "date": ("must be a real calendar date written YYYY-MM-DD", _is_date),
    "postal_code": ("must be a postal code written NNN-NNNN in ASCII digits", _is_postal_code),
    "katakana": (
        "must be full-width katakana (ー, ・ and spaces allowed), not empty",
        _is_katakana,
    ),
}

_ASCII_INT = re.compile(r"[0-9]{1,7}")


def _int_argument(name: str, arg: str, low: int, high: int) -> int:
    if _ASCII_INT.fullmatch(arg) is None or not low <= int(arg) <= high:
        raise ValueError(f"validator '{name}' needs a whole number from {low} to {high}")
    return int(arg)


def _max_length(arg: str) -> tuple[str, Callable[[object], bool]]:
    limit = _int_argument("max_length", arg, 1, 1_000_000)

    def check(value: object) -> bool:
        return isinstance(value, str) and len(value) <= limit

    return f"must be a string of at most {limit} characters", check


def _digits(arg: str) -> tuple[str, Callable[[object], bool]]:
    count = _int_argument("digits", arg, 1, 64)
    pattern = re.compile(f"[0-9]{{{count}}}")

    def check(value: object) -> bool:
        return isinstance(value, str) and pattern.fullmatch(value) is not None

    return f"must be exactly {count} ASCII digits", check


def _one_of(arg: str) -> tuple[str, Callable[[object], bool]]:
    options = arg.split("|")
    if not arg or any(not option or option != option.strip() for option in options):
        raise ValueError(
            "validator 'one_of' needs options separated by '|', none empty or padded with spaces"
        )
    allowed = frozenset(options)

    def check(value: object) -> bool:
        return isinstance(value, str) and value in allowed

    return "must be one of: " + ", ".join(options), check


_PARAMETRIZED_VALIDATORS: Final[
    Mapping[str, Callable[[str], tuple[str, Callable[[object], bool]]]]
] = {"digits": _digits, "max_length": _max_length, "one_of": _one_of}

#: every validator name a policy file may use (parametrized ones take ``name:argument``)
VALIDATOR_NAMES: Final = frozenset(_SIMPLE_VALIDATORS) | frozenset(_PARAMETRIZED_VALIDATORS)


def parse_validator(spec: str) -> Validator:
    """Build the validator a policy file names, e.g. ``"date"`` or ``"max_length:60"``.

    Raises :class:`ValueError` for an unknown name or a bad argument.
    """
    name, colon, arg = spec.partition(":")
    if name in _SIMPLE_VALIDATORS:
        if colon:
            raise ValueError(f"validator '{name}' takes no argument")
        rule, check = _SIMPLE_VALIDATORS[name]
    elif name in _PARAMETRIZED_VALIDATORS:
        if not colon:
            raise ValueError(f"validator '{name}' needs an argument: '{name}:...'")
        rule, check = _PARAMETRIZED_VALIDATORS[name](arg)
    else:
        known = ", ".join(sorted(VALIDATOR_NAMES))
        raise ValueError(f"unknown validator '{name}' (known: {known})")
    return Validator(spec=spec, rule=rule, check=check)


# --- policies ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldPolicy:
    """How one field of a record type is treated."""

    name: str
    treatment: Treatment
    #: the purpose whose KEK encrypts the field; None for clear fields
    purpose: str | None
    #: a required field must be present and not null
    required: bool
    #: checks on the value when it is not null, in order
    validators: tuple[Validator, ...]


#: lone surrogates: JSON escapes like \ud800 decode to them, and UTF-8 cannot encode them
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_UNICODE: Final = "must be valid Unicode (no lone surrogates)"


def _is_valid_unicode(text: str) -> bool:
    return text.isascii() or _SURROGATE.search(text) is None


def _is_valid_field_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_FIELD_NAME_LEN and _is_valid_unicode(name)


def _label(name: object) -> str:
    """How an error detail names a field: the name itself only if it is short and printable."""
    if isinstance(name, str) and 0 < len(name) <= MAX_FIELD_NAME_LEN and name.isprintable():
        return f'field "{name}"'
    if isinstance(name, str):
        return f"a field name of {len(name)} characters"
    return f"a field name of type {type(name).__name__}"


def _bad_field_name_problem(name: object) -> str:
    return f"{_label(name)}: a field name must be a string of 1-{MAX_FIELD_NAME_LEN} characters"


def _json_type_problem(value: object) -> str | None:
    """Why ``value`` is not a JSON scalar keygate can carry, or None when it is one."""
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, str):
        return None if _is_valid_unicode(value) else _NOT_UNICODE
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number"
    if isinstance(value, Mapping):
        kind = "an object"
    elif isinstance(value, list | tuple):
        kind = "an array"
    else:
        kind = f"of type {type(value).__name__}"
    return f"must be a JSON scalar (string, number, boolean or null), not {kind}"


@dataclass(frozen=True, slots=True)
class RecordPolicy:
    """The policy of one record type: its fields' treatments and validators."""

    record_type: str
    description: str
    #: the known fields, by name (read-only)
    fields: Mapping[str, FieldPolicy]
    #: whether fields the policy does not name are accepted
    allow_unknown_fields: bool
    #: what happens to accepted unknown fields (encrypted under ``default_purpose``, or clear)
    unknown_field_treatment: Treatment
    #: the purpose of encrypted fields that name none, and of encrypted unknown fields
    default_purpose: str
    _required: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        required = tuple(name for name, policy in self.fields.items() if policy.required)
        object.__setattr__(self, "_required", required)

    @property
    def purposes(self) -> frozenset[str]:
        """Every purpose this record type can encrypt under (the KEKs it needs)."""
        purposes = {
            policy.purpose
            for policy in self.fields.values()
            if policy.treatment is Treatment.ENCRYPT and policy.purpose is not None
        }
        if self.allow_unknown_fields and self.unknown_field_treatment is Treatment.ENCRYPT:
            purposes.add(self.default_purpose)
        return frozenset(purposes)

    def field_for(self, name: str) -> FieldPolicy:
        """The policy for field ``name``; unknown fields get the record type's unknown-field
        treatment if allowed, else :class:`~keygate.core.errors.ValidationFailed`."""
        policy = self.fields.get(name)
        if policy is not None:
            return policy
        if not _is_valid_field_name(name):
            raise ValidationFailed(_bad_field_name_problem(name))
        if not self.allow_unknown_fields:
            raise ValidationFailed(self._unknown_field_problem(name))
        encrypt = self.unknown_field_treatment is Treatment.ENCRYPT
        return FieldPolicy(
            name=name,
            treatment=self.unknown_field_treatment,
            purpose=self.default_purpose if encrypt else None,
            required=False,
            validators=(),
        )

    def validate(self, record: Mapping[str, object]) -> None:
        """Check ``record`` against the policy.

        Raises :class:`~keygate.core.errors.ValidationFailed` whose detail lists the problems
        (at most ten spelled out), each naming the field and the rule, never the value.
        """
        problems = list(self._problems(record))
        if not problems:
            return
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        detail = "; ".join(shown)
        if len(problems) > len(shown):
            detail += f"; and {len(problems) - len(shown)} more"
        raise ValidationFailed(f"record of type '{self.record_type}' is not valid: {detail}")

    def _unknown_field_problem(self, name: object) -> str:
        return (
            f"{_label(name)}: not a field of record type '{self.record_type}' "
            "(unknown fields are not allowed)"
        )

    def _problems(self, record: object) -> Iterator[str]:
        # ``record`` is typed Mapping for callers but comes from JSON, so its type is checked.
        # This runs on every record the gateway encrypts: the common case (a known field holding
        # a str, int or None) takes the fewest steps.
        if not isinstance(record, Mapping):
            yield "the record must be a JSON object"
            return
        known = self.fields
        for name, value in record.items():
            policy = known.get(name)
            if policy is None:
                if not _is_valid_field_name(name):
                    yield _bad_field_name_problem(name)
                elif not self.allow_unknown_fields:
                    yield self._unknown_field_problem(name)
                else:
                    type_problem = _json_type_problem(value)
                    if type_problem is not None:
                        yield f"{_label(name)}: {type_problem}"
                continue
            if value is None:
                if policy.required:
                    yield f"{_label(name)}: is required and must not be null"
                continue
            kind = type(value)
            if kind is str:
                if not value.isascii() and _SURROGATE.search(value) is not None:
                    yield f"{_label(name)}: {_NOT_UNICODE}"
                    continue
            elif kind is not int:
                type_problem = _json_type_problem(value)
                if type_problem is not None:
                    yield f"{_label(name)}: {type_problem}"
                    continue
            for validator in policy.validators:
                if not validator.check(value):
                    yield f"{_label(name)}: {validator.rule} (validator '{validator.spec}')"
                    break
        for name in self._required:
            if name not in record:
                yield f"{_label(name)}: is required but missing"


def is_valid_record_type(name: object) -> bool:
    """Whether ``name`` is a well-formed record type name (``[a-z][a-z0-9_-]{0,63}``)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


# --- loading -------------------------------------------------------------------------------------


class _SchemaError(ValueError):
    """A policy file's content breaks the schema; turned into ConfigurationError naming the file."""


_TOP_LEVEL_KEYS: Final = frozenset(
    {
        "record_type",
        "description",
        "default_purpose",
        "allow_unknown_fields",
        "unknown_field_treatment",
        "fields",
    }
)
_FIELD_KEYS: Final = frozenset({"treatment", "purpose", "required", "validators"})


def _optional_str(table: Mapping[str, object], key: str, default: str, where: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise _SchemaError(f"{where}'{key}' must be a string")
    return value


def _optional_bool(table: Mapping[str, object], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise _SchemaError(f"{where}'{key}' must be true or false")
    return value


def _purpose(value: object, where: str) -> str:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise _SchemaError(f"{where}a purpose must match [a-z][a-z0-9_-]{{0,63}}")
    return value


def _treatment(value: object, where: str) -> Treatment:
    for treatment in Treatment:
        if value == treatment.value:
            return treatment
    raise _SchemaError(f"{where}treatment must be 'encrypt' or 'clear'")


def _build_field(name: str, table: object, default_purpose: str) -> FieldPolicy:
    where = f"field {name!r}: "
    if not isinstance(table, dict):
        raise _SchemaError(f"{where}must be a table")
    if not _is_valid_field_name(name) or not name.isprintable() or name != name.strip():
        raise _SchemaError(
            f"{where}a field name must be 1-{MAX_FIELD_NAME_LEN} printable characters "
            "without surrounding spaces"
        )
    unknown = sorted(set(table) - _FIELD_KEYS)
    if unknown:
        raise _SchemaError(f"{where}unknown keys {unknown} (allowed: {sorted(_FIELD_KEYS)})")
    if "treatment" not in table:
        raise _SchemaError(f"{where}'treatment' is missing")
    treatment = _treatment(table["treatment"], where)
    purpose: str | None = None
    if "purpose" in table:
        if treatment is Treatment.CLEAR:
            raise _SchemaError(f"{where}a clear field has no purpose")
        purpose = _purpose(table["purpose"], where)
    elif treatment is Treatment.ENCRYPT:
        purpose = default_purpose
    required = _optional_bool(table, "required", where)
    specs = table.get("validators", [])
    if not isinstance(specs, list) or not all(isinstance(spec, str) for spec in specs):
        raise _SchemaError(f"{where}'validators' must be a list of strings")
    validators = []
    for spec in specs:
        try:
            validators.append(parse_validator(spec))
        except ValueError as exc:
            raise _SchemaError(f"{where}{exc}") from None
    return FieldPolicy(
        name=name,
        treatment=treatment,
        purpose=purpose,
        required=required,
        validators=tuple(validators),
    )


def _build_policy(data: Mapping[str, object], stem: str) -> RecordPolicy:
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise _SchemaError(f"unknown keys {unknown} (allowed: {sorted(_TOP_LEVEL_KEYS)})")
    if _NAME.fullmatch(stem) is None:
        raise _SchemaError("the file name must be a record type name matching [a-z][a-z0-9_-]*")
    record_type = _optional_str(data, "record_type", stem, "")
    if record_type != stem:
        raise _SchemaError(f"record_type '{record_type}' differs from the file name")
    description = _optional_str(data, "description", "", "")
    if "default_purpose" not in data:
        raise _SchemaError("'default_purpose' is missing")
    default_purpose = _purpose(data["default_purpose"], "default_purpose: ")
    allow_unknown = _optional_bool(data, "allow_unknown_fields", "")
    unknown_treatment = (
        _treatment(data["unknown_field_treatment"], "unknown_field_treatment: ")
        if "unknown_field_treatment" in data
        else Treatment.ENCRYPT
    )
    tables = data.get("fields")
    if not isinstance(tables, dict) or not tables:
        raise _SchemaError("'fields' must be a non-empty table of field tables")
    fields = {name: _build_field(name, table, default_purpose) for name, table in tables.items()}
    return RecordPolicy(
        record_type=record_type,
        description=description,
        fields=fields,
        allow_unknown_fields=allow_unknown,
        unknown_field_treatment=unknown_treatment,
        default_purpose=default_purpose,
    )


def load_policy_file(path: Path) -> RecordPolicy:
    """Read one policy file; the record type is the file's name without ``.toml``.

    Raises :class:`~keygate.core.errors.ConfigurationError` naming the file if it cannot be
    read, is not TOML, or breaks the schema.
    """
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        raise ConfigurationError(f"policy file {path}: cannot be read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"policy file {path}: not valid TOML: {exc}") from exc
    try:
        return _build_policy(data, path.stem)
    except _SchemaError as exc:
        raise ConfigurationError(f"policy file {path}: {exc}") from None


def load_policies(directory: Path | None = None) -> dict[str, RecordPolicy]:
    """Load every ``*.toml`` policy file of ``directory``, keyed by record type.

    The directory defaults to ``$KEYGATE_POLICIES_DIR`` if set, else the repository's
    ``policies/``.  Raises :class:`~keygate.core.errors.ConfigurationError` naming the file at
    fault, or the directory if it does not exist.
    """
    if directory is None:
        directory = Path(os.environ.get(POLICIES_DIR_ENV) or DEFAULT_POLICIES_DIR)
    if not directory.is_dir():
        raise ConfigurationError(f"policy directory {directory} does not exist")
    policies: dict[str, RecordPolicy] = {}
    for path in sorted(directory.glob("*.toml")):
        if path.name.startswith(".") or path.stem in RESERVED_POLICY_FILES:
            continue
        policy = load_policy_file(path)
        policies[policy.record_type] = policy
    return policies
