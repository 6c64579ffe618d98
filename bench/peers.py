"""In-process peers on the same records as keygate: Tink's envelope AEAD and the AWS Encryption SDK.

Each peer is optional: when its package is missing it is skipped with one line saying so.  OpenBao
transit is a peer too, but over HTTP: see bench/http.py.

What is measured, per record (1 KiB and 64 B, the first records of the in-process run's inputs):

- ``tink-envelope``: ``tink.aead.KmsEnvelopeAead(AES256_GCM template, kek)`` where ``kek`` is a
  local Tink AES256_GCM primitive standing in for the KMS: every encrypt makes a fresh DEK, wraps
  it with the KEK (one local AES-GCM) and encrypts the record; decrypt unwraps and decrypts.  The
  associated data is ``b"131016/resident"`` (keygate binds tenant and purpose as AAD too).
- ``tink-aes-gcm``: Tink's own AES256_GCM primitive, one key, no envelope (Tink's plain loop).
- ``esdk-keyring-signed`` / ``esdk-keyring-unsigned``: the AWS Encryption SDK
  (``EncryptionSDKClient``, REQUIRE_ENCRYPT_REQUIRE_DECRYPT) with a raw AES keyring from the
  Material Providers Library (``create_raw_aes_keyring``, AES256-GCM wrapping), one message per
  record, its default committing signed suite (AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384) and
  the unsigned committing suite (AES_256_GCM_HKDF_SHA512_COMMIT_KEY); encryption context
  ``{"tenant": "131016", "purpose": "resident"}``.
- ``esdk-rawkey-signed`` / ``esdk-rawkey-unsigned``: the same with the SDK's legacy raw AES master
  key (``RawMasterKey``, AES_256_GCM_IV12_TAG16_NO_PADDING), which the SDK runs without the Dafny
  Material Providers Library: the same message format, a faster path.

Rounds are sized by a short untimed calibration so that one round takes about ``target_s``
(the slow peers measure fewer records, never more than the in-process run's records).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PEERS", "PeerRow", "run_peers"]

AAD = b"131016/resident"
ESDK_CONTEXT = {"tenant": "131016", "purpose": "resident"}

Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


@dataclass
class PeerRow:
    peer: str
    label: str
    op: str
    size: int
    n: int
    round_s: list[float] = field(default_factory=list)
    #: name -> keygate-or-plain rate the row is compared with (records/s)
    compare: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        from bench.runner import size_label

        return f"peer/{self.peer}/{self.op}/{size_label(self.size)}"

    @property
    def rate(self) -> float:
        return self.n / statistics.median(self.round_s)

    @property
    def mb_s(self) -> float:
        return self.rate * self.size / 1e6

    def ratios(self) -> dict[str, float]:
        """keygate (or plain) rate / this peer's rate."""
        return {k: v / self.rate for k, v in self.compare.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "peer",
            "peer": self.peer,
            "label": self.label,
            "op": self.op,
            "record_bytes": self.size,
            "records_per_round": self.n,
            "rounds": len(self.round_s),
            "round_seconds": self.round_s,
            "records_per_s": self.rate,
            "mb_per_s": self.mb_s,
            "compared_rates": self.compare,
            "ratios_to_peer": self.ratios(),
            "notes": self.notes,
        }


# ---------------------------------------------------------------------- the peers' codecs
def _tink_envelope() -> Codec:
    import tink
    from tink import aead

    aead.register()
    kek = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    env = aead.KmsEnvelopeAead(aead.aead_key_templates.AES256_GCM, kek)
    return (lambda r: env.encrypt(r, AAD)), (lambda c: env.decrypt(c, AAD))


def _tink_gcm() -> Codec:
    import tink
    from tink import aead

    aead.register()
    prim = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    return (lambda r: prim.encrypt(r, AAD)), (lambda c: prim.decrypt(c, AAD))


def _esdk_client() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import aws_encryption_sdk
        from aws_encryption_sdk import CommitmentPolicy

    return aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )


def _esdk_suite(signed: bool) -> dict[str, Any]:
    from aws_encryption_sdk.identifiers import Algorithm

    # {} = the SDK's default suite under REQUIRE_ENCRYPT_*: the committing signed one.
    return {} if signed else {"algorithm": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY}


def _esdk_keyring(signed: bool) -> Codec:
    client = _esdk_client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
        from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
        from aws_cryptographic_material_providers.mpl.models import (
            AesWrappingAlg,
            CreateRawAesKeyringInput,
        )

    mpl = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())
    keyring = mpl.create_raw_aes_keyring(
        input=CreateRawAesKeyringInput(
            key_namespace="keygate-bench",
            key_name="kek",
            wrapping_key=os.urandom(32),
            wrapping_alg=AesWrappingAlg.ALG_AES256_GCM_IV12_TAG16,
        )
    )
    suite = _esdk_suite(signed)

    def enc(r: bytes) -> bytes:
        return client.encrypt(  # type: ignore[no-any-return]
            source=r, keyring=keyring, encryption_context=ESDK_CONTEXT, **suite
        )[0]

    def dec(c: bytes) -> bytes:
        return client.decrypt(  # type: ignore[no-any-return]
            source=c, keyring=keyring, encryption_context=ESDK_CONTEXT
        )[0]

    return enc, dec


