"""Record-type policies: loading the TOML files, the validators, and record validation."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keygate.policy
import keygate.policy.records
from keygate.core.errors import ConfigurationError, ValidationFailed
from keygate.policy.records import (
    DEFAULT_POLICIES_DIR,
    POLICIES_DIR_ENV,
    VALIDATOR_NAMES,
    RecordPolicy,
    Treatment,
    is_valid_record_type,
    load_policies,
    load_policy_file,
    parse_validator,
)

pytestmark = pytest.mark.unit

SHIPPED = load_policies(DEFAULT_POLICIES_DIR)

MINIMAL = """\
default_purpose = "demo"

[fields."名前"]
treatment = "encrypt"
required = true
validators = ["max_length:10"]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def detail_of(policy: RecordPolicy, record: Mapping[str, object]) -> str:
    with pytest.raises(ValidationFailed) as info:
        policy.validate(record)
    assert info.value.code == "VALIDATION_FAILED"
    return info.value.detail


VALID_RESIDENT: dict[str, object] = {
    "住民票コード": "12345678901",
    "氏名": "山田 太郎",
    "氏名カナ": "ヤマダ タロウ",
    "生年月日": "1980-02-29",
    "性別": "男",
    "郵便番号": "100-0001",
    "住所": "東京都千代田区千代田1番1号",
    "世帯番号": "H-0042",
    "続柄": "世帯主",
    "個人番号": "123456789018",
    "市区町村コード": "131016",
}


# --- the shipped files -------------------------------------------------------------------------


def test_shipped_policies_load() -> None:
    """The resident, tax and mynumber policies ship and load without error."""
    assert {"resident", "tax", "mynumber"} <= set(SHIPPED)
    for record_type, policy in SHIPPED.items():
        assert policy.record_type == record_type
        assert policy.description
        assert not policy.allow_unknown_fields


@pytest.mark.parametrize("record_type", ["resident", "tax"])
def test_mynumber_field_has_its_own_purpose(record_type: str) -> None:
    """個人番号 is encrypted under `mynumber`, other encrypted fields under the record's purpose."""
    policy = SHIPPED[record_type]
    assert policy.field_for("個人番号").purpose == "mynumber"
    for name, field in policy.fields.items():
        if field.treatment is Treatment.ENCRYPT and name != "個人番号":
            assert field.purpose == record_type, name
        if field.treatment is Treatment.CLEAR:
            assert field.purpose is None
    assert policy.purposes == {record_type, "mynumber"}


def test_shipped_treatments() -> None:
    """The fields the policies leave clear are exactly the documented ones."""

    def clear(record_type: str) -> set[str]:
        fields = SHIPPED[record_type].fields
        return {name for name, f in fields.items() if f.treatment is Treatment.CLEAR}

    assert clear("resident") == {"世帯番号", "市区町村コード"}
    assert clear("tax") == {"課税年度", "宛名番号", "納期限"}
    assert clear("mynumber") == {"交付年月日", "交付市区町村コード"}
    assert SHIPPED["mynumber"].purposes == {"mynumber"}


def test_valid_resident_record_passes() -> None:
    """A complete, well-formed resident record validates."""
    SHIPPED["resident"].validate(VALID_RESIDENT)


