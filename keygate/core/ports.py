"""Ports: the small protocols the core and the service depend on."""

from __future__ import annotations

from typing import Protocol

from keygate.core.model import WrapMechanism

__all__ = ["Clock", "KeyWrapper", "RandomSource"]


class RandomSource(Protocol):
    """Randomness for nonces and DEKs (injected so tests can fix it)."""

    def nonce(self) -> bytes: ...

    def dek(self) -> bytes: ...


class Clock(Protocol):
    def __call__(self) -> float: ...


class KeyWrapper(Protocol):
    """The HSM: wraps and unwraps DEKs under a KEK named by its label."""

    def wrap_dek(self, label: str, dek: bytes, *, aad: bytes) -> tuple[WrapMechanism, bytes]: ...

    def unwrap_dek(
        self, label: str, mechanism: WrapMechanism, wrapped: bytes, *, aad: bytes
    ) -> bytes: ...
