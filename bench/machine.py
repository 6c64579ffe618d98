"""Facts about the machine and the software the numbers were measured with."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["machine_facts"]

_REPO = Path(__file__).resolve().parents[1]


def _cpuinfo() -> dict[str, Any]:
    facts: dict[str, Any] = {"cpu_model": platform.processor() or platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return facts
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "cpu_model_name" not in facts:
            facts["cpu_model"] = value.strip()
            facts["cpu_model_name"] = value.strip()
        elif key == "cpu MHz" and "cpu_mhz" not in facts:
            facts["cpu_mhz"] = float(value.strip())
        elif key == "flags" and "aes_ni" not in facts:
            flags = set(value.split())
            facts["aes_ni"] = "aes" in flags
            facts["pclmulqdq"] = "pclmulqdq" in flags
            facts["vaes"] = "vaes" in flags
            facts["hypervisor"] = "hypervisor" in flags
    facts.pop("cpu_model_name", None)
    return facts


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run(args: list[str]) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (done.stdout or done.stderr).strip()
    return out or None


def _openssl() -> str | None:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        return str(backend.openssl_version_text())
    except Exception:
        return None


def _source_digest() -> str:
    """SHA-256 over keygate's Python sources (path and bytes): names the code that was measured,
    committed or not."""
    h = hashlib.sha256()
    for path in sorted((_REPO / "keygate").rglob("*.py")):
        h.update(str(path.relative_to(_REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _uncommitted() -> list[str] | None:
    # Plumbing only (reads the index, never writes it): files under keygate/ that differ from HEAD.
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(_REPO), "diff-index", "--name-only", "HEAD", "--", "keygate"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.split() if done.returncode == 0 else None


def machine_facts() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        **_cpuinfo(),
        "cores_online": os.cpu_count(),
        "cores_usable": usable,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "cryptography": _version("cryptography"),
        "openssl": _openssl(),
        "python_pkcs11": _version("python-pkcs11"),
        "softhsm": _run(["softhsm2-util", "--version"]),
        "keygate_commit": _run(["git", "-C", str(_REPO), "rev-parse", "HEAD"]),
        "keygate_uncommitted_files": _uncommitted(),
        "keygate_source_sha256": _source_digest(),
        "load_average_at_start": load,
    }