def test_policies_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no argument, KEYGATE_POLICIES_DIR chooses the directory."""
    write(tmp_path, "demo.toml", MINIMAL)
    monkeypatch.setenv(POLICIES_DIR_ENV, str(tmp_path))
    assert set(load_policies()) == {"demo"}
    monkeypatch.delenv(POLICIES_DIR_ENV)
    assert set(load_policies()) == set(SHIPPED)


def test_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    """A policy directory that does not exist is a ConfigurationError naming it."""
    missing = tmp_path / "nope"
    with pytest.raises(ConfigurationError, match="nope"):
        load_policies(missing)


def test_hidden_and_other_files_are_ignored(tmp_path: Path) -> None:
    """Only *.toml files not starting with a dot are read."""
    write(tmp_path, "demo.toml", MINIMAL)
    write(tmp_path, ".demo.toml", "not toml [")
    write(tmp_path, "README.md", "# notes")
    assert set(load_policies(tmp_path)) == {"demo"}


def test_defaults_of_a_minimal_file(tmp_path: Path) -> None:
    """Omitted keys take their documented defaults."""
    policy = load_policy_file(write(tmp_path, "demo.toml", MINIMAL))
    assert policy.record_type == "demo"
    assert policy.description == ""
    assert policy.allow_unknown_fields is False
    assert policy.unknown_field_treatment is Treatment.ENCRYPT
    field = policy.fields["名前"]
    assert field.purpose == "demo"
    assert field.required is True
    assert [v.spec for v in field.validators] == ["max_length:10"]


# --- broken files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("default_purpose = \n", "not valid TOML"),
        ('default_purpose = "demo"\n[fields.名前]\ntreatment = "clear"\n', "not valid TOML"),
        (MINIMAL.replace("max_length:10", "shoe_size"), "unknown validator 'shoe_size'"),
        (MINIMAL.replace("max_length:10", "max_length"), "needs an argument"),
        (MINIMAL.replace("max_length:10", "max_length:0"), "from 1 to"),
        (MINIMAL.replace("max_length:10", "max_length:ten"), "whole number"),
        (MINIMAL.replace("max_length:10", "date:iso"), "takes no argument"),
        (MINIMAL.replace("max_length:10", "one_of:a||b"), "one_of"),
        (MINIMAL.replace("max_length:10", "one_of:"), "one_of"),
        (MINIMAL.replace('["max_length:10"]', '"max_length:10"'), "list of strings"),
        (MINIMAL.replace('["max_length:10"]', "[10]"), "list of strings"),
        (MINIMAL.replace('"encrypt"', '"hide"'), "'encrypt' or 'clear'"),
        (MINIMAL.replace('treatment = "encrypt"\n', ""), "'treatment' is missing"),
        (MINIMAL.replace("required = true", "requried = true"), "unknown keys ['requried']"),
        (MINIMAL.replace("required = true", 'required = "yes"'), "true or false"),
        (MINIMAL.replace('default_purpose = "demo"\n', ""), "'default_purpose' is missing"),
        (MINIMAL.replace('"demo"', '"Demo Purpose"'), "purpose must match"),
        (MINIMAL.replace('"encrypt"', '"clear"\npurpose = "x"'), "clear field has no purpose"),
        (MINIMAL.replace('"encrypt"', '"encrypt"\npurpose = "../x"'), "purpose must match"),
        ('record_type = "other"\n' + MINIMAL, "differs from the file name"),
        ("alow_unknown_fields = true\n" + MINIMAL, "unknown keys ['alow_unknown_fields']"),
        ('allow_unknown_fields = "no"\n' + MINIMAL, "true or false"),
        ('unknown_field_treatment = "drop"\n' + MINIMAL, "'encrypt' or 'clear'"),
        ("description = 3\n" + MINIMAL, "'description' must be a string"),
        ('default_purpose = "demo"\n', "'fields' must be a non-empty table"),
        ('default_purpose = "demo"\nfields = 3\n', "'fields' must be a non-empty table"),
        ('default_purpose = "demo"\n[fields]\n"名前" = "encrypt"\n', "must be a table"),
        (MINIMAL.replace('"名前"', '" 名前"'), "printable characters"),
        (MINIMAL.replace('"名前"', '"' + "x" * 65 + '"'), "printable characters"),
        (MINIMAL.replace('"名前"', '"a\\tb"'), "printable characters"),
    ],
)
def test_broken_file_is_a_configuration_error_naming_it(
    tmp_path: Path, text: str, message: str
) -> None:
    """A malformed or schema-breaking policy file raises ConfigurationError naming the file."""
    write(tmp_path, "demo.toml", text)
    with pytest.raises(ConfigurationError) as info:
        load_policies(tmp_path)
    assert "demo.toml" in info.value.detail
    assert message in info.value.detail


def test_unknown_validator_names_file_and_field(tmp_path: Path) -> None:
    """An unknown validator is reported with the file and the field it is on."""
    write(tmp_path, "ok.toml", MINIMAL)
    write(tmp_path, "broken.toml", MINIMAL.replace("max_length:10", "zenkaku"))
    with pytest.raises(ConfigurationError) as info:
        load_policies(tmp_path)
    assert "broken.toml" in info.value.detail
    assert "名前" in info.value.detail
    assert "zenkaku" in info.value.detail


@pytest.mark.parametrize("name", ["Bad.toml", "1st.toml", "has space.toml", "ü.toml"])
def test_bad_record_type_file_name(tmp_path: Path, name: str) -> None:
    """A file whose name is not a valid record type name is rejected."""
    write(tmp_path, name, MINIMAL)
    with pytest.raises(ConfigurationError, match="file name"):
        load_policies(tmp_path)


def test_non_utf8_file(tmp_path: Path) -> None:
    """A policy file that is not UTF-8 is a ConfigurationError, not a UnicodeDecodeError."""
    (tmp_path / "demo.toml").write_bytes(MINIMAL.encode("shift_jis"))
    with pytest.raises(ConfigurationError, match=r"demo\.toml"):
        load_policies(tmp_path)


def test_unreadable_entry(tmp_path: Path) -> None:
    """A directory named like a policy file is a ConfigurationError naming it."""
    (tmp_path / "demo.toml").mkdir()
    with pytest.raises(ConfigurationError, match=r"demo\.toml"):
        load_policies(tmp_path)


# --- validators ------------------------------------------------------------------------------


VALIDATOR_CASES = [
    ("string", "", True),
    ("string", "山田", True),
    ("string", 1, False),
    ("string", True, False),
    ("integer", 0, True),
    ("integer", -5, True),
    ("integer", 2**53 - 1, True),
    ("integer", 2**53, False),
    ("integer", True, False),
    ("integer", 1.0, False),
    ("integer", "1", False),
    ("nonnegative", 0, True),
    ("nonnegative", 0.5, True),
    ("nonnegative", -1, False),
    ("nonnegative", -0.1, False),
    ("nonnegative", math.inf, False),
    ("nonnegative", math.nan, False),
    ("nonnegative", False, False),
    ("nonnegative", "5", False),
    ("max_length:3", "abc", True),
    ("max_length:3", "山田太", True),
    ("max_length:3", "abcd", False),
    ("max_length:3", 12, False),
    ("digits:4", "0123", True),
    ("digits:4", "012", False),
    ("digits:4", "０１２３", False),
    ("digits:4", "0123\n", False),
    ("one_of:男|女", "男", True),
    ("one_of:男|女", "女", True),
    ("one_of:男|女", "男性", False),
    ("one_of:男|女", "男|女", False),
    ("one_of:男|女", 1, False),
    ("date", "2024-02-29", True),
    ("date", "1900-01-01", True),
    ("date", "2023-02-29", False),
    ("date", "2024-13-01", False),
    ("date", "2024-00-10", False),
    ("date", "0000-01-01", False),
    ("date", "20240101", False),
    ("date", "2024-W01-1", False),
    ("date", "2024-1-1", False),
    ("date", "２０２４-０１-０１", False),
    ("date", "2024-01-01T00:00", False),
    ("date", "2024-01-01\n", False),
    ("date", 20240101, False),
    ("postal_code", "100-0001", True),
    ("postal_code", "1000001", False),
    ("postal_code", "100-001", False),
    ("postal_code", "１００-０００１", False),
    ("postal_code", "〒100-0001", False),
    ("katakana", "ヤマダ タロウ", True),
    ("katakana", "ヤマダ\u3000タロウ", True),
    ("katakana", "スミス・ジョン", True),
    ("katakana", "ヴィー", True),
    ("katakana", "やまだ", False),
    ("katakana", "ﾔﾏﾀﾞ", False),
    ("katakana", "山田", False),
    ("katakana", "YAMADA", False),
    ("katakana", "", False),
    ("katakana", "   ", False),
    ("katakana", 1, False),
    ("mynumber", "123456789018", True),
    ("mynumber", "123456789010", False),
    ("mynumber", 123456789018, False),
    ("lgcode", "131016", True),
    ("lgcode", "131017", False),
    ("lgcode", "13101", False),
    ("lgcode", 131016, False),
]


@pytest.mark.parametrize(
    ("spec", "value", "ok"), VALIDATOR_CASES, ids=[f"{s}-{v!r}" for s, v, _ in VALIDATOR_CASES]
)
def test_validator(spec: str, value: object, ok: bool) -> None:
    """Each validator accepts exactly the values its rule describes."""
    assert parse_validator(spec)(value) is ok


def test_every_validator_is_covered() -> None:
    """The table above exercises every validator name, passing and failing."""
    covered = {spec.partition(":")[0] for spec, _, _ in VALIDATOR_CASES}
    assert covered == VALIDATOR_NAMES
    for name in VALIDATOR_NAMES:
        outcomes = {ok for spec, _, ok in VALIDATOR_CASES if spec.partition(":")[0] == name}
        assert outcomes == {True, False}, name


# --- record validation -----------------------------------------------------------------------


def test_missing_required_field() -> None:
    """A missing required field is named in the error."""
    record = dict(VALID_RESIDENT)
    del record["氏名"]
    assert 'field "氏名": is required but missing' in detail_of(SHIPPED["resident"], record)


def test_api_contract_example_record_validates() -> None:
    """The partial record of API.md's record example is valid: only 氏名 is required."""
    record = {"氏名": "山田 太郎", "個人番号": "123456789018", "世帯番号": "H-0042"}
    SHIPPED["resident"].validate(record)


