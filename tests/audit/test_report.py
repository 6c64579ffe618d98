"""The HTML report: verified figures, escaping of hostile strings, no secrets, and a real
rendering in headless Chromium (screenshot decoded and checked, DOM dumped).

Most tests use a software ECDSA P-256 signer in place of the HSM key (same signature format) on
SQLite and PostgreSQL; ``test_cli_report_*`` runs ``keygate audit report`` against a real
gateway (SoftHSM) and checks that no token, plaintext, record id or pseudonym reaches the page.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from audit_support import cli_env  # type: ignore[import-not-found]
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keygate.audit.chain import checkpoint_message, key_id
from keygate.audit.events import AuditEvent
from keygate.audit.export import export_trail
from keygate.audit.report import ReportSummary, report_from_export, report_from_store
from keygate.audit.retention import prune_segments
from keygate.audit.store import AuditStore
from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.hsm.softhsm import SoftHsmToken
from keygate.policy.access import Principal
from keygate.testing.synthetic import SyntheticRecords

CHROMIUM = "/usr/bin/chromium"
HOSTILE_ACTOR = '<script>alert("x")</script>'
HOSTILE_PURPOSE = '"><img src=x onerror=alert(1)>'
HOSTILE_DETAIL = "</td></tr></table><script>alert(2)</script>"
HOSTILE_CODE = "<b>BAD</b>"
PSEUDONYM = "ab" * 32
DAY0 = datetime(2026, 11, 16, 1, 0, tzinfo=UTC)  # 10:00 JST: the same date in JST and UTC
#: records decrypted per caller and day index (0..4)
DECRYPTS = {
    "juki-app": [120, 80, 0, 45, 300],
    "zei-app": [10, 0, 25, 0, 5],
    HOSTILE_ACTOR: [0, 7, 0, 0, 0],
}
#: the HTML elements a report may contain; anything else means escaping failed
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "table",
    "thead", "tbody", "tr", "th", "td", "p", "span", "div", "b", "nav", "ul", "li", "a",
    "section", "figure", "svg", "rect", "line", "text", "code", "br", "footer",
}  # fmt: skip


class Signer:
    """A software stand-in for the HSM checkpoint key (same signature format)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pem = self.key.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = key_id(self.pem)

    def __call__(self, seq: int, digest: str, prev_seq: int, ts: str) -> tuple[str, str]:
        message = checkpoint_message(seq=seq, hash=digest, prev_seq=prev_seq, ts=ts)
        signature = self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode("ascii"), self.key_id


def _ev(action: str, ts: datetime, actor: str = "custodian:a", **kw: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "action": action,
        "outcome": "ok",
        "actor": actor,
        "request_id": f"req-{action}-{ts.timestamp()}-{actor[:8]}-{kw.get('items', 1)}",
        "ts": ts,
    }
    fields.update(kw)
    return AuditEvent(**fields)


