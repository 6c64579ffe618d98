"""PKCS#11 adapter: KEKs held in an HSM token wrap and unwrap data keys (python-pkcs11).

One :class:`Pkcs11Hsm` talks to one token through one logged-in session.  It connects lazily,
maps every PKCS#11 failure onto keygate's error tree and reconnects by itself after token
trouble, so constructing it never touches the token.

Wrap mechanisms (the ``WrapMechanism`` value is written into the envelope):

``HSM_AES_GCM``
    ``C_Encrypt`` with ``CKM_AES_GCM`` under the KEK: a fresh random 12-byte IV, the caller's
    ``aad`` as additional authenticated data, a 128-bit tag.  Output ``iv || ciphertext || tag``
    (60 bytes for a 32-byte DEK).
``HSM_AES_KWP`` / ``HSM_AES_KW``
    RFC 5649 / RFC 3394 key wrap with ``C_WrapKey``: the DEK is put into the token as a
    short-lived *session* secret-key object (extractable, usable for nothing) and wrapped by the
    KEK; unwrap creates a session object and reads its value back.  40 bytes for a 32-byte DEK.
    **The AAD is not bound** by key wrap: integrity comes from the RFC 3394 check block, and
    the binding to a tenant × purpose × version comes from the KEK itself, which is unique for
    each of them.  SoftHSM 2.6 refuses these mechanisms in ``C_Encrypt``/``C_Decrypt``
    (``CKR_MECHANISM_INVALID``; its mechanism info lists wrap/unwrap only), hence the key
    objects.  For RFC 5649 the v3.0 ``CKM_AES_KEY_WRAP_KWP`` is preferred when the token lists
    it; ``CKM_AES_KEY_WRAP_PAD`` is used only when the token's output has the RFC 5649 length
    (NSS softokn implements ``_PAD`` as PKCS#7 padding + RFC 3394, 48 bytes, and AWS CloudHSM
    documents PKCS#5 padding: such output is rejected by the connect-time probe).

Threads and processes: SoftHSM (and python-pkcs11, which calls ``C_Initialize`` without locking
arguments) must never be entered by two threads at once.  Every token call therefore runs under
one lock per loaded module; every :class:`Pkcs11Hsm` of the process that uses the same module
shares it, and waits at most ``lock_timeout_s`` for it.  For parallelism use processes.  A
forked child drops every inherited session (``os.register_at_fork``) and re-initialises the
module before its first call; bulk pools should still use the ``spawn`` start method, because a
network HSM client library may share sockets or threads with the parent across ``fork``.

Login state in PKCS#11 is per process and per token, so keep one :class:`Pkcs11Hsm` per token
per process.  A refused PIN is remembered and not retried (real HSMs lock or zeroise a partition
after a few wrong PINs) until a new :class:`Pkcs11Hsm` is built with a new configuration.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import pkcs11
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from keygate.core.errors import (
    ConfigurationError,
    DecryptionFailed,
    ProviderRejected,
    ProviderUnavailable,
)
from keygate.core.model import WrapMechanism

__all__ = [
    "DEK_LEN",
    "GCM_IV_LEN",
    "GCM_TAG_LEN",
    "HsmConfig",
    "Pkcs11Hsm",
    "kek_id",
    "load_pin",
]

log = logging.getLogger(__name__)

#: A DEK is an AES-256 key.
DEK_LEN: Final = 32
GCM_IV_LEN: Final = 12
GCM_TAG_LEN: Final = 16
_KW_BLOB_LEN: Final = DEK_LEN + 8
_GCM_BLOB_LEN: Final = GCM_IV_LEN + DEK_LEN + GCM_TAG_LEN
#: Seconds a caller should wait before retrying after token trouble.
RETRY_AFTER_S: Final = 1.0
_MAX_LABEL_LEN: Final = 128

_T = TypeVar("_T")

#: PKCS#11 mechanisms that implement each wrap mechanism, in order of preference.  The first one
#: the token lists *and* passes the probe at connect time is used.
_CANDIDATES: dict[WrapMechanism, tuple[Mechanism, ...]] = {
    WrapMechanism.HSM_AES_GCM: (Mechanism.AES_GCM,),
    WrapMechanism.HSM_AES_KWP: (Mechanism.AES_KEY_WRAP_KWP, Mechanism.AES_KEY_WRAP_PAD),
    WrapMechanism.HSM_AES_KW: (Mechanism.AES_KEY_WRAP,),
}
#: Auto-selection order when ``HsmConfig.mechanism`` is None.
_AUTO_ORDER: Final = (
    WrapMechanism.HSM_AES_GCM,
    WrapMechanism.HSM_AES_KWP,
    WrapMechanism.HSM_AES_KW,
)

#: The token, the session or the module is gone or broken: drop the session, reconnect later.
_TOKEN_TROUBLE: Final[tuple[type[p11.PKCS11Error], ...]] = (
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.DeviceMemory,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.SessionCount,
    p11.SlotIDInvalid,
    p11.UserNotLoggedIn,
    p11.FunctionCancelled,
    p11.HostMemory,
)
#: Could also mean a bad input (SoftHSM: a wrong GCM tag is CKR_GENERAL_ERROR): probe the token.
_AMBIGUOUS: Final[tuple[type[p11.PKCS11Error], ...]] = (p11.GeneralError, p11.FunctionFailed)
#: The KEK object handle is stale (destroyed, or the token changed under us).
_STALE_HANDLE: Final[tuple[type[p11.PKCS11Error], ...]] = (
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
    p11.WrappingKeyHandleInvalid,
    p11.UnwrappingKeyHandleInvalid,
)
#: A ciphertext the token refuses to decrypt or unwrap.
_BAD_CIPHERTEXT: Final[tuple[type[p11.PKCS11Error], ...]] = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.WrappedKeyInvalid,
    p11.WrappedKeyLenRange,
    p11.DataInvalid,
    p11.DataLenRange,
)
_LOGIN_REFUSED: Final[dict[type[p11.PKCS11Error], str]] = {
    p11.PinIncorrect: "PIN incorrect",
    p11.PinInvalid: "PIN invalid",
    p11.PinLenRange: "PIN length out of range",
    p11.PinLocked: "PIN locked",
    p11.PinExpired: "PIN expired",
    p11.UserPinNotInitialized: "user PIN not initialised",
}

# A per-process salt: PINs are compared as salted digests, never kept twice in plain form.
_PIN_SALT: Final = secrets.token_bytes(16)


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_SALT, pin.encode("utf-8"), hashlib.sha256).digest()


def kek_id(label: str) -> bytes:
    """The ``CKA_ID`` keygate gives the KEK labelled ``label``: 16 bytes of SHA-256."""
    return hashlib.sha256(b"keygate-kek\x00" + label.encode("utf-8")).digest()[:16]


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class HsmConfig:
    """Where the token is and how to use it.  The PIN never appears in ``repr``."""

    module_path: str
    token_label: str
    pin: str = field(repr=False)
    #: None = auto: HSM_AES_GCM if the token can do CKM_AES_GCM encrypt/decrypt, else
    #: HSM_AES_KWP (RFC 5649), else HSM_AES_KW (RFC 3394).
    mechanism: WrapMechanism | None = None
    lock_timeout_s: float = 5.0
    reconnect_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.module_path:
            raise ConfigurationError("HSM module_path is empty")
        if not self.token_label:
            raise ConfigurationError("HSM token_label is empty")
        pin: object = self.pin
        if not isinstance(pin, str) or not pin:
            raise ConfigurationError(f"HSM PIN for token {self.token_label!r} is empty")
        if self.mechanism is not None and self.mechanism not in _CANDIDATES:
            raise ConfigurationError(
                f"HSM mechanism must be one of {_names(_CANDIDATES)} or None (auto)"
            )
        if not self.lock_timeout_s > 0:
            raise ConfigurationError("HSM lock_timeout_s must be positive")
        if not self.reconnect_interval_s >= 0:
            raise ConfigurationError("HSM reconnect_interval_s must not be negative")

    def __getstate__(self) -> NoReturn:
        raise TypeError(
            "HsmConfig holds a PIN and cannot be pickled; build it in the worker with load_pin()"
        )


def load_pin(*, env: str = "KEYGATE_HSM_PIN", file_env: str = "KEYGATE_HSM_PIN_FILE") -> str:
    """Read the HSM user PIN from the file named by ``file_env`` or else from ``env``.

    The file wins when both are set; one trailing newline (``\\n`` or ``\\r\\n``) is removed.
    Raises :class:`ConfigurationError` naming the variables (never a value) when neither gives
    a non-empty PIN.
    """
    path = os.environ.get(file_env)
    if path:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the HSM PIN file named by {file_env} ({path}): {exc.strerror}"
            ) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(
                f"the HSM PIN file named by {file_env} ({path}) is not UTF-8"
            ) from None
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        if not text:
            raise ConfigurationError(f"the HSM PIN file named by {file_env} ({path}) is empty")
        _warn_if_readable_by_others(Path(path), file_env)
        return text
    pin = os.environ.get(env)
    if pin:
        return pin
    raise ConfigurationError(f"no HSM PIN configured: set {file_env} (a file) or {env}")


def _warn_if_readable_by_others(path: Path, file_env: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:  # pragma: no cover - the file was just read
        return
    if mode & 0o077:
        log.warning(
            "HSM PIN file named by %s is accessible to group or others (mode %o); use 0600",
            file_env,
            mode & 0o777,
        )


# --------------------------------------------------------------------------------------------
# Process-wide state of one PKCS#11 module


class _Module:
    """One loaded PKCS#11 module: the lock every token call takes, and its init generation.

    ``generation`` grows on every ``C_Finalize``/``C_Initialize`` (and after ``fork``): a
    session opened under an older generation is dead and is dropped without being closed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.lib: Any = None
        self.generation = 0
        self.needs_reinit = False
        #: token label -> salted digest of the PIN this process logged in with
        self.logins: dict[str, bytes] = {}
        #: token label -> sessions opened by live Pkcs11Hsm instances
        self.open_sessions: dict[str, int] = {}
        #: token label -> sessions of closed instances left open because others share the login
        self.orphans: dict[str, list[Any]] = {}

    def load(self) -> Any:
        if self.lib is None:
            self.lib = pkcs11.lib(self.path)
            self.needs_reinit = False
        elif self.needs_reinit:
            self.reinitialize()
        return self.lib

    def reinitialize(self) -> None:
        """``C_Finalize`` then ``C_Initialize``: new tokens become visible, all sessions die."""
        self._forget_sessions()
        lib = self.lib
        if lib.initialized:
            try:
                lib.finalize()
            except p11.PKCS11Error as exc:
                log.debug("C_Finalize of %s failed (%s); initialising anyway", self.path, _ckr(exc))
        lib.initialize()
        self.needs_reinit = False
        log.info("PKCS#11 module %s re-initialised", self.path)

    def reset_after_fork(self) -> None:
        # Never call the module here: the child re-initialises it before its first use.
        self.lock = threading.Lock()
        self._forget_sessions()
        self.needs_reinit = self.lib is not None

    def _forget_sessions(self) -> None:
        self.generation += 1
        self.logins.clear()
        self.open_sessions.clear()
        self.orphans.clear()