def test_null_required_field() -> None:
    """null in a required field is an error; in an optional field it is accepted."""
    policy = SHIPPED["resident"]
    assert "must not be null" in detail_of(policy, {**VALID_RESIDENT, "氏名": None})
    policy.validate({**VALID_RESIDENT, "個人番号": None, "氏名カナ": None})


def test_unknown_field_rejected() -> None:
    """A field the policy does not name is rejected, naming it."""
    detail = detail_of(SHIPPED["resident"], {**VALID_RESIDENT, "血液型": "A"})
    assert 'field "血液型"' in detail
    assert "unknown fields are not allowed" in detail
    with pytest.raises(ValidationFailed, match="血液型"):
        SHIPPED["resident"].field_for("血液型")


@pytest.mark.parametrize("treatment", ["encrypt", "clear"])
def test_unknown_fields_allowed(tmp_path: Path, treatment: str) -> None:
    """With allow_unknown_fields, unknown fields get the unknown-field treatment and purpose."""
    text = f'allow_unknown_fields = true\nunknown_field_treatment = "{treatment}"\n{MINIMAL}'
    policy = load_policy_file(write(tmp_path, "demo.toml", text))
    policy.validate({"名前": "x", "備考": "anything", "件数": 3})
    field = policy.field_for("備考")
    assert field.treatment == treatment
    assert field.purpose == ("demo" if treatment == "encrypt" else None)
    assert field.validators == ()
    assert policy.purposes == {"demo"}
    assert "must be a JSON scalar" in detail_of(policy, {"名前": "x", "備考": {"a": 1}})
    with pytest.raises(ValidationFailed, match="1-64"):
        policy.field_for("x" * 65)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ({"姓": "山田"}, "not an object"),
        (["山田"], "not an array"),
        (("山田",), "not an array"),
        (b"yamada", "not of type bytes"),
        (math.inf, "finite"),
        (math.nan, "finite"),
        ("山田\ud800", "lone surrogates"),
    ],
)
def test_non_scalar_values_name_the_field(value: object, kind: str) -> None:
    """Objects, arrays, other types, non-finite numbers and lone surrogates are rejected."""
    detail = detail_of(SHIPPED["resident"], {**VALID_RESIDENT, "氏名": value})
    assert 'field "氏名": ' in detail
    assert kind in detail