def fill(store: AuditStore, signer: Signer) -> None:
    """Five days of decrypts by three callers (one with a hostile name), refusals, key life
    cycle, dual-control requests and approvals, provider and access changes."""
    events: list[AuditEvent] = []
    for caller, per_day in DECRYPTS.items():
        for day, n in enumerate(per_day):
            if n:
                ts = DAY0 + timedelta(days=day, minutes=len(events))
                half = n // 2
                events.append(
                    _ev("record.decrypt", ts, caller, tenant="131016", purpose="resident",
                        record_type="resident", items=half + 2, items_failed=2,
                        detail={"record_refs": PSEUDONYM})
                )  # fmt: skip
                events.append(
                    _ev("crypto.decrypt", ts, caller, tenant="271004", purpose="tax",
                        items=n - half)
                )  # fmt: skip
    ts = DAY0 + timedelta(hours=3)
    events += [
        _ev("crypto.encrypt", ts, "juki-app", tenant="131016", purpose="resident", items=50),
        _ev("crypto.rewrap", ts, "bulk", tenant="131016", purpose="resident", items=500),
        _ev("record.encrypt", ts, "juki-app", tenant="131016", purpose="resident",
            detail={"record_ref": PSEUDONYM}),
        _ev("auth.failed", ts, "anonymous", outcome="denied", code="UNAUTHENTICATED",
            detail={"reason": "bad credentials", "path": "/v1/decrypt"}),
        _ev("auth.failed", ts + timedelta(days=1), "anonymous", outcome="denied",
            code="UNAUTHENTICATED", detail={"reason": "no credentials", "path": "/v1/decrypt"}),
        _ev("crypto.decrypt", ts, "zei-app", outcome="denied", code="FORBIDDEN",
            tenant="011002", purpose="mynumber"),
        _ev("request.rejected", ts, "zei-app", outcome="error", code="INVALID_REQUEST",
            detail={"path": "/v1/encrypt"}),
        _ev("crypto.decrypt", ts, HOSTILE_ACTOR, outcome="error", code=HOSTILE_CODE,
            tenant="131016", purpose=HOSTILE_PURPOSE),
        _ev("tenant.added", ts, tenant="131016"),
        _ev("identity.added", ts, detail={"identity": "juki-app"}),
        _ev("key.created", ts, tenant="131016", purpose="resident", key_version=1),
        _ev("key.rotated", ts + timedelta(days=1), tenant="131016", purpose="resident",
            key_version=2),
        _ev("key.disabled", ts + timedelta(days=2), tenant="131016", purpose="resident",
            key_version=1),
        _ev("key.enabled", ts + timedelta(days=2), tenant="131016", purpose="resident",
            key_version=1),
        _ev("request.created", ts + timedelta(days=3), tenant="131016", purpose="resident",
            key_version=1, detail={"request": "DC-0001", "operation": "key.destroy",
                                   "note": HOSTILE_DETAIL}),
        _ev("approval.granted", ts + timedelta(days=3), "custodian:b",
            detail={"request": "DC-0001", "approvals": 1, "required": 2}),
        _ev("approval.granted", ts + timedelta(days=3), "custodian:c",
            detail={"request": "DC-0001", "approvals": 2, "required": 2}),
        _ev("key.destroy_scheduled", ts + timedelta(days=3), tenant="131016",
            purpose="resident", key_version=1, detail={"request": "DC-0001"}),
        # the dual-control module's own names (keygate.custody)
        _ev("custodian.added", ts, detail={"custodian": "b", "algorithm": "ed25519"}),
        _ev("custody.requested", ts + timedelta(days=3), request_id="CR-7f3a", tenant="131016",
            purpose="mynumber", key_version=1, detail={"custody_action": "key.destroy"}),
        _ev("custody.approved", ts + timedelta(days=3), "custodian:b", request_id="CR-7f3a",
            detail={"custody_action": "key.destroy", "decision": "approve"}),
        _ev("custody.approved", ts + timedelta(days=3), "custodian:c", request_id="CR-7f3a",
            detail={"custody_action": "key.destroy", "decision": "approve"}),
        _ev("custody.executed", ts + timedelta(days=3), request_id="CR-7f3a"),
        _ev("key.destruction_scheduled", ts + timedelta(days=3), request_id="CR-7f3a",
            tenant="131016", purpose="mynumber", key_version=1),
        _ev("key.destroyed", ts + timedelta(days=4), tenant="131016", purpose="mynumber",
            key_version=1),
        _ev("provider.set", ts + timedelta(days=4), tenant="131016", purpose="resident",
            detail={"provider": "aws-kms://arn:aws:kms:ap-northeast-1:111122223333:key/k1"}),
    ]  # fmt: skip
    for start in range(0, len(events), 7):  # several checkpoints along the way
        store.append(events[start : start + 7])
        store.checkpoint(signer)


@pytest.fixture
def signer() -> Signer:
    return Signer()


