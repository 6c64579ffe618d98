"""Policies: tenant names, My Number validation and record-type field policies."""

from keygate.policy.mynumber import generate_mynumber, is_valid_mynumber, mynumber_check_digit
from keygate.policy.records import (
    FieldPolicy,
    RecordPolicy,
    Treatment,
    Validator,
    is_valid_record_type,
    load_policies,
    load_policy_file,
    parse_validator,
)
from keygate.policy.tenants import TenantKind, is_valid_lgcode, lg_check_digit, validate_tenant

__all__ = [
    "FieldPolicy",
    "RecordPolicy",
    "TenantKind",
    "Treatment",
    "Validator",
    "generate_mynumber",
    "is_valid_lgcode",
    "is_valid_mynumber",
    "is_valid_record_type",
    "lg_check_digit",
    "load_policies",
    "load_policy_file",
    "mynumber_check_digit",
    "parse_validator",
    "validate_tenant",
]
