"""Hypothesis properties of envelope v1 through the KeyManager: round trip and tamper evidence."""

from __future__ import annotations

import contextlib
import string
import warnings
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from keygate.core.context import aad_prefix, encode_context
from keygate.core.errors import DecryptionFailed
from keygate.core.model import MAX_CONTEXT_KEY_LEN, AlgorithmSuite
from keygate.core.wire import from_text, header_length, to_text
from keygate.keys.manager import KeyManager
from keygate.keys.randomness import SystemRandom
from keygate.testing.fakes import SoftwareKeyWrapper, StaticRegistry

pytestmark = pytest.mark.unit

# When a property fails, Hypothesis's pytest plugin imports hypothesis.extra._patching (libcst),
# which emits a DeprecationWarning from mypy_extensions; under filterwarnings=error that turns the
# failure report into an INTERNALERROR that aborts the whole session.  Import it once here, with
# that warning ignored, so a failing property is reported as an ordinary failure.
with warnings.catch_warnings(), contextlib.suppress(ImportError):  # no libcst: nothing to patch
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

SUITE = AlgorithmSuite.AES256_GCM_HKDF_SHA256_COMMIT
TENANT, PURPOSE = "131016", "resident"
OTHER_TENANT = "131024"

FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    # the explain phase re-runs a failing example many times; the shrunk example is enough here
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _setup() -> tuple[KeyManager, KeyManager]:
    reg = StaticRegistry()
    reg.add_key(TENANT, PURPOSE)
    reg.add_key(OTHER_TENANT, PURPOSE)
    hsm = SoftwareKeyWrapper()
    rng = SystemRandom()
    # Two gateways over the same registry and HSM: one encrypts (its cache is warm), one is cold.
    return (
        KeyManager(registry=reg, hsm=hsm, rng=rng),
        KeyManager(registry=reg, hsm=hsm, rng=rng),
    )


WRITER, READER = _setup()

# ---------------------------------------------------------------------------- strategies
context_keys = st.text(
    alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=MAX_CONTEXT_KEY_LEN
)
#: any Unicode text without lone surrogates (they cannot be encoded as UTF-8)
context_values = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)
contexts = st.dictionaries(context_keys, context_values, max_size=6)
plaintexts = st.binary(max_size=4096)


def _fails(
    km: KeyManager, envelope: bytes, context: Mapping[str, str], tenant: str = TENANT
) -> bool:
    try:
        km.decrypt(tenant, PURPOSE, context, envelope)
    except DecryptionFailed:
        return True
    return False


# ---------------------------------------------------------------------------- round trip
@FAST
@given(plaintext=plaintexts, context=contexts)
def test_round_trip_binary_and_text(plaintext: bytes, context: dict[str, str]) -> None:
    """Any plaintext up to 4 KiB under any valid context decrypts back, warm and cold."""
    env = WRITER.encrypt(TENANT, PURPOSE, context, plaintext)
    assert WRITER.decrypt(TENANT, PURPOSE, context, env) == plaintext
    assert READER.decrypt(TENANT, PURPOSE, dict(reversed(context.items())), env) == plaintext
    text = to_text(env)
    assert text.startswith("kg1.")
    assert from_text(text) == env
    assert len(env) == header_length(env) + 12 + len(plaintext) + 16


