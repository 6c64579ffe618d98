"""Names shared by the provider tests (imported by file name: tests/ is no package)."""

from __future__ import annotations

from keygate.policy.residency import ResidencyPolicy
from keygate.providers.base import ProviderOptions

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

#: the adapter tests' options: generous for the functional tests (a shared, busy machine: CI runs
#: them under load); ADAPTER_FAST only where a test is about the timeout itself (the server holds
#: its answer longer).  Adapters make no retries of their own, whatever ``retries`` says.
ADAPTER_OPTIONS = ProviderOptions(connect_timeout_s=5.0, read_timeout_s=10.0)
ADAPTER_FAST = ProviderOptions(connect_timeout_s=0.3, read_timeout_s=0.3)

#: the gateways' provider options: timeouts generous enough for a busy machine (CI runs the
#: suite under load), quick retries and a short outage window; tests about timeouts pass their own
OPTIONS = ProviderOptions(
    connect_timeout_s=5.0,
    read_timeout_s=10.0,
    retries=1,
    backoff_s=0.01,
    backoff_max_s=0.02,
    down_for_s=0.5,
)


def residency(allow_vault: bool = True) -> ResidencyPolicy:
    """The shipped policy, plus loopback Vault/OpenBao servers when ``allow_vault``."""
    shipped = ResidencyPolicy.load()
    regions = dict(shipped.regions)
    regions["hcvault"] = frozenset({"127.0.0.1"} if allow_vault else set())
    return ResidencyPolicy(regions=regions, source="tests")
