"""PKCS#11 HSM adapter (python-pkcs11) and SoftHSM helpers for tests, the demo and the bench."""

from keygate.hsm.pkcs11 import DEK_LEN, HsmConfig, Pkcs11Hsm, kek_id, load_pin
from keygate.hsm.softhsm import (
    SoftHsmToken,
    find_softhsm_module,
    init_softhsm_token,
    write_softhsm_conf,
)

__all__ = [
    "DEK_LEN",
    "HsmConfig",
    "Pkcs11Hsm",
    "SoftHsmToken",
    "find_softhsm_module",
    "init_softhsm_token",
    "kek_id",
    "load_pin",
    "write_softhsm_conf",
]