def make_report(
    store: AuditStore, signer: Signer, out: Path, **kw: Any
) -> tuple[ReportSummary, str]:
    summary = report_from_store(
        store, out, checkpoint_now=lambda: store.checkpoint(signer), public_key_pem=signer.pem,
        key_id=signer.key_id, status_by_code={"UNAUTHENTICATED": 401, "FORBIDDEN": 403,
                                              "INVALID_REQUEST": 400}, **kw,
    )  # fmt: skip
    return summary, out.read_text(encoding="utf-8")


@pytest.fixture
def report(audit_store: AuditStore, signer: Signer, tmp_path: Path) -> tuple[ReportSummary, str]:
    fill(audit_store, signer)
    return make_report(audit_store, signer, tmp_path / "report.html")


def section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}">')
    return page[start : page.index("</section>", start)]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_is_self_contained_and_inert(report: tuple[ReportSummary, str]) -> None:
    """One file: no script, no external resource of any kind, a CSP forbidding both, charts as
    inline SVG."""
    _, page = report
    lowered = page.lower()
    for bad in ("<script", "<link", "<iframe", "<img", "<object", "<embed", "@import"):
        assert bad not in lowered, bad
    assert "default-src 'none'" in page
    assert page.count("<svg") >= 3
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= ALLOWED_TAGS, parser.tags - ALLOWED_TAGS
    names = {k for _, k, _ in parser.attrs}
    assert not {n for n in names if n.startswith("on")}
    assert not names & {"src", "srcset", "xlink:href", "action", "formaction"}
    assert all(v and v.startswith("#") for _, k, v in parser.attrs if k == "href")
    markup = [v or "" for _, _, v in parser.attrs] + [
        lowered.split("<style>")[1].split("</style>")[0]
    ]
    for value in markup:
        assert "url(" not in value and "://" not in value and "javascript:" not in value, value


def test_hostile_strings_are_escaped(report: tuple[ReportSummary, str]) -> None:
    """Markup in a caller name, purpose, code or detail shows as text, never as markup."""
    _, page = report
    assert HOSTILE_ACTOR not in page and HOSTILE_DETAIL not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;b&gt;BAD&lt;/b&gt;" in page
    parser = _Tags()
    parser.feed(page)
    text = "".join(parser.text)
    assert HOSTILE_ACTOR in text and HOSTILE_PURPOSE in text  # shown, as text
    assert "b" in parser.tags  # <b> is ours (summary cards); the hostile one is escaped
    assert not re.search(r"<b>BAD", page)


def test_figures_match_the_trail(report: tuple[ReportSummary, str]) -> None:
    """Decrypt volumes per caller and day, tenant × purpose totals, refusals with their HTTP
    status, and the event sections hold exactly the expected events."""
    summary, page = report
    expected = sum(sum(v) for v in DECRYPTS.values())
    assert summary.ok and summary.decrypts == expected
    assert summary.refused == 5
    decrypts = section(page, "decrypts")
    assert "<td>2026-11-20</td>" in decrypts
    # juki-app, zei-app, hostile, total on 2026-11-20 (the pivot's column order is by volume)
    assert re.search(r'<td>2026-11-20</td><td class="num">300</td><td class="num">5</td>'
                     r'<td class="num">0</td><td class="num">305</td>', decrypts)  # fmt: skip
    assert re.search(r'<td>juki-app</td><td class="num">545</td><td class="num">8</td>'
                     r'<td class="num">4</td>', decrypts)  # fmt: skip
    tenants = section(page, "tenants")
    assert re.search(r'<td>271004</td><td>tax</td><td class="num">0</td><td class="num">'
                     r'(\d+)</td>', tenants)  # fmt: skip
    assert re.search(r'<td>131016</td><td>resident</td><td class="num">51</td>', tenants)
    denied = section(page, "denied")
    assert re.search(r'<td>anonymous</td><td>—</td><td>UNAUTHENTICATED</td><td>401</td>'
                     r'<td>denied</td><td class="num">2</td>', denied)  # fmt: skip
    assert "<td>FORBIDDEN</td><td>403</td>" in denied
    assert "<td>INVALID_REQUEST</td><td>400</td><td>error</td>" in denied
    keys = section(page, "keys")
    destroy = ("key.destroy_scheduled", "key.destruction_scheduled", "key.destroyed")
    for action in ("key.created", "key.rotated", "key.disabled", "key.enabled", *destroy):
        assert f"<td>{action}</td>" in keys
    custodian = section(page, "custodian")
    assert custodian.count("<td>approval.granted</td>") == 2
    assert "<td>request.created</td>" in custodian and "DC-0001" in custodian
    assert custodian.count("<td>custody.approved</td>") == 2
    assert custodian.count("<td>CR-7f3a</td>") == 5  # the custody request id column
    for action in ("custody.requested", "custody.executed", "custodian.added", *destroy):
        assert f"<td>{action}</td>" in custodian
    assert custodian.count("<tr>") == 1 + 11
    assert "request.rejected" not in custodian  # the API's malformed request is not a custodian's
    assert "aws-kms://arn:aws:kms:ap-northeast-1" in section(page, "providers")
    access = section(page, "access")
    assert "<td>tenant.added</td>" in access and "<td>identity.added</td>" in access
    chain = section(page, "chain")
    assert "VERIFIED" in chain and summary.result.key_id is not None
    fingerprint = " ".join(summary.result.key_id[i : i + 8] for i in range(0, 64, 8))
    assert fingerprint in chain
    assert f"seq {summary.result.last_checkpoint_seq}," in chain