def test_record_that_is_not_an_object() -> None:
    """A JSON array or string in place of the record is rejected."""
    for record in (["氏名"], "氏名", None, 3):
        assert "must be a JSON object" in detail_of(SHIPPED["resident"], record)  # type: ignore[arg-type]


def test_bad_field_names() -> None:
    """Over-long and non-string field names are rejected without echoing them."""
    long_name = "秘" * 65
    detail = detail_of(SHIPPED["resident"], {**VALID_RESIDENT, long_name: "x"})
    assert long_name not in detail
    assert "a field name of 65 characters" in detail
    detail = detail_of(SHIPPED["resident"], {**VALID_RESIDENT, 7: "x"})  # type: ignore[dict-item]
    assert "a field name of type int" in detail
    detail = detail_of(SHIPPED["resident"], {**VALID_RESIDENT, "": "x"})
    assert "a field name of 0 characters" in detail
    detail = detail_of(SHIPPED["resident"], {**VALID_RESIDENT, "a\nb": "x"})
    assert "a\nb" not in detail


def test_error_never_contains_the_value() -> None:
    """With a bad My Number (and a good one elsewhere), the detail names fields, never values."""
    bad_mynumber = "123456789010"
    record = {
        **VALID_RESIDENT,
        "個人番号": bad_mynumber,
        "生年月日": "1980-02-30",
        "郵便番号": "1000001",
        "氏名カナ": "やまだ たろう",
    }
    detail = detail_of(SHIPPED["resident"], record)
    for name in ("個人番号", "生年月日", "郵便番号", "氏名カナ"):
        assert f'field "{name}"' in detail
    for value in (bad_mynumber, "1980-02-30", "1000001", "やまだ", "123456789018", "山田"):
        assert value not in detail
    assert "validator 'mynumber'" in detail


