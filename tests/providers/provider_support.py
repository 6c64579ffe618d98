"""Names shared by the provider tests (imported by file name: tests/ is no package)."""

from __future__ import annotations

#: provider name → (server module, server class)
SERVERS: dict[str, tuple[str, str]] = {
    "aws": ("keygate.testing.kms.aws", "MotoKmsServer"),
    "vault": ("keygate.testing.kms.vault", "OpenBaoServer"),
    "gcp": ("keygate.testing.kms.gcp", "FakeGcpKmsServer"),
    "azure": ("keygate.testing.kms.azure", "FakeAzureKeyVaultServer"),
    "oci": ("keygate.testing.kms.oci", "FakeOciVaultServer"),
    "sakura": ("keygate.testing.kms.sakura", "FakeSakuraKmsServer"),
}
#: a region outside Japan for each provider whose URIs name one
FOREIGN_REGION: dict[str, str] = {
    "aws": "us-east-1",
    "gcp": "us-central1",
    "azure": "eastus",
    "oci": "us-ashburn-1",
    "sakura": "us1a",
}
ACTOR = "custodian:test"
TENANT = "131016"
