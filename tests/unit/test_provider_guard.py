"""The provider guard: retries with backoff for transient failures only, outage windows, and
the residency policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from keygate.core.errors import ConfigurationError, GatewayError
from keygate.policy.residency import ResidencyPolicy, ResidencyViolation
from keygate.providers.base import (
    KeyUri,
    ProviderAuthFailed,
    ProviderCiphertextRejected,
    ProviderKeyDisabled,
    ProviderOptions,
    ProviderTimeout,
    ProviderUnavailable,
)
from keygate.providers.guard import KeyGuard
from keygate.testing.fakes import ManualClock

pytestmark = pytest.mark.unit

KEY = KeyUri("aws-kms", "aws-kms://arn:aws:kms:ap-northeast-1:111122223333:key/k", "ap-northeast-1")


class Script:
    """Answers calls from a list: an exception instance is raised, anything else returned."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def make_guard(
    retries: int = 3, down_for_s: float = 5.0
) -> tuple[KeyGuard, ManualClock, list[float], list[tuple[str, str]]]:
    clock = ManualClock()
    sleeps: list[float] = []
    heard: list[tuple[str, str]] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock.advance(s)

    guard = KeyGuard(
        KEY,
        ProviderOptions(retries=retries, backoff_s=0.1, backoff_max_s=0.3, down_for_s=down_for_s),
        clock=clock,
        sleep=sleep,
        on_down=lambda uri, exc: heard.append((uri, exc.code)),
    )
    return guard, clock, sleeps, heard


def test_transient_failures_are_retried_with_capped_backoff() -> None:
    guard, _, sleeps, heard = make_guard()
    fn = Script(ProviderTimeout("t"), ProviderUnavailable("u"), ProviderUnavailable("u"), b"ok")
    assert guard.call("wrap", fn) == b"ok"
    assert fn.calls == 4
    assert len(sleeps) == 3
    assert all(0 <= s <= cap for s, cap in zip(sleeps, (0.1, 0.2, 0.3), strict=True))
    assert heard == []
    assert guard.health().ok


@pytest.mark.parametrize(
    "exc",
    [ProviderAuthFailed("a"), ProviderKeyDisabled("d"), ProviderCiphertextRejected("c")],
    ids=lambda e: type(e).__name__,
)
def test_permanent_failures_are_not_retried(exc: GatewayError) -> None:
    guard, _, sleeps, _ = make_guard()
    fn = Script(exc, b"never")
    with pytest.raises(type(exc)):
        guard.call("unwrap", fn)
    assert fn.calls == 1
    assert sleeps == []
    assert not guard.down


def test_a_rejected_ciphertext_does_not_make_the_key_unhealthy() -> None:
    guard, _, _, heard = make_guard()
    with pytest.raises(ProviderCiphertextRejected):
        guard.call("unwrap", Script(ProviderCiphertextRejected("foreign")))
    assert guard.health().ok
    assert heard == []


def test_a_disabled_key_is_reported_to_listeners_and_in_health() -> None:
    guard, _, _, heard = make_guard()
    with pytest.raises(ProviderKeyDisabled):
        guard.call("wrap", Script(ProviderKeyDisabled("disabled")))
    assert heard == [(KEY.uri, "KEY_NOT_USABLE")]
    health = guard.health()
    assert not health.ok
    assert health.error == "KEY_NOT_USABLE:provider-key-disabled"


