"""Cloud KMS adapters (the outer wrap), one module each, chosen by the key URI's scheme.

Each adapter module needs its provider's SDK, installed by its pip extra
(``pip install 'keygate[aws]'`` …); nothing here imports an SDK until a key of that scheme is used.

======================  =========================================================  =========
scheme                  key URI                                                    extra
======================  =========================================================  =========
``aws-kms``             ``aws-kms://arn:aws:kms:REGION:ACCOUNT:key/KEY-ID``         aws
``gcp-kms``             ``gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K``  gcp
``azure-kv``            ``azure-kv://VAULT.vault.azure.net/keys/NAME?region=R``      azure
``oci-kms``             ``oci-kms://CRYPTO-ENDPOINT-HOST/KEY-OCID``                 oci
``hcvault``             ``hcvault://HOST:PORT/MOUNT/keys/NAME``                     vault
``sakura-kms``          ``sakura-kms://ZONE/RESOURCE-ID``                           sakura
======================  =========================================================  =========
"""

from __future__ import annotations

from typing import Final

__all__ = ["ADAPTERS", "scheme_of"]

#: scheme → (module, class) of its adapter, imported on first use
ADAPTERS: Final[dict[str, tuple[str, str]]] = {
    "aws-kms": ("keygate.providers.aws", "AwsKmsAdapter"),
    "gcp-kms": ("keygate.providers.gcp", "GcpKmsAdapter"),
    "azure-kv": ("keygate.providers.azure", "AzureKeyVaultAdapter"),
    "oci-kms": ("keygate.providers.oci", "OciVaultAdapter"),
    "hcvault": ("keygate.providers.vault", "VaultTransitAdapter"),
    "sakura-kms": ("keygate.providers.sakura", "SakuraKmsAdapter"),
}


def scheme_of(uri: str) -> str:
    """The scheme of a key URI (``aws-kms`` for ``aws-kms://…``), lower-cased; '' if none."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""
