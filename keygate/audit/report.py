"""``keygate audit report``: one self-contained HTML page about the trail, for security reviewers.

The page is built from a *verified* JSON Lines export (:mod:`keygate.audit.export`, checked by
:mod:`keygate.audit.verify`): the report shows the chain's verification status for the range —
up to which signed checkpoint, with which key fingerprint, from which anchor — and figures from
exactly the events that were verified.  If verification fails the page says so in red and its
figures are marked unverified.

Self-contained and inert: no external resource, no JavaScript (a ``Content-Security-Policy`` of
``default-src 'none'`` forbids both), inline CSS, charts as inline SVG drawn here.  Every string
taken from the trail goes through :func:`html.escape`.  The trail holds no plaintext, key
material, token or record id (record ids appear only as keyed pseudonyms), and the report does
not even show the pseudonyms: record events are only counted.

Sections (labels in Japanese and English), and the events each one takes:

* 復号件数 / decrypts per caller per day — ``*.decrypt`` events (``crypto.decrypt``,
  ``record.decrypt``) that succeeded, counted in records (``items - items_failed``);
* テナント・用途別 / by tenant and purpose — records encrypted, decrypted and rewrapped, and
  refusals, per tenant × purpose;
* 拒否・失敗 / denied and failed requests — every event whose outcome is not ``ok``, by caller,
  tenant and error code (with its HTTP status);
* 鍵のライフサイクル / key lifecycle — every ``key.*`` event (created, rotated, disabled, enabled,
  destruction scheduled, destroyed …);
* 鍵管理者の申請と承認 / custodian requests and approvals — actions starting with
  :data:`CUSTODIAN_PREFIXES` (``custody.``, ``custodian.``, ``request.``, ``approval.``,
  ``dual_control.``, ``destruction.``, ``key.destroy``, ``key.destruction``), except the API's
  own ``request.rejected`` (a malformed HTTP request, recognised by its ``path`` detail), which
  counts as a failed request; with the request id (a custody request's id);
* テナント・利用者・ポリシー / tenants, identities and policy — ``tenant.``, ``identity.``,
  ``policy.``, ``residency.``;
* プロバイダ変更 / provider changes — ``provider.``;
* 監査証跡の保存 / the trail's own records — ``audit.`` (archives, prunes);
* 全操作 / every action by outcome.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, Final

from keygate.audit.verify import VerifyResult, verify_export

__all__ = [
    "ACCESS_PREFIXES",
    "CUSTODIAN_PREFIXES",
    "JST",
    "ReportSummary",
    "render_report",
    "report_from_export",
    "report_from_store",
]

JST: Final = timezone(timedelta(hours=9), "JST")
#: custodian requests, approvals and scheduled destruction (dual control) are matched by prefix
CUSTODIAN_PREFIXES: Final = (
    "custody.",
    "custodian.",
    "request.",
    "approval.",
    "dual_control.",
    "destruction.",
    "key.destroy",
    "key.destruction",
)
ACCESS_PREFIXES: Final = ("tenant.", "identity.", "policy.", "residency.")
PROVIDER_PREFIX: Final = "provider."
TRAIL_PREFIX: Final = "audit."
KEY_PREFIX: Final = "key."
#: the API's event for a malformed HTTP request (carries a ``path`` detail): not a custodian one
_HTTP_REJECTED: Final = "request.rejected"
#: rows listed per event table (the rest are counted)
MAX_ROWS: Final = 500
#: callers drawn separately in the chart; the others are summed as "others"
TOP_CALLERS: Final = 8
#: detail entries never shown (pseudonyms are not needed to review a key's life)
_HIDDEN_DETAIL: Final = frozenset({"record_ref", "record_refs"})
_MAX_CELL: Final = 160
#: Okabe-Ito, readable by colour-blind reviewers; grey for "others"
_COLOURS: Final = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C6D1F", "#000000",
)  # fmt: skip
_OTHER_COLOUR: Final = "#A0A0A0"


def _e(value: object) -> str:
    """Text for HTML (and inline SVG): every string from the trail passes through here."""
    return html.escape("" if value is None else str(value), quote=True)


def _l(ja: str, en: str) -> str:
    """A bilingual label (both are constants of this module)."""
    return f'<span lang="ja">{_e(ja)}</span> <span class="en" lang="en">{_e(en)}</span>'


def _short(value: object, limit: int = _MAX_CELL) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _parse_ts(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def is_custodian_action(action: str, detail: Mapping[str, Any]) -> bool:
    """Whether an action belongs to the custodian (dual control) section."""
    if action == _HTTP_REJECTED and "path" in detail:
        return False
    return action.startswith(CUSTODIAN_PREFIXES)


# ---------------------------------------------------------------------- tally
@dataclass
class _Row:
    ts: datetime
    actor: str
    action: str
    outcome: str
    code: str
    tenant: str
    purpose: str
    version: str
    detail: str
    request_id: str = ""


@dataclass
class _Listing:
    rows: list[_Row] = field(default_factory=list)
    more: int = 0

    def add(self, row: _Row) -> None:
        if len(self.rows) < MAX_ROWS:
            self.rows.append(row)
        else:
            self.more += 1

    @property
    def total(self) -> int:
        return len(self.rows) + self.more


@dataclass
class _Tally:
    tz: tzinfo
    since: datetime | None
    until: datetime | None
    tenant: str | None
    events: int = 0
    stubs: int = 0
    first_ts: datetime | None = None
    last_ts: datetime | None = None
    #: (day, caller) -> records decrypted / decrypt calls
    decrypts: Counter[tuple[date, str]] = field(default_factory=Counter)
    decrypt_calls: Counter[tuple[date, str]] = field(default_factory=Counter)
    #: (tenant, purpose) -> {"encrypt"|"decrypt"|"rewrap"|"refused": records or events}
    volume: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    #: (caller, tenant, code, outcome) -> count; first and last time
    denied: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    denied_span: dict[tuple[str, str, str, str], tuple[datetime, datetime]] = field(
        default_factory=dict
    )
    denied_days: Counter[tuple[date, str]] = field(default_factory=Counter)
    keys: _Listing = field(default_factory=_Listing)
    custodian: _Listing = field(default_factory=_Listing)
    access: _Listing = field(default_factory=_Listing)
    providers: _Listing = field(default_factory=_Listing)
    trail: _Listing = field(default_factory=_Listing)
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, ev: Mapping[str, Any]) -> None:
        ts = _parse_ts(ev.get("ts"))
        if ts is None:
            return
        if self.since is not None and ts < self.since:
            return
        if self.until is not None and ts >= self.until:
            return
        action = str(ev.get("action", ""))
        tenant = ev.get("tenant")
        if (
            self.tenant is not None
            and tenant != self.tenant
            and not action.startswith(TRAIL_PREFIX)
        ):
            return
        self.events += 1
        self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        outcome = str(ev.get("outcome", ""))
        actor = str(ev.get("actor", ""))
        code = str(ev.get("code") or "")
        purpose = str(ev.get("purpose") or "")
        tenant_s = str(tenant or "")
        raw_detail = ev.get("detail")
        detail: Mapping[str, Any] = raw_detail if isinstance(raw_detail, dict) else {}
        items, failed = _count(ev.get("items"), 1), _count(ev.get("items_failed"), 0)
        day = ts.astimezone(self.tz).date()
        verb = action.rsplit(".", 1)[-1]
        self.actions[(action, outcome)] += 1

        if outcome == "ok" and verb in ("encrypt", "decrypt", "rewrap"):
            done = max(items - failed, 0)
            self.volume.setdefault((tenant_s, purpose), Counter())[verb] += done
            if verb == "decrypt":
                self.decrypts[(day, actor)] += done
                self.decrypt_calls[(day, actor)] += 1
        if outcome != "ok":
            key = (actor, tenant_s, code or "-", outcome)
            self.denied[key] += 1
            low, high = self.denied_span.get(key, (ts, ts))
            self.denied_span[key] = (min(low, ts), max(high, ts))
            self.denied_days[(day, code or "-")] += 1
            if tenant_s or purpose:
                self.volume.setdefault((tenant_s, purpose), Counter())["refused"] += 1

        version = ev.get("key_version")
        row = _Row(
            ts, actor, action, outcome, code, tenant_s, purpose,
            "" if version is None else f"v{version}", _detail_text(detail),
            _short(ev.get("request_id"), 64),
        )  # fmt: skip
        if is_custodian_action(action, detail):
            self.custodian.add(row)
        if action.startswith(KEY_PREFIX):
            self.keys.add(row)
        elif action.startswith(ACCESS_PREFIXES):
            self.access.add(row)
        elif action.startswith(PROVIDER_PREFIX):
            self.providers.add(row)
        elif action.startswith(TRAIL_PREFIX):
            self.trail.add(row)


def _count(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _detail_text(detail: Mapping[str, Any]) -> str:
    parts = []
    for key in sorted(detail):
        if key in _HIDDEN_DETAIL:
            continue
        value = detail[key]
        shown = "—" if value is None else str(value).lower() if isinstance(value, bool) else value
        parts.append(f"{key}={_short(shown, 80)}")
    return _short("; ".join(parts))


# ---------------------------------------------------------------------- charts (inline SVG)
def _nice_max(value: float) -> tuple[float, float]:
    """A round axis maximum and tick step for values up to ``value``."""
    if value <= 0:
        return 1.0, 1.0
    raw = value / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return step * math.ceil(value / step), step


def _fmt(n: float) -> str:
    return f"{int(n):,}" if float(n).is_integer() else f"{n:,.1f}"


def _stacked_bars(
    days: Sequence[date],
    series: Sequence[tuple[str, str, Sequence[int]]],
    *,
    label: str,
    width: int = 1160,
    height: int = 300,
) -> str:
    """Stacked daily bars: ``series`` is ``(name, colour, value per day)``."""
    left, right, top, bottom = 70, 12, 12, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(s[2][i] for s in series) for i in range(len(days))]
    y_max, step = _nice_max(max(totals, default=0))
    band = plot_w / max(len(days), 1)
    bar = max(min(band * 0.78, 44.0), 1.0)
    out = [
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">',
        f"<title>{_e(label)}</title>",
    ]
    tick = 0.0
    while tick <= y_max + 1e-9:
        y = top + plot_h - plot_h * tick / y_max
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
            f"{_fmt(tick)}</text>"
        )
        tick += step
    every = max(1, math.ceil(len(days) / 14))
    for i, day in enumerate(days):
        x = left + band * i + (band - bar) / 2
        y0: float = top + plot_h
        for name, colour, values in series:
            v = values[i]
            if v <= 0:
                continue
            h = plot_h * v / y_max
            y0 -= h
            out.append(
                f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{_e(day.isoformat())} {_e(name)}: {_fmt(v)}'
                "</title></rect>"
            )
        if i % every == 0:
            out.append(
                f'<text x="{left + band * i + band / 2:.1f}" y="{top + plot_h + 18}" '
                f'text-anchor="middle" class="tick">{_e(day.strftime("%m-%d"))}</text>'
            )
    out.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" '
        'class="axis"/>'
    )
    if days:
        out.append(f'<text x="{left}" y="{height - 6}" class="tick">{_e(days[0].year)}</text>')
    out.append("</svg>")
    return "".join(out)


def _hbars(items: Sequence[tuple[str, int]], *, label: str, width: int = 1160) -> str:
    """Horizontal bars, one per ``(name, value)``."""
    left, right, row = 260, 90, 24
    height = row * len(items) + 30
    plot_w = width - left - right
    top_value = max((v for _, v in items), default=0) or 1
    out = [
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">',
        f"<title>{_e(label)}</title>",
    ]
    for i, (name, value) in enumerate(items):
        y = 10 + row * i
        w = plot_w * value / top_value
        colour = _COLOURS[i % len(_COLOURS)]
        out.append(
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" class="lab">'
            f"{_e(_short(name, 34))}</text>"
            f'<rect x="{left}" y="{y + 2}" width="{max(w, 1):.1f}" height="{row - 6}" '
            f'fill="{colour}"><title>{_e(name)}: {_fmt(value)}</title></rect>'
            f'<text x="{left + w + 6:.1f}" y="{y + 15}" class="tick">{_fmt(value)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _legend(series: Sequence[tuple[str, str, Sequence[int]]]) -> str:
    items = "".join(
        f'<li><span class="sw" style="background:{colour}"></span>{_e(name)}</li>'
        for name, colour, _ in series
    )
    return f'<ul class="legend">{items}</ul>'


def _day_range(days: Iterable[date]) -> list[date]:
    seen = sorted(set(days))
    if not seen:
        return []
    first, last = seen[0], seen[-1]
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


# ---------------------------------------------------------------------- sections
def _table(
    head: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Sequence[int] = ()
) -> str:
    """``head`` cells are trusted HTML (labels); row cells are escaped here."""
    cols = "".join(f"<th>{h}</th>" for h in head)
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(r)
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        return f'<p class="none">{_l("該当なし", "none")}</p>'
    return f"<table><thead><tr>{cols}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _when(ts: datetime | None, tz: tzinfo) -> str:
    if ts is None:
        return "—"
    local = ts.astimezone(tz)
    return local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or "")


def _decrypt_section(t: _Tally) -> str:
    per_caller: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    active: dict[str, set[date]] = {}
    for (day, caller), n in t.decrypts.items():
        per_caller[caller] += n
        calls[caller] += t.decrypt_calls[(day, caller)]
        active.setdefault(caller, set()).add(day)
    days = _day_range(d for d, _ in t.decrypts)
    top = [c for c, _ in per_caller.most_common(TOP_CALLERS)]
    series: list[tuple[str, str, Sequence[int]]] = [
        (c, _COLOURS[i % len(_COLOURS)], [t.decrypts[(d, c)] for d in days])
        for i, c in enumerate(top)
    ]
    others = [c for c in per_caller if c not in top]
    if others:
        series.append(
            (
                f"その他 / others ({len(others)})",
                _OTHER_COLOUR,
                [sum(t.decrypts[(d, c)] for c in others) for d in days],
            )
        )
    parts = [
        '<section id="decrypts"><h2>'
        + _l("復号件数（呼び出し元・日別）", "Decrypts per caller per day")
        + "</h2>",
        '<p class="note">'
        + _l(
            f"成功した復号のレコード数（日付は {_tzlabel(t.tz)}）。",
            f"Records decrypted successfully; days in {_tzlabel(t.tz)}.",
        )
        + "</p>",
    ]
    if not days:
        parts.append(f'<p class="none">{_l("復号はありません", "no decrypts")}</p></section>')
        return "".join(parts)
    parts.append(
        '<figure class="chart">'
        + _stacked_bars(days, series, label="復号件数 / decrypts per day")
        + _legend(series)
        + "</figure>"
    )
    shown = [s[0] for s in series]
    head = [_l("日付", "day"), *[_e(s) for s in shown], _l("合計", "total")]
    rows = []
    for i, d in enumerate(days):
        values = [s[2][i] for s in series]
        if any(values):
            rows.append([d.isoformat(), *[_fmt(v) for v in values], _fmt(sum(values))])
    parts.append(_table(head, rows, numeric=range(1, len(head))))
    parts.append(f"<h3>{_l('呼び出し元ごとの合計', 'Totals per caller')}</h3>")
    parts.append(
        _table(
            [
                _l("呼び出し元", "caller"),
                _l("復号件数", "records"),
                _l("呼び出し", "calls"),
                _l("日数", "active days"),
            ],
            (
                [c, _fmt(n), _fmt(calls[c]), _fmt(len(active[c]))]
                for c, n in per_caller.most_common()
            ),
            numeric=(1, 2, 3),
        )
    )
    parts.append("</section>")
    return "".join(parts)


def _tenant_section(t: _Tally) -> str:
    parts = [f'<section id="tenants"><h2>{_l("テナント・用途別", "By tenant and purpose")}</h2>']
    ranked = sorted(t.volume.items(), key=lambda kv: (-kv[1]["decrypt"], kv[0]))
    chart = [(f"{tn or '—'} / {p or '—'}", c["decrypt"]) for (tn, p), c in ranked if c["decrypt"]]
    if chart:
        parts.append(
            '<figure class="chart">'
            + _hbars(
                chart[:25], label="テナント・用途別の復号件数 / decrypts by tenant and purpose"
            )
            + "</figure>"
        )
    parts.append(
        _table(
            [
                _l("テナント", "tenant"),
                _l("用途", "purpose"),
                _l("暗号化", "encrypted"),
                _l("復号", "decrypted"),
                _l("再ラップ", "rewrapped"),
                _l("拒否・失敗", "refused"),
            ],
            (
                [
                    tn or "—",
                    p or "—",
                    _fmt(c["encrypt"]),
                    _fmt(c["decrypt"]),
                    _fmt(c["rewrap"]),
                    _fmt(c["refused"]),
                ]
                for (tn, p), c in ranked
            ),
            numeric=(2, 3, 4, 5),
        )
    )
    parts.append("</section>")
    return "".join(parts)


def _denied_section(t: _Tally, status_by_code: Mapping[str, int]) -> str:
    parts = [
        f'<section id="denied"><h2>{_l("拒否・失敗したリクエスト", "Denied and failed requests")}'
        "</h2>",
        '<p class="note">'
        + _l(
            "結果が ok 以外のすべてのイベント（401/403 は拒否）。",
            "Every event whose outcome is not ok (401/403: denied).",
        )
        + "</p>",
    ]
    if not t.denied:
        parts.append(f'<p class="none">{_l("ありません", "none")}</p></section>')
        return "".join(parts)
    days = _day_range(d for d, _ in t.denied_days)
    codes = Counter[str]()
    for (_, code), n in t.denied_days.items():
        codes[code] += n
    top = [c for c, _ in codes.most_common(6)]
    series: list[tuple[str, str, Sequence[int]]] = [
        (
            f"{c} ({status_by_code[c]})" if c in status_by_code else c,
            _COLOURS[(i + 3) % len(_COLOURS)],
            [t.denied_days[(d, c)] for d in days],
        )
        for i, c in enumerate(top)
    ]
    rest = [c for c in codes if c not in top]
    if rest:
        series.append(
            (
                "その他 / others",
                _OTHER_COLOUR,
                [sum(t.denied_days[(d, c)] for c in rest) for d in days],
            )
        )
    parts.append(
        '<figure class="chart">'
        + _stacked_bars(days, series, label="拒否・失敗 / denied and failed per day", height=240)
        + _legend(series)
        + "</figure>"
    )
    rows = []
    for key, n in t.denied.most_common(MAX_ROWS):
        caller, tenant, code, outcome = key
        low, high = t.denied_span[key]
        status = status_by_code.get(code)
        rows.append(
            [caller, tenant or "—", code, "—" if status is None else str(status), outcome,
             _fmt(n), _when(low, t.tz), _when(high, t.tz)]
        )  # fmt: skip
    parts.append(
        _table(
            [
                _l("呼び出し元", "caller"),
                _l("テナント", "tenant"),
                _l("コード", "code"),
                "HTTP",
                _l("結果", "outcome"),
                _l("件数", "count"),
                _l("最初", "first"),
                _l("最後", "last"),
            ],
            rows,
            numeric=(5,),
        )
    )
    if len(t.denied) > MAX_ROWS:
        parts.append(f'<p class="note">… {len(t.denied) - MAX_ROWS} more</p>')
    parts.append("</section>")
    return "".join(parts)


def _event_section(
    anchor: str, title: str, note: str, listing: _Listing, tz: tzinfo, *, requests: bool = False
) -> str:
    """One row per event; ``requests`` adds the request id column (custody request ids)."""
    parts = [f'<section id="{anchor}"><h2>{title}</h2>']
    if note:
        parts.append(f'<p class="note">{note}</p>')
    head = [
        _l("日時", "time"),
        _l("実行者", "actor"),
        _l("操作", "action"),
        _l("結果", "outcome"),
        _l("テナント", "tenant"),
        _l("用途", "purpose"),
        _l("版", "version"),
        *([_l("申請ID", "request")] if requests else []),
        _l("詳細", "detail"),
    ]
    parts.append(
        _table(
            head,
            (
                [
                    _when(r.ts, tz),
                    r.actor,
                    r.action,
                    r.outcome + (f" ({r.code})" if r.code else ""),
                    r.tenant or "—",
                    r.purpose or "—",
                    r.version or "—",
                    *([r.request_id] if requests else []),
                    r.detail,
                ]
                for r in listing.rows
            ),
        )
    )
    if listing.more:
        parts.append(
            f'<p class="note">… {listing.more} '
            f"{_l('件は省略（エクスポートを参照）', 'more not listed (see the export)')}</p>"
        )
    parts.append("</section>")
    return "".join(parts)


def _actions_section(t: _Tally) -> str:
    rows = [
        [action, outcome, _fmt(n)]
        for (action, outcome), n in sorted(t.actions.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]
    return (
        f'<section id="actions"><h2>{_l("全操作の件数", "Every action by outcome")}</h2>'
        + _table(
            [_l("操作", "action"), _l("結果", "outcome"), _l("件数", "events")], rows, numeric=(2,)
        )
        + "</section>"
    )


def _fingerprint(hex_id: str | None) -> str:
    if not hex_id:
        return "—"
    return " ".join(hex_id[i : i + 8] for i in range(0, len(hex_id), 8))


def _chain_section(r: VerifyResult, tz: tzinfo) -> str:
    if r.ok:
        badge = f'<p class="badge ok">✔ {_l("検証済み", "VERIFIED")}</p>'
    else:
        where = f"line {r.line}" + (f" (seq {r.seq})" if r.seq is not None else "")
        badge = (
            f'<p class="badge bad">✘ {_l("検証失敗", "VERIFICATION FAILED")}</p>'
            f'<p class="bad-detail">{_e(where)}: {_e(r.reason)}<br>'
            f"{_l('以下の数値は検証されていません。', 'The figures below are NOT verified.')}</p>"
        )
    if r.anchor_seq is None:
        start = _l("seq 1（起点）から", "from seq 1 (genesis)")
    else:
        start = (
            _l("署名済みチェックポイントの後から", "after the signed checkpoint at")
            + f" seq {_e(r.anchor_seq)}"
        )
    cp_ts = _when(_parse_ts(r.last_checkpoint_ts), tz) if r.last_checkpoint_ts else "—"
    rows = [
        (_l("検証範囲", "verified range"),
         f"seq {_e(r.first_seq if r.first_seq is not None else '—')} … "
         f"{_e(r.last_seq if r.last_seq is not None else '—')} — {start}"),
        (_l("イベント", "events"),
         f"{_e(_fmt(r.events))} + {_e(_fmt(r.omitted))} "
         f"{_l('件（対象外：ハッシュのみ）', 'outside the filter (hash only)')}"),
        (_l("署名済みチェックポイント", "signed checkpoints"), _e(_fmt(r.checkpoints))),
        (_l("最後のチェックポイント", "verified up to checkpoint"),
         f"seq {_e(r.last_checkpoint_seq if r.last_checkpoint_seq is not None else '—')}, "
         f"{_e(cp_ts)}"),
        (_l("署名鍵（SHA-256 指紋）", "signing key (SHA-256 fingerprint)"),
         f"<code>{_e(_fingerprint(r.key_id))}</code> (ECDSA P-256)"),
    ]  # fmt: skip
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    parts = [
        f'<section id="chain"><h2>{_l("改ざん検知チェーンの検証", "Chain verification")}</h2>',
        badge,
        f'<table class="kv"><tbody>{body}</tbody></table>',
    ]
    if r.prunes:
        parts.append(f"<h3>{_l('削除記録（保存期間）', 'Pruning records (retention)')}</h3>")
        parts.append(
            _table(
                [
                    "seq",
                    _l("削除範囲", "removed"),
                    _l("件数", "events"),
                    _l("アーカイブ SHA-256", "archive SHA-256"),
                ],
                (
                    [
                        str(p.seq),
                        f"{p.from_seq} … {p.to_seq}",
                        _fmt(p.events),
                        "— (forced: no archive)"
                        if p.forced or not p.archive_sha256
                        else p.archive_sha256,
                    ]
                    for p in r.prunes
                ),
                numeric=(2,),
            )
        )
    parts.append("</section>")
    return "".join(parts)


def _tzlabel(tz: tzinfo) -> str:
    return tz.tzname(None) or "UTC"


_CSS: Final = """
*{box-sizing:border-box}
body{margin:0;padding:24px 40px 48px;font:14px/1.55 "IPAPGothic","IPAGothic","Noto Sans CJK JP",
"Hiragino Sans","Yu Gothic","Meiryo",system-ui,sans-serif;color:#1b1f24;background:#fff}
header{border-bottom:3px solid #0b3d91;margin-bottom:16px}
h1{font-size:26px;margin:0 0 4px;color:#0b3d91}
h2{font-size:19px;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid #c8d0da}
h3{font-size:15px;margin:18px 0 6px}
.en{color:#5a6572;font-weight:normal}
h1 .en,h2 .en,h3 .en{font-size:.8em}
.note{color:#5a6572;margin:4px 0 8px}
.none{color:#5a6572;font-style:italic}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d5dbe3;padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#eef2f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{background:#f5f7fa;width:300px}
code{font:12px/1.4 "DejaVu Sans Mono",monospace;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{border:1px solid #d5dbe3;border-radius:6px;padding:8px 14px;min-width:160px}
.card b{display:block;font-size:22px}
.badge{display:inline-block;font-size:18px;font-weight:bold;padding:6px 14px;border-radius:6px;
margin:4px 0}
.badge.ok{background:#e3f4e8;color:#0b6b2c;border:1px solid #7cc793}
.badge.bad{background:#fde8e8;color:#a01010;border:1px solid #e08a8a}
.bad-detail{color:#a01010;font-weight:bold}
figure.chart{margin:8px 0}
svg{max-width:100%;height:auto;font:11px "IPAPGothic","Noto Sans CJK JP",sans-serif}
svg .grid{stroke:#e3e8ee;stroke-width:1}
svg .axis{stroke:#5a6572;stroke-width:1}
svg .tick{fill:#3d4650;font-size:11px}
svg .lab{fill:#1b1f24;font-size:12px}
ul.legend{list-style:none;display:flex;flex-wrap:wrap;gap:4px 18px;padding:0;margin:4px 0}
.sw{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:-1px}
nav ul{columns:3;padding-left:18px;margin:6px 0}
footer{margin-top:36px;color:#5a6572;font-size:12px;border-top:1px solid #c8d0da}
"""


def render_report(
    tally: _Tally,
    result: VerifyResult,
    *,
    status_by_code: Mapping[str, int],
    generated_at: datetime,
    source: str,
) -> str:
    """The HTML page (a string) from a tally and the verification result."""
    tz = tally.tz
    filters = [
        (_l("期間（開始）", "since"), _when(tally.since, tz) if tally.since else "—"),
        (_l("期間（終了・含まない）", "until (exclusive)"), _when(tally.until, tz)
         if tally.until else "—"),
        (_l("テナント", "tenant"), tally.tenant or "全テナント / all"),
        (_l("最初と最後のイベント", "first and last event"),
         f"{_when(tally.first_ts, tz)} … {_when(tally.last_ts, tz)}"),
        (_l("作成日時", "generated"), _when(generated_at, tz)),
        (_l("出典", "source"), source),
    ]  # fmt: skip
    meta = "".join(f"<tr><th>{k}</th><td>{_e(v)}</td></tr>" for k, v in filters)
    decrypted = sum(tally.decrypts.values())
    refused = sum(tally.denied.values())
    status = _l("検証済み", "verified") if result.ok else _l("検証失敗", "FAILED")
    cards = [
        (_l("イベント", "events"), _e(_fmt(tally.events))),
        (_l("復号件数", "decrypts"), _e(_fmt(decrypted))),
        (_l("拒否・失敗", "denied / failed"), _e(_fmt(refused))),
        (_l("鍵の操作", "key lifecycle"), _e(_fmt(tally.keys.total))),
        (_l("申請・承認", "custodian"), _e(_fmt(tally.custodian.total))),
        (_l("チェーン", "chain"), status),
    ]
    sections = [
        ("chain", _l("チェーンの検証", "Chain verification")),
        ("decrypts", _l("復号件数", "Decrypts")),
        ("tenants", _l("テナント・用途別", "By tenant and purpose")),
        ("denied", _l("拒否・失敗", "Denied and failed")),
        ("keys", _l("鍵のライフサイクル", "Key lifecycle")),
        ("custodian", _l("申請と承認", "Custodian requests and approvals")),
        ("access", _l("テナント・利用者・ポリシー", "Tenants, identities, policy")),
        ("providers", _l("プロバイダ変更", "Provider changes")),
        ("trail", _l("監査証跡の保存", "Archives and pruning")),
        ("actions", _l("全操作", "Every action")),
    ]
    nav = "".join(f'<li><a href="#{a}">{label}</a></li>' for a, label in sections)
    custodian_note = (
        _l(
            "操作名の接頭辞で抽出：",
            "matched by action prefix:",
        )
        + " <code>"
        + _e(", ".join(CUSTODIAN_PREFIXES))
        + "</code>"
    )
    body = [
        "<header>",
        f"<h1>{_l('keygate 監査レポート', 'audit report')}</h1>",
        f'<table class="kv"><tbody>{meta}</tbody></table>',
        "</header>",
        '<div class="cards">',
        *(f'<div class="card">{k}<b>{v}</b></div>' for k, v in cards),
        "</div>",
        f"<nav><ul>{nav}</ul></nav>",
        _chain_section(result, tz),
        _decrypt_section(tally),
        _tenant_section(tally),
        _denied_section(tally, status_by_code),
        _event_section(
            "keys", _l("鍵のライフサイクル", "Key lifecycle"),
            _l("key.* のすべてのイベント。", "Every key.* event."), tally.keys, tz,
        ),
        _event_section(
            "custodian", _l("鍵管理者の申請と承認", "Custodian requests and approvals"),
            custodian_note, tally.custodian, tz, requests=True,
        ),
        _event_section(
            "access", _l("テナント・利用者・ポリシー", "Tenants, identities and policy"),
            "<code>" + _e(", ".join(ACCESS_PREFIXES)) + "</code>", tally.access, tz,
        ),
        _event_section(
            "providers", _l("プロバイダ変更", "Provider changes"),
            "<code>provider.*</code>", tally.providers, tz,
        ),
        _event_section(
            "trail", _l("監査証跡の保存（アーカイブ・削除）", "The trail's archives and pruning"),
            "<code>audit.*</code>", tally.trail, tz,
        ),
        _actions_section(tally),
        "<footer><p>",
        _l(
            "このレポートには平文・鍵・トークン・レコードIDは含まれません（証跡にはレコードIDの"
            "仮名のみが記録され、本レポートはそれも表示しません）。",
            "This report holds no plaintext, key material, token or record id (the trail holds "
            "only keyed pseudonyms of record ids, and the report does not show even those).",
        ),
        "</p><p>",
        _l(
            "完全性の確認には、エクスポートを公開鍵で検証してください：",
            "To check completeness, verify the export with the public key:",
        ),
        " <code>keygate audit verify FILE --public-key PEM</code></p></footer>",
    ]  # fmt: skip
    return (
        "<!DOCTYPE html>\n"
        '<html lang="ja"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        "<title>keygate 監査レポート / audit report</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------------- entry points
@dataclass(frozen=True, slots=True)
class ReportSummary:
    ok: bool
    events: int
    decrypts: int
    refused: int
    result: VerifyResult


def _event_objects(path: Path) -> Iterator[Mapping[str, Any]]:
    with path.open(encoding="utf-8", newline="") as lines:
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("type") == "event":
                event = obj.get("event")
                if isinstance(event, dict):
                    yield event


def report_from_export(
    export: Path,
    out: Path,
    *,
    public_key_pem: bytes,
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
    status_by_code: Mapping[str, int] | None = None,
    tz: tzinfo = JST,
    now: datetime | None = None,
    source: str | None = None,
) -> ReportSummary:
    """Verify a JSON Lines export, then write the report of its events to ``out``.

    Two streaming passes over the file (verify, then count): memory stays bounded by the
    number of distinct callers × days, not by the number of events.
    """
    with export.open(encoding="utf-8", newline="") as lines:
        result = verify_export(lines, public_key_pem)
    tally = _Tally(tz, since, until, tenant)
    for event in _event_objects(export):
        tally.add(event)
    page = render_report(
        tally,
        result,
        status_by_code=status_by_code or {},
        generated_at=now or datetime.now(UTC),
        source=source or export.name,
    )
    _write_atomically(out, page.encode("utf-8"))
    return ReportSummary(
        result.ok, tally.events, sum(tally.decrypts.values()), sum(tally.denied.values()), result
    )


def report_from_store(
    store: Any,
    out: Path,
    *,
    checkpoint_now: Callable[[], Any],
    public_key_pem: bytes,
    key_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
    status_by_code: Mapping[str, int] | None = None,
    tz: tzinfo = JST,
    now: datetime | None = None,
) -> ReportSummary:
    """Export the range (signing the head first), verify it, and report on it."""
    from keygate.audit.export import export_trail  # noqa: PLC0415 - keeps verify-only imports light

    with tempfile.TemporaryDirectory(prefix="keygate-report-") as tmp:
        path = Path(tmp) / "trail.jsonl"
        with path.open("wb") as f:
            export_trail(
                store, f, checkpoint_now=checkpoint_now, since=since, until=until, tenant=tenant,
                key_id=key_id, now=now,
            )  # fmt: skip
        return report_from_export(
            path, out, public_key_pem=public_key_pem, since=since, until=until, tenant=tenant,
            status_by_code=status_by_code, tz=tz, now=now, source="keygate audit trail (live)",
        )  # fmt: skip


def _write_atomically(path: Path, data: bytes) -> None:
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).chmod(0o640)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