def test_after_the_retries_the_key_is_down_fails_fast_then_half_opens() -> None:
    guard, clock, sleeps, heard = make_guard(retries=1, down_for_s=5.0)
    with pytest.raises(ProviderUnavailable):
        guard.call("wrap", Script(ProviderUnavailable("x"), ProviderUnavailable("y")))
    assert guard.down
    assert heard == [(KEY.uri, "UNAVAILABLE")]
    # While down: no call reaches the provider, and the error says when to retry.
    fn = Script(b"unused")
    with pytest.raises(ProviderUnavailable) as info:
        guard.call("wrap", fn)
    assert fn.calls == 0
    assert info.value.retry_after is not None
    assert 1 <= info.value.retry_after <= 5
    # After the window one call goes through without retries (half-open) ...
    clock.advance(5.1)
    n = len(sleeps)
    with pytest.raises(ProviderUnavailable):
        guard.call("wrap", Script(ProviderUnavailable("still")))
    assert len(sleeps) == n  # no retries in half-open
    assert guard.down
    # ... and a success closes it.
    clock.advance(5.1)
    assert guard.call("wrap", Script(b"back")) == b"back"
    assert not guard.down
    assert guard.health().ok


def test_retries_zero_means_one_attempt() -> None:
    guard, _, sleeps, _ = make_guard(retries=0)
    fn = Script(ProviderUnavailable("x"), b"never")
    with pytest.raises(ProviderUnavailable):
        guard.call("wrap", fn)
    assert fn.calls == 1
    assert sleeps == []


# ------------------------------------------------------------------------------ residency
def test_shipped_policy_allows_only_japanese_regions() -> None:
    policy = ResidencyPolicy.load()
    allowed = {
        "aws-kms": ["ap-northeast-1", "ap-northeast-3"],
        "gcp-kms": ["asia-northeast1", "asia-northeast2"],
        "azure-kv": ["japaneast", "japanwest"],
        "oci-kms": ["ap-tokyo-1", "ap-osaka-1"],
        "sakura-kms": ["is1a", "is1b", "tk1a", "tk1b"],
    }
    refused = {
        "aws-kms": ["us-east-1", "ap-northeast-2", "eu-west-1"],
        "gcp-kms": ["asia", "global", "us-central1", "asia-east1"],
        "azure-kv": ["eastus", "koreacentral", ""],
        "oci-kms": ["us-ashburn-1", "ap-seoul-1"],
        "sakura-kms": ["us1a", "is1c"],
        "hcvault": ["127.0.0.1:8200", "vault.example.jp:8200"],
        "unknown-kms": ["ap-northeast-1"],
    }
    for scheme, regions in allowed.items():
        for region in regions:
            assert policy.allows(scheme, region), (scheme, region)
            assert policy.allows(scheme, region.upper()), (scheme, region)
    for scheme, regions in refused.items():
        for region in regions:
            assert not policy.allows(scheme, region), (scheme, region)


def test_a_violation_names_the_key_region_and_rule() -> None:
    policy = ResidencyPolicy.load()
    key = KeyUri("aws-kms", "aws-kms://arn:aws:kms:us-east-1:111122223333:key/k", "us-east-1")
    with pytest.raises(ResidencyViolation) as info:
        policy.check(key)
    assert info.value.code == "FORBIDDEN"
    assert "us-east-1" in info.value.detail
    assert "ap-northeast-1" in info.value.detail


def test_vault_addresses_are_allowed_by_host_or_host_and_port() -> None:
    policy = ResidencyPolicy.from_mapping(
        {"hcvault": {"regions": ["vault.city.lg.jp", "10.0.0.5:8200"]}}
    )
    assert policy.allows("hcvault", "vault.city.lg.jp:8200")
    assert policy.allows("hcvault", "10.0.0.5:8200")
    assert not policy.allows("hcvault", "10.0.0.5:8201")
    assert not policy.allows("hcvault", "evil.example:8200")


@pytest.mark.parametrize(
    "text",
    [
        "[aws-kms]\nregions = 'ap-northeast-1'\n",
        "[aws-kms]\nregions = [1]\n",
        "[aws-kms]\nregions = ['ap-northeast-1']\nextra = true\n",
        "aws-kms = 3\n",
        "not toml [",
    ],
)
def test_malformed_policy_files_are_configuration_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "residency.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match="residency policy"):
        ResidencyPolicy.load(path)


def test_a_missing_policy_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        ResidencyPolicy.load(tmp_path / "nope.toml")