def test_pseudonyms_and_request_ids_are_not_shown(report: tuple[ReportSummary, str]) -> None:
    """Record events are only counted: their pseudonyms do not reach the page."""
    _, page = report
    assert PSEUDONYM not in page
    assert "req-record.decrypt" not in page


def test_tenant_and_time_filters(audit_store: AuditStore, signer: Signer, tmp_path: Path) -> None:
    """--tenant and --since/--until narrow the figures; the range still verifies."""
    fill(audit_store, signer)
    summary, page = make_report(audit_store, signer, tmp_path / "t.html", tenant="271004")
    assert summary.ok and summary.decrypts == sum(n - n // 2 for v in DECRYPTS.values() for n in v)
    assert "<td>131016</td>" not in page
    summary, page = make_report(
        audit_store, signer, tmp_path / "d.html",
        since=DAY0 + timedelta(days=4), until=DAY0 + timedelta(days=5),
    )  # fmt: skip
    assert summary.ok and summary.decrypts == 305
    assert "2026-11-19" not in section(page, "decrypts")


def test_empty_trail_gives_an_empty_verified_report(
    audit_store: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """A trail with no events still gives a page: verified, every section saying "none"."""
    summary, page = make_report(audit_store, signer, tmp_path / "empty.html")
    assert summary.ok and summary.events == 0
    assert "<svg" not in page and "VERIFIED" in section(page, "chain")
    assert "no decrypts" in section(page, "decrypts")


def test_failed_verification_is_shown_in_red(
    audit_store: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """A tampered export still gives a page, which says where verification failed and that
    its figures are not verified."""
    fill(audit_store, signer)
    buf = io.BytesIO()
    export_trail(audit_store, buf, checkpoint_now=lambda: audit_store.checkpoint(signer))
    lines = buf.getvalue().decode("utf-8").splitlines(keepends=True)
    obj = json.loads(lines[5])
    obj["event"]["items"] += 1000
    lines[5] = json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("".join(lines), encoding="utf-8")
    summary = report_from_export(tampered, tmp_path / "bad.html", public_key_pem=signer.pem)
    page = (tmp_path / "bad.html").read_text(encoding="utf-8")
    assert not summary.ok and summary.result.line == 6
    chain = section(page, "chain")
    assert "VERIFICATION FAILED" in chain and "line 6 (seq" in chain
    assert "NOT verified" in chain


def test_report_after_pruning_names_the_anchor(
    audit_store: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """After a prune the report verifies from the kept checkpoint and lists the pruning
    records."""
    old = datetime(2024, 3, 1, tzinfo=UTC)
    for month in range(3):
        ts = old + timedelta(days=31 * month)
        audit_store.append([_ev("crypto.decrypt", ts, "juki-app", tenant="131016")])
        audit_store.checkpoint(signer, now=ts + timedelta(hours=1))
    fill(audit_store, signer)
    result = prune_segments(
        audit_store, tmp_path, retention_days=365, public_key_pem=signer.pem,
        actor="custodian:t", checkpoint_now=lambda: audit_store.checkpoint(signer), force=True,
    )  # fmt: skip
    assert len(result.segments) == 3
    summary, page = make_report(audit_store, signer, tmp_path / "p.html")
    assert summary.ok and summary.result.anchor_seq == 3
    chain = section(page, "chain")
    assert "after the signed checkpoint at</span> seq 3" in chain
    assert "Pruning records" in chain and "forced: no archive" in chain
    assert "<td>audit.pruned</td>" in section(page, "trail")


# ---------------------------------------------------------------------- headless Chromium
def _require_chromium() -> str:
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = f"{CHROMIUM} is not installed (apt-get install chromium); the report is not rendered"
    if os.environ.get("KEYGATE_REQUIRE_CHROMIUM"):
        pytest.fail(reason)  # CI installs Chromium: a missing browser must not pass silently
    pytest.skip(reason)


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )


def decode_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """A minimal PNG decoder (8-bit RGB/RGBA, not interlaced): width, height, bytes per
    pixel and the unfiltered rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    width = height = depth = colour = interlace = -1
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    assert len(raw) == height * (stride + 1)
    rows: list[bytes] = []
    prev = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        else:
            assert kind == 0, f"unknown PNG filter {kind}"
        rows.append(bytes(line))
        prev = bytes(line)
    return width, height, bpp, rows


@pytest.mark.slow
def test_chromium_renders_the_report(tmp_path: Path, signer: Signer) -> None:
    """Headless Chromium renders the page at 1280×2000: the screenshot decodes, is not blank,
    shows the chart colours and the green verification badge; the DOM has the bilingual
    labels and the escaped hostile caller, and no script."""
    binary = _require_chromium()
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    store.create_schema()
    try:
        fill(store, signer)
        summary, _ = make_report(store, signer, tmp_path / "report.html")
    finally:
        store.close()
    assert summary.ok
    url = (tmp_path / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    done = _chromium(binary, tmp_path / "profile", f"--screenshot={shot}",
                     "--window-size=1280,2000", url)  # fmt: skip
    assert done.returncode == 0 and shot.is_file(), done.stderr.decode(errors="replace")[-2000:]
    width, height, bpp, rows = decode_png(shot.read_bytes())
    assert (width, height) == (1280, 2000)
    pixels: set[bytes] = set()
    ink = total = 0
    for row in rows[::4]:
        for x in range(0, width * bpp, bpp * 2):
            px = row[x : x + 3]
            pixels.add(px)
            total += 1
            ink += px != b"\xff\xff\xff"
    assert 0.03 < ink / total < 0.9, ink / total  # neither blank nor a solid block
    assert len(pixels) > 50
    assert bytes.fromhex("0072b2") in pixels  # the first caller's bars (Okabe-Ito blue)
    assert bytes.fromhex("e3f4e8") in pixels  # the green "verified" badge

    dom = _chromium(binary, tmp_path / "profile2", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    text = dom.stdout.decode("utf-8")
    labels = ("復号件数", "Decrypts per caller per day", "拒否・失敗したリクエスト",
              "鍵のライフサイクル", "鍵管理者の申請と承認", "検証済み", "VERIFIED")  # fmt: skip
    for label in labels:
        assert label in text, label
    assert "<script" not in text.lower()
    assert '&lt;script&gt;alert("x")&lt;/script&gt;' in text


# ---------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def cli_trail(
    audit_token: SoftHsmToken, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A real gateway's trail: custodian actions (one by a hostile actor name), record
    encryption and decryption with record ids, My Numbers and a bearer token to leak."""
    home = tmp_path_factory.mktemp("report-cli")
    env = cli_env(audit_token, home)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keygate.cli.main", *args], env=env, cwd=home,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    assert run("init").returncode == 0
    assert run("--actor", HOSTILE_ACTOR, "tenant", "add", "131016").returncode == 0
    settings = load_settings(
        data_dir=home / "data", hsm_token_label=audit_token.label, hsm_pin=audit_token.user_pin
    )
    secrets: list[str] = []
    record_ids: list[str] = []
    gw = build_gateway(settings, start_refresher=False)
    try:
        gw.create_key("custodian:test", "131016", "resident")
        gw.create_key("custodian:test", "131016", "mynumber")
        _, token = gw.add_identity(
            "custodian:test", "juki-app", tenants=["*"], purposes=["*"], record_types=["*"],
            operations=["*"],
        )  # fmt: skip
        assert token is not None
        secrets.append(token)
        app = Principal.from_grants(
            "juki-app", tenants=["*"], purposes=["*"], record_types=["*"], operations=["*"]
        )
        for n, (_, record) in enumerate(SyntheticRecords(seed=11).resident(4)):
            record_id = f"R-{700000 + n:06d}"
            sealed = gw.encrypt_record(app, f"req-{n}", "resident", "131016", record_id, record)
            gw.decrypt_record(app, f"read-{n}", "resident", "131016", record_id, sealed)
            record_ids.append(record_id)
            secrets += [str(record["個人番号"]), str(record["氏名"]), str(record["住所"])]
            secrets += [str(v) for v in sealed.values() if str(v).startswith("kg1.")]
        refs = [gw.audit_keys.record_ref("131016", r) for r in record_ids]
        gw.rotate_key("custodian:test", "131016", "resident")
    finally:
        gw.close()
    yield {"run": run, "home": home, "secrets": secrets, "ids": record_ids, "refs": refs}


def test_cli_report_has_no_secrets_and_verifies(cli_trail: dict[str, Any]) -> None:
    """`keygate audit report --out` writes a verified page without any token, plaintext,
    ciphertext, record id or pseudonym, and escapes the hostile custodian name."""
    out = cli_trail["home"] / "report.html"
    done = cli_trail["run"]("audit", "report", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "chain verified up to checkpoint seq" in done.stderr
    page = out.read_text(encoding="utf-8")
    assert cli_trail["secrets"] and cli_trail["ids"]
    for leak in cli_trail["secrets"] + cli_trail["ids"] + cli_trail["refs"]:
        assert leak not in page
    assert HOSTILE_ACTOR not in page and "&lt;script&gt;" in page
    assert "<td>key.rotated</td>" in section(page, "keys")
    decrypts = section(page, "decrypts")
    assert re.search(r'<td>juki-app</td><td class="num">4</td><td class="num">4</td>', decrypts)
    assert "VERIFIED" in section(page, "chain")


def test_cli_report_from_an_export_offline(cli_trail: dict[str, Any]) -> None:
    """--from-export with --public-key reports on an export file; a tampered one exits 65."""
    home: Path = cli_trail["home"]
    run = cli_trail["run"]
    assert run("audit", "export", "-o", str(home / "e.jsonl")).returncode == 0
    (home / "k.pem").write_text(run("audit", "public-key").stdout, encoding="ascii")
    out = home / "offline.html"
    done = run("audit", "report", "--from-export", str(home / "e.jsonl"), "--public-key",
               str(home / "k.pem"), "--out", str(out), "--utc")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "UTC" in out.read_text(encoding="utf-8")
    text = (home / "e.jsonl").read_text(encoding="utf-8").replace('"juki-app"', '"juki-apq"', 1)
    (home / "bad.jsonl").write_text(text, encoding="utf-8")
    done = run("audit", "report", "--from-export", str(home / "bad.jsonl"), "--public-key",
               str(home / "k.pem"), "--out", str(home / "bad.html"))  # fmt: skip
    assert done.returncode == 65 and "does NOT verify" in done.stderr
    assert "VERIFICATION FAILED" in (home / "bad.html").read_text(encoding="utf-8")