def test_tax_record_types() -> None:
    """Tax amounts must be JSON integers: strings, booleans and negative numbers are rejected."""
    policy = SHIPPED["tax"]
    record: dict[str, object] = {
        "課税年度": 2025,
        "宛名番号": "0000000001",
        "氏名": "山田 太郎",
        "課税区分": "課税",
        "所得金額": 3_000_000,
        "課税標準額": 2_000_000,
        "市町村民税額": 123_000,
        "道府県民税額": 81_000,
    }
    policy.validate(record)
    assert "integer" in detail_of(policy, {**record, "所得金額": "3000000"})
    assert "integer" in detail_of(policy, {**record, "所得金額": True})
    assert "greater than or equal to 0" in detail_of(policy, {**record, "課税標準額": -1})


def test_many_problems_are_summarised() -> None:
    """More than ten problems are cut short with a count of the rest."""
    record = {f"未知{i}": i for i in range(15)}
    detail = detail_of(SHIPPED["resident"], record)
    assert detail.count("unknown fields are not allowed") == 10
    assert detail.endswith("more")


def test_fields_mapping_is_read_only() -> None:
    """A loaded policy cannot be changed by its users."""
    policy = SHIPPED["resident"]
    with pytest.raises(TypeError):
        policy.fields["氏名"] = policy.fields["個人番号"]  # type: ignore[index]


# Text a detail may legitimately contain: field names, rules and the message templates.
POLICY_TEXT = " ".join(
    [name for policy in SHIPPED.values() for name in policy.fields]
    + [v.rule + v.spec for p in SHIPPED.values() for f in p.fields.values() for v in f.validators]
    + [inspect.getsource(keygate.policy.records)]
)


@settings(suppress_health_check=[HealthCheck.filter_too_much])
@given(
    st.sampled_from(sorted(SHIPPED["resident"].fields)),
    st.one_of(
        st.text(min_size=6, max_size=40),
        st.from_regex(r"[0-9]{12}", fullmatch=True),
    ).filter(lambda value: value not in POLICY_TEXT),
)
def test_no_detail_ever_contains_a_value(name: str, value: str) -> None:
    """Whatever string is put in any resident field, a failure's detail never repeats it."""
    try:
        SHIPPED["resident"].validate({**VALID_RESIDENT, name: value})
    except ValidationFailed as exc:
        assert value not in exc.detail


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("resident", True),
        ("a", True),
        ("tax_2024", True),
        ("x-y", True),
        ("Resident", False),
        ("1a", False),
        ("", False),
        ("a" * 65, False),
        ("a.b", False),
        ("住民", False),
        (3, False),
    ],
)
def test_record_type_names(name: object, ok: bool) -> None:
    """Record type names follow [a-z][a-z0-9_-]{0,63}."""
    assert is_valid_record_type(name) is ok


def test_package_exports_are_sorted_and_present() -> None:
    """keygate.policy re-exports a sorted __all__ whose every name exists."""
    assert keygate.policy.__all__ == sorted(keygate.policy.__all__)
    for name in keygate.policy.__all__:
        assert hasattr(keygate.policy, name), name