# ---------------------------------------------------------------------------- tampering
@FAST
@given(
    plaintext=st.binary(max_size=512),
    context=contexts,
    data=st.data(),
)
def test_any_flipped_byte_fails(
    plaintext: bytes, context: dict[str, str], data: st.DataObject
) -> None:
    """Changing any one byte (anywhere, any XOR mask) makes decryption fail."""
    env = WRITER.encrypt(TENANT, PURPOSE, context, plaintext)
    pos = data.draw(st.integers(0, len(env) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    bad = env[:pos] + bytes((env[pos] ^ mask,)) + env[pos + 1 :]
    assert _fails(WRITER, bad, context)
    assert _fails(READER, bad, context)


@FAST
@given(context=contexts)
def test_flipping_each_header_and_nonce_byte_fails(context: dict[str, str]) -> None:
    """Every single-bit flip of every header and nonce byte is refused."""
    env = WRITER.encrypt(TENANT, PURPOSE, context, b"x" * 32)
    h = header_length(env)
    for pos in range(h + 12):
        bad = env[:pos] + bytes((env[pos] ^ 0x01,)) + env[pos + 1 :]
        assert _fails(WRITER, bad, context), pos


@FAST
@given(plaintext=plaintexts, context=contexts, data=st.data())
def test_any_truncation_fails(
    plaintext: bytes, context: dict[str, str], data: st.DataObject
) -> None:
    """Every proper prefix of an envelope is refused, warm and cold."""
    env = WRITER.encrypt(TENANT, PURPOSE, context, plaintext)
    h = header_length(env)
    cuts = set(range(h + 12 + 17)) | {data.draw(st.integers(0, len(env) - 1), label="cut")}
    for cut in sorted(c for c in cuts if c < len(env)):
        assert _fails(WRITER, env[:cut], context), cut
        assert _fails(READER, env[:cut], context), cut


@FAST
@given(plaintext=plaintexts, context=contexts, extra=st.binary(min_size=1, max_size=64))
def test_any_extension_fails(plaintext: bytes, context: dict[str, str], extra: bytes) -> None:
    """Appending any bytes to an envelope makes decryption fail."""
    env = WRITER.encrypt(TENANT, PURPOSE, context, plaintext)
    assert _fails(WRITER, env + extra, context)
    assert _fails(READER, env + extra, context)


@st.composite
def changed_contexts(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str]]:
    """A context and a different one: a pair added, removed, or its key or value altered."""
    original = draw(contexts)
    how = draw(st.sampled_from(["add", "remove", "value", "key"] if original else ["add"]))
    changed = dict(original)
    if how == "add":
        key = draw(context_keys.filter(lambda k: k not in original))
        changed[key] = draw(context_values)
    else:
        key = draw(st.sampled_from(sorted(original)))
        if how == "remove":
            del changed[key]
        elif how == "value":
            changed[key] = draw(context_values.filter(lambda v: v != original[key]))
        else:
            new_key = draw(context_keys.filter(lambda k: k not in original))
            changed[new_key] = changed.pop(key)
    return original, changed


@FAST
@given(pair=changed_contexts(), plaintext=st.binary(max_size=256))
def test_any_context_change_fails(
    pair: tuple[dict[str, str], dict[str, str]], plaintext: bytes
) -> None:
    """Decrypting with a context that differs by one added, removed or altered pair fails."""
    original, changed = pair
    env = WRITER.encrypt(TENANT, PURPOSE, original, plaintext)
    assert _fails(WRITER, env, changed)
    assert _fails(READER, env, changed)


@FAST
@given(plaintext=st.binary(max_size=256), context=contexts)
def test_other_tenant_cannot_decrypt(plaintext: bytes, context: dict[str, str]) -> None:
    """A ciphertext of one tenant presented as another tenant fails with DecryptionFailed."""
    env = WRITER.encrypt(TENANT, PURPOSE, context, plaintext)
    assert _fails(WRITER, env, context, tenant=OTHER_TENANT)
    assert _fails(READER, env, context, tenant=OTHER_TENANT)


# ---------------------------------------------------------------------------- context encoding
#: Values built from NUL, digits and a few letters: the characters an ambiguous encoding would
#: confuse (lengths, separators).
adversarial_values = st.text(alphabet="\x000123456789ab", max_size=12)
adversarial_contexts = st.dictionaries(
    st.text(alphabet="ab01", min_size=1, max_size=3), adversarial_values, max_size=4
)
prefixes = st.tuples(
    st.text(alphabet="ab01-", min_size=1, max_size=4),
    st.text(alphabet="ab01-", min_size=1, max_size=4),
)


@settings(max_examples=300, deadline=None, database=None)
@given(a=st.tuples(prefixes, adversarial_contexts), b=st.tuples(prefixes, adversarial_contexts))
def test_context_encoding_is_injective(
    a: tuple[tuple[str, str], dict[str, str]], b: tuple[tuple[str, str], dict[str, str]]
) -> None:
    """Two different (tenant, purpose, context) never encode to the same AAD bytes."""
    (pa, ca), (pb, cb) = a, b
    ea = encode_context(aad_prefix(SUITE, *pa), ca)
    eb = encode_context(aad_prefix(SUITE, *pb), cb)
    if (pa, ca) != (pb, cb):
        assert ea != eb
    else:
        assert ea == eb


@settings(max_examples=300, deadline=None, database=None)
@given(prefix=prefixes, context=st.one_of(adversarial_contexts, contexts))
def test_context_encoding_decodes_back(prefix: tuple[str, str], context: dict[str, str]) -> None:
    """The AAD bytes parse back to exactly the tenant, purpose and context (so it is injective)."""
    aad = encode_context(aad_prefix(SUITE, *prefix), context)
    s = aad.decode()
    head = f"kg1\x00{int(SUITE)}\x00{prefix[0]}\x00{prefix[1]}"
    assert s.startswith(head)
    rest = s[len(head) :]
    decoded: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        assert rest[pos] == "\x00"
        key_end = rest.index("\x00", pos + 1)
        len_end = rest.index("\x00", key_end + 1)
        n = int(rest[key_end + 1 : len_end])
        decoded[rest[pos + 1 : key_end]] = rest[len_end + 1 : len_end + 1 + n]
        pos = len_end + 1 + n
    assert decoded == context
    assert list(decoded) == sorted(context)


# ---------------------------------------------------------------------------- text form
@FAST
@given(raw=st.binary(max_size=600))
def test_text_form_round_trip_any_bytes(raw: bytes) -> None:
    """to_text/from_text are inverse for any bytes; the text is kg1. plus base64url."""
    text = to_text(raw)
    assert text.startswith("kg1.")
    assert set(text[4:]) <= set(string.ascii_letters + string.digits + "-_")
    assert from_text(text) == raw


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.one_of(st.text(max_size=80), st.text(max_size=80).map(lambda t: "kg1." + t)))
def test_from_text_accepts_only_canonical_text(text: str) -> None:
    """from_text raises DecryptionFailed or returns bytes whose text form is the input."""
    try:
        raw = from_text(text)
    except DecryptionFailed:
        return
    assert to_text(raw) == text


@FAST
@given(
    raw=st.binary(min_size=1, max_size=300),
    junk=st.sampled_from(["=", "==", "+", "/", " ", "\n", "\t", "Ａ", "é", "\x00", "."]),
    data=st.data(),
)
def test_from_text_rejects_inserted_junk(raw: bytes, junk: str, data: st.DataObject) -> None:
    """Inserting padding, the standard alphabet, whitespace or non-ASCII anywhere is refused."""
    text = to_text(raw)
    pos = data.draw(st.integers(4, len(text)), label="position")
    with pytest.raises(DecryptionFailed):
        from_text(text[:pos] + junk + text[pos:])
