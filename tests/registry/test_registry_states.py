"""Key-version state transitions: every allowed one, every refused one."""

from __future__ import annotations

import pytest

from keygate.core.errors import InvalidRequest, NotFound
from keygate.core.model import KeyState
from keygate.keys import Registry

T = "131016"
P = "resident"
A, D, X, Z = KeyState.ACTIVE, KeyState.DECRYPT_ONLY, KeyState.DISABLED, KeyState.DESTROYED


def _versions_in(registry: Registry, *states: KeyState) -> None:
    """Create versions 1..n of T/P and put version i into states[i-1]."""
    registry.add_tenant(T, kind="lgcode", name="千代田区")
    registry.create_key(T, P, hsm_label="kg-1", dek_max_records=10, dek_max_age_s=60)
    for n in range(2, len(states) + 1):
        registry.add_version(T, P, hsm_label=f"kg-{n}")
    # Now 1..n-1 are decrypt-only and n is active; move each one where it should be.
    for n, state in enumerate(states, start=1):
        current = registry.get_version(T, P, n)
        assert current is not None
        if current.state is state:
            continue
        if state is D:
            registry.set_version_state(T, P, n, X)
            registry.set_version_state(T, P, n, D)
        elif state in (X, Z):
            registry.set_version_state(T, P, n, state)
        else:
            raise AssertionError("set up active versions by rotation order")
    assert [v.state for v in registry.list_versions(T, P)] == list(states)


# (states of versions 1..n before, version to change, requested state, resulting state)
ALLOWED = [
    pytest.param([A], 1, X, X, id="active-to-disabled"),
    pytest.param([D, A], 1, X, X, id="decrypt-only-to-disabled"),
    pytest.param([X], 1, A, A, id="enable-newest-no-active-becomes-active"),
    pytest.param([D, X], 2, A, A, id="enable-newest-with-older-decrypt-only-becomes-active"),
    pytest.param([X, A], 1, A, D, id="enable-older-becomes-decrypt-only"),
    pytest.param([X, X], 1, A, D, id="enable-older-newer-disabled-becomes-decrypt-only"),
    pytest.param([X, Z], 1, A, A, id="enable-newest-non-destroyed-becomes-active"),
    pytest.param([X], 1, D, D, id="disabled-to-decrypt-only"),
    pytest.param([A], 1, Z, Z, id="active-to-destroyed"),
    pytest.param([D, A], 1, Z, Z, id="decrypt-only-to-destroyed"),
    pytest.param([X], 1, Z, Z, id="disabled-to-destroyed"),
]

REFUSED = [
    pytest.param([Z], 1, A, id="destroyed-to-active"),
    pytest.param([Z], 1, D, id="destroyed-to-decrypt-only"),
    pytest.param([Z], 1, X, id="destroyed-to-disabled"),
    pytest.param([Z], 1, Z, id="destroyed-to-destroyed"),
    pytest.param([A], 1, A, id="active-to-active"),
    pytest.param([A], 1, D, id="active-to-decrypt-only"),
    pytest.param([D, A], 1, A, id="decrypt-only-to-active"),
    pytest.param([D, A], 1, D, id="decrypt-only-to-decrypt-only"),
    pytest.param([X], 1, X, id="disabled-to-disabled"),
]


@pytest.mark.parametrize(("before", "version", "requested", "result"), ALLOWED)
def test_allowed_transition(
    registry: Registry,
    before: list[KeyState],
    version: int,
    requested: KeyState,
    result: KeyState,
) -> None:
    """An allowed transition stores and returns the resulting state and leaves the others alone."""
    _versions_in(registry, *before)
    generation = registry.generation()
    changed = registry.set_version_state(T, P, version, requested)
    assert changed.state is result
    assert registry.get_version(T, P, version) == changed
    after = [v.state for v in registry.list_versions(T, P)]
    expected = list(before)
    expected[version - 1] = result
    assert after == expected
    assert after.count(A) <= 1
    assert registry.generation() == generation + 1


@pytest.mark.parametrize(("before", "version", "requested"), REFUSED)
def test_refused_transition(
    registry: Registry, before: list[KeyState], version: int, requested: KeyState
) -> None:
    """A refused transition raises InvalidRequest naming both states and changes nothing."""
    _versions_in(registry, *before)
    generation = registry.generation()
    current = before[version - 1]
    with pytest.raises(InvalidRequest) as info:
        registry.set_version_state(T, P, version, requested)
    message = str(info.value)
    assert f"from {current.value} to {requested.value}" in message
    assert f"{T}/{P}/v{version}" in message
    assert [v.state for v in registry.list_versions(T, P)] == before
    assert registry.generation() == generation


def test_state_given_as_string(registry: Registry) -> None:
    """The state may be given by its string value; an unknown value is InvalidRequest."""
    _versions_in(registry, A)
    assert registry.set_version_state(T, P, 1, "disabled").state is X  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="unknown key state 'paused'"):
        registry.set_version_state(T, P, 1, "paused")  # type: ignore[arg-type]


def test_unknown_version_is_not_found(registry: Registry) -> None:
    """Changing the state of a version that does not exist raises NotFound."""
    _versions_in(registry, A)
    with pytest.raises(NotFound, match=f"{T}/{P}/v2"):
        registry.set_version_state(T, P, 2, X)


def test_disable_then_enable_round_trip(registry: Registry) -> None:
    """Disabling and re-enabling the only version restores it as the active version."""
    _versions_in(registry, A)
    registry.set_version_state(T, P, 1, X)
    assert registry.active_version(T, P) is None
    registry.set_version_state(T, P, 1, A)
    active = registry.active_version(T, P)
    assert active is not None
    assert active.version == 1


def test_enable_updates_timestamp_only_of_changed_version(registry: Registry) -> None:
    """A transition bumps updated_at of the changed version and keeps created_at."""
    _versions_in(registry, D, A)
    before = registry.get_version(T, P, 1)
    assert before is not None
    changed = registry.set_version_state(T, P, 1, X)
    assert changed.created_at == before.created_at
    assert changed.updated_at > before.updated_at