def _esdk_rawkey(signed: bool) -> Codec:
    client = _esdk_client()
    from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKey

    mk = RawMasterKey(
        provider_id="keygate-bench",
        key_id=b"kek",
        wrapping_key=WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=os.urandom(32),
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        ),
    )
    suite = _esdk_suite(signed)

    def enc(r: bytes) -> bytes:
        return client.encrypt(  # type: ignore[no-any-return]
            source=r, key_provider=mk, encryption_context=ESDK_CONTEXT, **suite
        )[0]

    def dec(c: bytes) -> bytes:
        return client.decrypt(source=c, key_provider=mk)[0]  # type: ignore[no-any-return]

    return enc, dec


#: name -> (label, needed module, codec factory)
PEERS: dict[str, tuple[str, str, Callable[[], Codec]]] = {
    "tink-envelope": (
        "Tink KmsEnvelopeAead (AES256_GCM DEK per record, local Tink AES256_GCM as the KEK)",
        "tink",
        _tink_envelope,
    ),
    "tink-aes-gcm": ("Tink AES256_GCM primitive, one key, no envelope", "tink", _tink_gcm),
    "esdk-keyring-signed": (
        "AWS Encryption SDK, raw AES keyring (MPL), default suite "
        "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384 (signed)",
        "aws_cryptographic_material_providers",
        lambda: _esdk_keyring(signed=True),
    ),
    "esdk-keyring-unsigned": (
        "AWS Encryption SDK, raw AES keyring (MPL), AES_256_GCM_HKDF_SHA512_COMMIT_KEY (unsigned)",
        "aws_cryptographic_material_providers",
        lambda: _esdk_keyring(signed=False),
    ),
    "esdk-rawkey-signed": (
        "AWS Encryption SDK, legacy RawMasterKey (raw AES-GCM), default signed suite",
        "aws_encryption_sdk",
        lambda: _esdk_rawkey(signed=True),
    ),
    "esdk-rawkey-unsigned": (
        "AWS Encryption SDK, legacy RawMasterKey (raw AES-GCM), unsigned committing suite",
        "aws_encryption_sdk",
        lambda: _esdk_rawkey(signed=False),
    ),
}


def _available(module: str) -> str | None:
    """None when importable, else the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(module)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _timed(fn: Callable[[bytes], bytes], values: Sequence[bytes]) -> tuple[float, list[bytes]]:
    gc.collect()
    out: list[bytes] = []
    append = out.append
    t0 = time.perf_counter()
    for v in values:
        append(fn(v))
    return time.perf_counter() - t0, out


def run_peers(
    records: Mapping[int, Sequence[bytes]],
    rounds: int,
    target_s: float,
    keygate_rates: Callable[[str, int], dict[str, float]],
    progress: Callable[[str], None],
) -> tuple[list[PeerRow], list[str]]:
    """Every installed peer, encrypt then decrypt, at each record size.

    ``keygate_rates(op, size)`` gives the rates the peer is compared with (keygate single and
    batch, plain loop).  Returns the rows and one line per skipped peer.
    """
    rows: list[PeerRow] = []
    skipped: list[str] = []
    for name, (label, module, factory) in PEERS.items():
        why = _available(module)
        if why is not None:
            skipped.append(f"{name}: not installed ({module}: {why}); pip install -e '.[bench]'")
            progress(f"peer {name} skipped: {module} is not installed")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc, dec = factory()
            for size, recs in records.items():
                # calibration (untimed): warms the peer up and sizes the rounds
                probe = list(recs[: min(max(5, int(target_s * 500)), len(recs))])
                t, cts = _timed(enc, probe)
                t += _timed(dec, cts)[0]
                per_record = t / (2 * len(probe))
                n = max(min(len(recs), int(target_s / max(per_record, 1e-9))), min(20, len(recs)))
                values = list(recs[:n])
                for op in ("encrypt", "decrypt"):
                    row = PeerRow(name, label, op, size, n)
                    row.compare = keygate_rates(op, size)
                    outs: list[bytes] = []
                    for _ in range(rounds):
                        if op == "encrypt":
                            dt, outs = _timed(enc, values)
                        else:
                            dt, outs = _timed(dec, cts)
                        row.round_s.append(dt)
                    if op == "encrypt":
                        cts = outs
                        row.notes.append(f"ciphertext {len(cts[0])} B for a {size} B record")
                    elif outs != values:
                        raise AssertionError(f"{row.id}: decrypted records differ")
                    rows.append(row)
                    kg = row.ratios().get("keygate batch")
                    progress(
                        f"{row.id:40s} {row.rate:>12,.0f}/s  ({n:,} records/round)"
                        + (f"  keygate batch / peer {kg:6.2f}" if kg else "")
                    )
    return rows, skipped


if __name__ == "__main__":  # a quick look without the rest of the bench
    recs = {1024: [os.urandom(1024) for _ in range(2000)]}
    run_peers(recs, 3, 0.2, lambda _op, _s: {}, lambda m: print(m, file=sys.stderr))