class _Registry:
    """Every loaded module of the process, by path."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.modules: dict[str, _Module] = {}

    def get(self, path: str) -> _Module:
        with self.lock:
            module = self.modules.get(path)
            if module is None:
                module = self.modules[path] = _Module(path)
            return module

    def after_fork_in_child(self) -> None:
        self.lock = threading.Lock()
        for module in self.modules.values():
            module.reset_after_fork()


_REGISTRY: Final = _Registry()
os.register_at_fork(after_in_child=_REGISTRY.after_fork_in_child)


def _ckr(exc: BaseException) -> str:
    """A safe name for a PKCS#11 error: its class (never its arguments)."""
    return type(exc).__name__


# --------------------------------------------------------------------------------------------
# The adapter


class _KekNotFoundError(Exception):
    pass


class _NotPermittedError(Exception):
    """The key object lacks a capability (python-pkcs11 builds methods from CKA_ENCRYPT…)."""


def _method(key: Any, name: str) -> Any:
    method = getattr(key, name, None)
    if method is None:
        raise _NotPermittedError(name.removesuffix("_key"))
    return method


class Pkcs11Hsm:
    """KEKs in one PKCS#11 token; wraps and unwraps DEKs with them.  Thread-safe."""

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        self._module = _REGISTRY.get(config.module_path)
        self._pin_digest = _pin_digest(config.pin)
        self._session: Any = None
        self._token: Any = None
        self._generation = -1
        self._keks: dict[str, Any] = {}
        #: (object class, label) -> handle of the audit keys (signing key pair, HMAC key)
        self._objects: dict[tuple[ObjectClass, str], Any] = {}
        #: PKCS#11 mechanism for every wrap mechanism this token passed the probe for
        self._ckm: dict[WrapMechanism, Mechanism] = {}
        self._mechanism: WrapMechanism | None = None
        self._next_connect = 0.0
        self._login_refused: str | None = None
        #: (is a configuration error, message) of the last failed connect, for the back-off
        self._connect_error: tuple[bool, str] | None = None
        self._calls = 0
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"Pkcs11Hsm(module_path={self._config.module_path!r}, "
            f"token_label={self._config.token_label!r}, connected={self._session is not None})"
        )

    def __getstate__(self) -> NoReturn:
        raise TypeError("Pkcs11Hsm holds a logged-in HSM session and cannot be pickled")

    def __enter__(self) -> Pkcs11Hsm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- public API -------------------------------------------------------------------------

    @property
    def config(self) -> HsmConfig:
        return self._config

    @property
    def calls(self) -> int:
        """Logical HSM operations (wrap, unwrap, create, destroy) attempted since start."""
        return self._calls

    @property
    def mechanism(self) -> WrapMechanism:
        """The configured or negotiated wrap mechanism (connects if needed)."""
        with self._locked("mechanism"):
            self._ensure_session()
            return self._negotiated()

    def create_kek(self, label: str) -> None:
        """Generate a new AES-256 KEK in the token: sensitive, never extractable."""
        _check_label(label)
        with self._locked("create"):
            session = self._ensure_session()
            self._calls += 1

            def create() -> None:
                if self._find(label, missing_ok=True) is not None:
                    raise ProviderRejected(
                        f"a KEK labelled {label!r} already exists on HSM token "
                        f"{self._config.token_label!r}"
                    )
                key = session.generate_key(
                    KeyType.AES,
                    256,
                    id=kek_id(label),
                    label=label,
                    store=True,
                    capabilities=(
                        MechanismFlag.ENCRYPT
                        | MechanismFlag.DECRYPT
                        | MechanismFlag.WRAP
                        | MechanismFlag.UNWRAP
                    ),
                    template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                    },
                )
                self._keks[label] = key

            self._run("create", label, create)
            log.info("created KEK %r on HSM token %r", label, self._config.token_label)

    def destroy_kek(self, label: str) -> None:
        """Destroy the KEK: every DEK it wrapped becomes unrecoverable (crypto-shredding)."""
        _check_label(label)
        with self._locked("destroy"):
            self._ensure_session()
            self._calls += 1

            def destroy() -> None:
                self._find(label).destroy()
                self._keks.pop(label, None)

            self._run("destroy", label, destroy)
            log.info("destroyed KEK %r on HSM token %r", label, self._config.token_label)

    def kek_exists(self, label: str) -> bool:
        """Whether the token holds a KEK with this label (ProviderUnavailable if unreachable)."""
        _check_label(label)
        with self._locked("lookup"):
            self._ensure_session()
            return (
                self._run("lookup", label, lambda: self._find(label, missing_ok=True)) is not None
            )

    def wrap_dek(self, label: str, dek: bytes, *, aad: bytes) -> tuple[WrapMechanism, bytes]:
        """Wrap a 32-byte DEK under the KEK; returns the mechanism used and the wrapped bytes."""
        _check_label(label)
        dek = _as_bytes(dek, "dek")
        aad = _as_bytes(aad, "aad")
        if len(dek) != DEK_LEN:
            raise ValueError(f"dek must be {DEK_LEN} bytes")
        with self._locked("wrap"):
            session = self._ensure_session()
            mechanism = self._negotiated()
            ckm = self._ckm[mechanism]
            self._calls += 1

            def wrap() -> bytes:
                kek = self._find(label)
                if mechanism is WrapMechanism.HSM_AES_GCM:
                    return _gcm_encrypt(kek, dek, aad)
                return _kw_wrap(session, kek, ckm, dek)

            blob = self._run("wrap", label, wrap)
            expected = _GCM_BLOB_LEN if mechanism is WrapMechanism.HSM_AES_GCM else _KW_BLOB_LEN
            if len(blob) != expected:
                raise ProviderRejected(
                    f"HSM token {self._config.token_label!r} returned {len(blob)} bytes for "
                    f"{mechanism.name} with KEK {label!r} (expected {expected})"
                )
            log.debug("wrapped a DEK with KEK %r (%s)", label, mechanism.name)
            return mechanism, blob

    def unwrap_dek(
        self, label: str, mechanism: WrapMechanism, wrapped: bytes, *, aad: bytes
    ) -> bytes:
        """Unwrap a DEK; DecryptionFailed for a wrong, tampered or foreign blob or AAD."""
        _check_label(label)
        mechanism = WrapMechanism(mechanism)
        if mechanism not in _CANDIDATES:
            raise ValueError(f"{mechanism.name} is not an HSM wrap mechanism")
        wrapped = _as_bytes(wrapped, "wrapped")
        aad = _as_bytes(aad, "aad")
        expected = _GCM_BLOB_LEN if mechanism is WrapMechanism.HSM_AES_GCM else _KW_BLOB_LEN
        if len(wrapped) != expected:
            raise DecryptionFailed()
        with self._locked("unwrap"):
            self._ensure_session()
            ckm = self._ckm.get(mechanism)
            if ckm is None:
                raise ProviderRejected(
                    f"HSM token {self._config.token_label!r} does not support {mechanism.name}"
                )
            self._calls += 1

            def unwrap() -> bytes:
                kek = self._find(label)
                if mechanism is WrapMechanism.HSM_AES_GCM:
                    return _gcm_decrypt(kek, wrapped, aad)
                return _kw_unwrap(kek, ckm, wrapped)

            dek = self._run("unwrap", label, unwrap, decrypting=True)
            if len(dek) != DEK_LEN:
                raise DecryptionFailed()
            log.debug("unwrapped a DEK with KEK %r (%s)", label, mechanism.name)
            return dek

    # -- audit keys: checkpoint signing (ECDSA P-256) and record-id pseudonyms (HMAC) ---------

    def create_signing_key(self, label: str) -> None:
        """Generate an ECDSA P-256 key pair; the private key is sensitive and not extractable."""
        _check_label(label)
        with self._locked("create signing key"):
            session = self._ensure_session()
            self._calls += 1

            def create() -> None:
                if self._find_object(ObjectClass.PRIVATE_KEY, label) is not None:
                    raise ProviderRejected(
                        f"a signing key labelled {label!r} already exists on HSM token "
                        f"{self._config.token_label!r}"
                    )
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                    local=True,
                )
                public, private = params.generate_keypair(
                    id=kek_id(label),
                    label=label,
                    store=True,
                    public_template={
                        Attribute.TOKEN: True,
                        Attribute.VERIFY: True,
                        Attribute.ENCRYPT: False,
                        Attribute.WRAP: False,
                    },
                    private_template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.SIGN: True,
                        Attribute.DECRYPT: False,
                        Attribute.UNWRAP: False,
                        Attribute.DERIVE: False,
                    },
                )
                self._objects[ObjectClass.PUBLIC_KEY, label] = public
                self._objects[ObjectClass.PRIVATE_KEY, label] = private

            self._run("create signing key", None, create)
            log.info("created signing key %r on HSM token %r", label, self._config.token_label)

    def signing_key_exists(self, label: str) -> bool:
        """Whether the token holds the private key of a signing key pair labelled ``label``."""
        _check_label(label)
        with self._locked("lookup"):
            self._ensure_session()
            found = self._run(
                "lookup", None, lambda: self._find_object(ObjectClass.PRIVATE_KEY, label)
            )
            return found is not None

    def sign(self, label: str, data: bytes) -> bytes:
        """ECDSA P-256 with SHA-256 over ``data``; returns the DER-encoded signature.

        The digest is computed here and signed with ``CKM_ECDSA`` (SoftHSM 2.6 and several
        network HSMs do not offer ``CKM_ECDSA_SHA256``); the result is the same signature.
        """
        _check_label(label)
        digest = hashlib.sha256(_as_bytes(data, "data")).digest()
        with self._locked("sign"):
            self._ensure_session()
            self._calls += 1

            def sign() -> bytes:
                key = self._require_object(ObjectClass.PRIVATE_KEY, label)
                raw: bytes = _method(key, "sign")(digest, mechanism=Mechanism.ECDSA)
                return raw

            raw = self._run("sign", None, sign)
        if len(raw) != 64:
            raise ProviderRejected(
                f"HSM token {self._config.token_label!r} returned a {len(raw)}-byte ECDSA "
                f"signature with key {label!r} (expected 64)"
            )
        der: bytes = encode_ecdsa_signature(raw)
        return der

    def public_key_pem(self, label: str) -> bytes:
        """The public half of the signing key pair as a PEM ``PUBLIC KEY`` (SPKI)."""
        _check_label(label)
        with self._locked("public key"):
            self._ensure_session()

            def read() -> bytes:
                der: bytes = encode_ec_public_key(
                    self._require_object(ObjectClass.PUBLIC_KEY, label)
                )
                return der

            der = self._run("public key", None, read)
        body = base64.encodebytes(der).decode("ascii").replace("\n", "")
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return (
            "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"
        ).encode()

    def create_hmac_key(self, label: str) -> None:
        """Generate a 256-bit generic secret for HMAC-SHA256: sensitive, not extractable."""
        _check_label(label)
        with self._locked("create hmac key"):
            session = self._ensure_session()
            self._calls += 1

            def create() -> None:
                if self._find_object(ObjectClass.SECRET_KEY, label) is not None:
                    raise ProviderRejected(
                        f"a secret key labelled {label!r} already exists on HSM token "
                        f"{self._config.token_label!r}"
                    )
                key = session.generate_key(
                    KeyType.GENERIC_SECRET,
                    256,
                    id=kek_id(label),
                    label=label,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.ENCRYPT: False,
                        Attribute.DECRYPT: False,
                        Attribute.WRAP: False,
                        Attribute.UNWRAP: False,
                        Attribute.DERIVE: False,
                    },
                )
                self._objects[ObjectClass.SECRET_KEY, label] = key

            self._run("create hmac key", None, create)
            log.info("created HMAC key %r on HSM token %r", label, self._config.token_label)

    def hmac_key_exists(self, label: str) -> bool:
        """Whether the token holds a secret key labelled ``label``."""
        _check_label(label)
        with self._locked("lookup"):
            self._ensure_session()
            found = self._run(
                "lookup", None, lambda: self._find_object(ObjectClass.SECRET_KEY, label)
            )
            return found is not None

    def hmac_sha256(self, label: str, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under the secret key ``label`` (``C_Sign``, CKM_SHA256_HMAC)."""
        _check_label(label)
        data = _as_bytes(data, "data")
        with self._locked("hmac"):
            self._ensure_session()
            self._calls += 1

            def mac() -> bytes:
                key = self._require_object(ObjectClass.SECRET_KEY, label)
                out: bytes = _method(key, "sign")(data, mechanism=Mechanism.SHA256_HMAC)
                return out

            out = self._run("hmac", None, mac)
        if len(out) != 32:
            raise ProviderRejected(
                f"HSM token {self._config.token_label!r} returned a {len(out)}-byte HMAC"
            )
        return out

    def check(self) -> None:
        """Health probe: raises ProviderUnavailable unless the token answers now."""
        with self._locked("check"):
            self._ensure_session()

            def probe() -> None:
                self._token.slot.get_token()  # C_GetTokenInfo: is the token there?
                self._session.generate_random(64)  # is our session alive?

            self._run("check", None, probe)

    def close(self) -> None:
        """Close the session (log out when no other instance shares the login).  Idempotent."""
        with self._locked("close"):
            self._closed = True
            self._release_session()

    # -- connection -------------------------------------------------------------------------

    @contextmanager
    def _locked(self, op: str) -> Iterator[None]:
        if self._closed and op != "close":
            raise RuntimeError("this Pkcs11Hsm is closed")
        lock = self._module.lock
        if not lock.acquire(timeout=self._config.lock_timeout_s):
            raise ProviderUnavailable(
                f"HSM token {self._config.token_label!r} busy: {op} waited more than "
                f"{self._config.lock_timeout_s:g}s for the token lock",
                retry_after=RETRY_AFTER_S,
            )
        try:
            yield
        finally:
            lock.release()

    def _ensure_session(self) -> Any:
        module = self._module
        if self._session is not None:
            if self._generation == module.generation:
                return self._session
            # The module was re-initialised (by us, another instance or fork): the session is
            # gone.  Reconnecting now is routine, not a failure, so no back-off.
            self._forget_session()
            self._next_connect = 0.0
        label = self._config.token_label
        if self._login_refused is not None:
            raise ProviderRejected(
                f"HSM login to token {label!r} was refused earlier ({self._login_refused}); "
                "not retried until the PIN is reconfigured"
            )
        now = time.monotonic()
        if now < self._next_connect:
            last = self._connect_error
            if last is not None and last[0]:
                raise ConfigurationError(last[1])
            raise ProviderUnavailable(
                f"HSM token {label!r} unavailable; reconnecting"
                + (f" (last error: {last[1]})" if last is not None else ""),
                retry_after=RETRY_AFTER_S,
            )
        self._next_connect = now + self._config.reconnect_interval_s
        try:
            session = self._connect()
        except (ConfigurationError, ProviderUnavailable) as exc:
            # Kept as text: a stored exception would keep its frames (and token objects) alive.
            self._connect_error = (isinstance(exc, ConfigurationError), exc.detail)
            raise
        self._connect_error = None
        return session

    def _connect(self) -> Any:
        module = self._module
        label = self._config.token_label
        log.debug("connecting to HSM token %r via %s", label, module.path)
        # A module loaded or re-initialised just now already shows every token there is.
        fresh = module.lib is None or module.needs_reinit
        try:
            lib = module.load()
            try:
                token = self._get_token(lib)
            except p11.NoSuchToken:
                if fresh:
                    raise
                # The slot list is read at C_Initialize: re-initialise once so that a token that
                # appeared (or came back) since then is seen.
                module.reinitialize()
                token = self._get_token(lib)
        except p11.NoSuchToken as exc:
            module.needs_reinit = True
            raise ProviderUnavailable(
                f"HSM token {label!r} not found in module {module.path}",
                retry_after=RETRY_AFTER_S,
            ) from exc
        except p11.MultipleTokensReturned as exc:
            raise ConfigurationError(f"several HSM tokens are labelled {label!r}") from exc
        except p11.PKCS11Error as exc:
            module.needs_reinit = module.lib is not None
            raise ProviderUnavailable(
                f"cannot use PKCS#11 module {module.path} for HSM token {label!r} ({_ckr(exc)})",
                retry_after=RETRY_AFTER_S,
            ) from exc
        session = self._login(token)
        try:
            self._negotiate(token, session)
        except ConfigurationError:
            self._dispose(session)
            raise
        except p11.PKCS11Error as exc:
            module.needs_reinit = True
            raise ProviderUnavailable(
                f"HSM token {label!r} unavailable while probing mechanisms ({_ckr(exc)})",
                retry_after=RETRY_AFTER_S,
            ) from exc
        self._token = token
        self._session = session
        self._generation = module.generation
        module.open_sessions[label] = module.open_sessions.get(label, 0) + 1
        log.info("connected to HSM token %r (wrap mechanism %s)", label, self._negotiated().name)
        return session

    def _negotiated(self) -> WrapMechanism:
        if self._mechanism is None:  # pragma: no cover - every successful connect sets it
            raise RuntimeError("no wrap mechanism negotiated")
        return self._mechanism

    def _get_token(self, lib: Any) -> Any:
        return lib.get_token(token_label=self._config.token_label)

    def _login(self, token: Any) -> Any:
        module = self._module
        label = self._config.token_label
        try:
            session = token.open(rw=True, user_pin=self._config.pin)
        except p11.UserAlreadyLoggedIn:
            # Login state is per process: another instance (or the application) is logged in.
            # The session inherits it.  Refuse a PIN other than the one that logged in.
            known = module.logins.get(label)
            if known is not None and not hmac.compare_digest(known, self._pin_digest):
                self._login_refused = "PIN incorrect"
                raise ProviderRejected(
                    f"HSM login to token {label!r} refused: PIN incorrect"
                ) from None
            try:
                session = token.open(rw=True)
            except p11.PKCS11Error as exc:
                module.needs_reinit = True
                raise ProviderUnavailable(
                    f"cannot open a session on HSM token {label!r} ({_ckr(exc)})",
                    retry_after=RETRY_AFTER_S,
                ) from exc
        except p11.PKCS11Error as exc:
            reason = _LOGIN_REFUSED.get(type(exc))
            if reason is not None:
                self._login_refused = reason
                log.warning("HSM login to token %r refused: %s", label, reason)
                raise ProviderRejected(f"HSM login to token {label!r} refused: {reason}") from exc
            module.needs_reinit = True
            raise ProviderUnavailable(
                f"cannot open a session on HSM token {label!r} ({_ckr(exc)})",
                retry_after=RETRY_AFTER_S,
            ) from exc
        module.logins.setdefault(label, self._pin_digest)
        return session

    def _negotiate(self, token: Any, session: Any) -> None:
        listed = set(token.slot.get_mechanisms())
        supported: dict[WrapMechanism, Mechanism] = {}
        for mechanism in _AUTO_ORDER:
            for ckm in _CANDIDATES[mechanism]:
                if ckm in listed and _probe(session, mechanism, ckm):
                    supported[mechanism] = ckm
                    break
        label = self._config.token_label
        pinned = self._config.mechanism
        if pinned is not None:
            if pinned not in supported:
                raise ConfigurationError(
                    f"HSM token {label!r} does not support the configured wrap mechanism "
                    f"{pinned.name}; supported: {_names(supported) or 'none'}"
                )
            chosen = pinned
        else:
            found = next((m for m in _AUTO_ORDER if m in supported), None)
            if found is None:
                raise ConfigurationError(
                    f"HSM token {label!r} supports none of the wrap mechanisms "
                    f"{_names(dict.fromkeys(_AUTO_ORDER))}"
                )
            chosen = found
        self._ckm = supported
        self._mechanism = chosen

    def _forget_session(self) -> None:
        """Drop the session without calling the token (it is dead or belongs to a parent)."""
        self._session = None
        self._token = None
        self._keks.clear()
        self._objects.clear()

    def _drop_broken_session(self) -> None:
        """After token trouble: forget the session and re-initialise before reconnecting."""
        module = self._module
        if self._session is not None and self._generation == module.generation:
            label = self._config.token_label
            module.open_sessions[label] = max(0, module.open_sessions.get(label, 0) - 1)
        self._forget_session()
        module.needs_reinit = True

    def _release_session(self) -> None:
        module = self._module
        session = self._session
        if session is None or self._generation != module.generation:
            self._forget_session()
            return
        label = self._config.token_label
        module.open_sessions[label] = module.open_sessions.get(label, 0) - 1
        self._dispose(session)
        self._forget_session()

    def _dispose(self, session: Any) -> None:
        """Close a session that is not counted in ``open_sessions`` (any more)."""
        module = self._module
        label = self._config.token_label
        if module.open_sessions.get(label, 0) > 0:
            # C_Logout is process-wide: closing ours would log every other instance out.
            module.orphans.setdefault(label, []).append(session)
            return
        module.open_sessions.pop(label, None)
        for other in [*module.orphans.pop(label, []), session]:
            self._close_quietly(other)
        module.logins.pop(label, None)

    @staticmethod
    def _close_quietly(session: Any) -> None:
        try:
            session.close()
        except p11.PKCS11Error as exc:
            log.debug("closing an HSM session failed (%s)", _ckr(exc))

    # -- calls ------------------------------------------------------------------------------

    def _find(self, label: str, *, missing_ok: bool = False) -> Any:
        key = self._keks.get(label)
        if key is not None:
            return key
        # python-pkcs11 0.9.4: if C_FindObjectsInit itself fails (dead session), the search
        # object stays "active" and its finaliser later calls C_FindObjectsFinal and reports an
        # ignored exception.  Finds are rare (handles are cached per session), and a session is
        # checked for staleness before every call, so this needs a device to vanish mid-call.
        found = list(
            self._session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.LABEL: label,
                    Attribute.TOKEN: True,
                }
            )
        )
        if len(found) > 1:
            raise ProviderRejected(
                f"several KEKs are labelled {label!r} on HSM token {self._config.token_label!r}"
            )
        if not found:
            # An empty search also happens when the token's storage vanished under a live
            # session (SoftHSM): only trust it if the token still answers.
            self._token.slot.get_token()
            if missing_ok:
                return None
            raise _KekNotFoundError(label)
        key = found[0]
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            log.warning(
                "KEK %r on HSM token %r is extractable or not sensitive",
                label,
                self._config.token_label,
            )
        self._keks[label] = key
        return key

    def _find_object(self, object_class: ObjectClass, label: str) -> Any:
        """The token object of this class and label, or None; several are an error."""
        cached = self._objects.get((object_class, label))
        if cached is not None:
            return cached
        found = list(
            self._session.get_objects(
                {Attribute.CLASS: object_class, Attribute.LABEL: label, Attribute.TOKEN: True}
            )
        )
        if len(found) > 1:
            raise ProviderRejected(
                f"several {object_class.name} objects are labelled {label!r} on HSM token "
                f"{self._config.token_label!r}"
            )
        if not found:
            self._token.slot.get_token()  # an empty search only counts if the token answers
            return None
        self._objects[object_class, label] = found[0]
        return found[0]

    def _require_object(self, object_class: ObjectClass, label: str) -> Any:
        found = self._find_object(object_class, label)
        if found is None:
            raise ProviderRejected(
                f"no {object_class.name} labelled {label!r} on HSM token "
                f"{self._config.token_label!r}"
            )
        return found

    def _run(
        self, op: str, label: str | None, fn: Callable[[], _T], *, decrypting: bool = False
    ) -> _T:
        """Call the token and map its errors; retry once after a stale KEK handle."""
        token_label = self._config.token_label
        target = f" with KEK {label!r}" if label is not None else ""
        for attempt in (0, 1):
            try:
                return fn()
            except _KekNotFoundError:
                raise ProviderRejected(
                    f"no KEK labelled {label!r} on HSM token {token_label!r}"
                ) from None
            except _NotPermittedError as exc:
                raise ProviderRejected(
                    f"HSM token {token_label!r} refused {op}{target}: the key may not {exc}"
                ) from None
            except _STALE_HANDLE as exc:
                if label is not None:
                    self._keks.pop(label, None)
                self._objects.clear()
                if attempt == 0 and self._token_answers():
                    continue
                self._raise_unavailable(op, exc)
            except _TOKEN_TROUBLE as exc:
                self._raise_unavailable(op, exc)
            except _AMBIGUOUS as exc:
                if not self._token_answers():
                    self._raise_unavailable(op, exc)
                if decrypting:
                    raise DecryptionFailed() from exc
                raise ProviderRejected(
                    f"HSM token {token_label!r} failed {op}{target} ({_ckr(exc)})"
                ) from exc
            except _BAD_CIPHERTEXT as exc:
                if decrypting:
                    raise DecryptionFailed() from exc
                raise ProviderRejected(
                    f"HSM token {token_label!r} refused {op}{target} ({_ckr(exc)})"
                ) from exc
            except p11.PKCS11Error as exc:
                # Mechanism, template, attribute or permission refusals: not retryable.
                raise ProviderRejected(
                    f"HSM token {token_label!r} refused {op}{target} ({_ckr(exc)})"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _token_answers(self) -> bool:
        try:
            self._token.slot.get_token()
            self._session.generate_random(64)
        except p11.PKCS11Error:
            return False
        return True

    def _raise_unavailable(self, op: str, exc: p11.PKCS11Error) -> NoReturn:
        label = self._config.token_label
        log.warning("HSM token %r failed %s (%s); will reconnect", label, op, _ckr(exc))
        self._drop_broken_session()
        raise ProviderUnavailable(
            f"HSM token {label!r} unavailable during {op} ({_ckr(exc)})", retry_after=RETRY_AFTER_S
        ) from exc


# --------------------------------------------------------------------------------------------
# Mechanism implementations (called with the lock held)

_DEK_TEMPLATE: Final = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}


def _gcm_encrypt(kek: Any, dek: bytes, aad: bytes) -> bytes:
    iv = secrets.token_bytes(GCM_IV_LEN)
    out: bytes = _method(kek, "encrypt")(
        dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, 128)
    )
    # Some HSMs (AWS CloudHSM) ignore the caller's IV and write their own into pIv, which
    # python-pkcs11 points at ``iv``'s buffer: so ``iv`` is read only after the call.
    return iv + out


def _gcm_decrypt(kek: Any, wrapped: bytes, aad: bytes) -> bytes:
    iv, body = wrapped[:GCM_IV_LEN], wrapped[GCM_IV_LEN:]
    out: bytes = _method(kek, "decrypt")(
        body, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, 128)
    )
    return out


def _kw_wrap(session: Any, kek: Any, ckm: Mechanism, dek: bytes) -> bytes:
    tmp = session.create_object(
        {
            **_DEK_TEMPLATE,
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: dek,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,
        }
    )
    try:
        out: bytes = _method(kek, "wrap_key")(tmp, mechanism=ckm)
    finally:
        tmp.destroy()
    return out


def _kw_unwrap(kek: Any, ckm: Mechanism, wrapped: bytes) -> bytes:
    tmp = _method(kek, "unwrap_key")(
        ObjectClass.SECRET_KEY,
        KeyType.AES,
        wrapped,
        mechanism=ckm,
        store=False,
        capabilities=MechanismFlag(0),
        template={**_DEK_TEMPLATE, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    try:
        out: bytes = tmp[Attribute.VALUE]
    finally:
        tmp.destroy()
    return out


def _probe(session: Any, mechanism: WrapMechanism, ckm: Mechanism) -> bool:
    """Try ``ckm`` with throw-away session keys.  Token trouble propagates; refusals say no."""
    objects: list[Any] = []
    try:
        if mechanism is WrapMechanism.HSM_AES_GCM:
            key = session.generate_key(
                KeyType.AES,
                256,
                store=False,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            )
            objects.append(key)
            plain = secrets.token_bytes(DEK_LEN)
            blob = _gcm_encrypt(key, plain, b"keygate-probe")
            return len(blob) == _GCM_BLOB_LEN and _gcm_decrypt(key, blob, b"keygate-probe") == plain
        kek = session.generate_key(
            KeyType.AES, 256, store=False, capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP
        )
        objects.append(kek)
        plain = secrets.token_bytes(DEK_LEN)
        blob = _kw_wrap(session, kek, ckm, plain)
        # RFC 3394 and RFC 5649 both give 40 bytes for a 32-byte key; the PKCS#7-padded
        # variants some tokens ship as CKM_AES_KEY_WRAP_PAD give 48.
        return len(blob) == _KW_BLOB_LEN and _kw_unwrap(kek, ckm, blob) == plain
    except _TOKEN_TROUBLE:
        raise
    except (p11.PKCS11Error, _NotPermittedError) as exc:
        log.debug("HSM mechanism probe %s via %s failed (%s)", mechanism.name, ckm.name, _ckr(exc))
        return False
    finally:
        for obj in objects:
            try:
                obj.destroy()
            except p11.PKCS11Error:
                log.debug("destroying an HSM probe key failed")


# --------------------------------------------------------------------------------------------
# Helpers


def _names(mechanisms: dict[WrapMechanism, Any]) -> str:
    return ", ".join(m.name for m in mechanisms)


def _check_label(label: object) -> None:
    if not isinstance(label, str) or not label:
        raise ValueError("KEK label must be a non-empty string")
    if len(label) > _MAX_LABEL_LEN or not label.isprintable():
        raise ValueError(f"KEK label must be printable and at most {_MAX_LABEL_LEN} characters")


def _as_bytes(value: object, name: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{name} must be bytes")
