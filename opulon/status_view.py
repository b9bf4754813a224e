"""What a key holder sees about their own key, and the HTML it is shown in.

:func:`read_usage` reads the key's stored metadata (tokens per UTC day for the last 30 days,
the last requests), :func:`build_status` joins it with the key's record and the live limiter
state, :func:`status_json` and :func:`render_status_page` present the result. The page shell
(:func:`page`) is shared by every page of the site: a system font, no external asset, no
script, readable from a phone to a desktop, light or dark.
"""

from __future__ import annotations

import html
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from opulon.keys import KeyRecord
from opulon.limiter import LimitState
from opulon.limits import Limit, format_duration

DAYS = 30
RECENT = 20
_DAY = 86400

_METRIC_NAMES = {
    "requests": "Requests",
    "tokens": "Tokens",
    "input_tokens": "Input tokens",
    "output_tokens": "Output tokens",
}
_UNITS = (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


# -- the data -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitView:
    """One limit of the key with its use right now (in-flight reservations included)."""

    limit: Limit
    used: int
    remaining: int
    reset_seconds: float

    @property
    def title(self) -> str:
        """``Requests per minute``, ``Tokens per 5 hours``, ``Tokens, lifetime budget``."""
        name = _METRIC_NAMES.get(self.limit.metric, self.limit.metric)
        if self.limit.window_seconds is None:
            return f"{name}, lifetime budget"
        return f"{name} per {window_text(self.limit.window_seconds).removeprefix('1 ')}"

    @property
    def fraction(self) -> float:
        return min(1.0, self.used / self.limit.amount) if self.limit.amount else 1.0


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One UTC day of the key's use."""

    day: date
    requests: int
    input_tokens: int
    output_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class RecentRequest:
    """One stored request, exactly the metadata the privacy policy names."""

    ts: float
    model: str
    status: int
    input_tokens: int
    output_tokens: int
    latency_ms: float


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """Everything the status page and ``GET /v1/key-status`` show about one key."""

    record: KeyRecord
    now: float
    limits: tuple[LimitView, ...]
    in_flight: int
    days: tuple[DayUsage, ...]
    recent: tuple[RecentRequest, ...]

    @property
    def state(self) -> str:
        """``active``, ``disabled`` or ``expired``."""
        return self.record.state(self.now)


def read_usage(
    db_path: Path, key_id: int, now: float, *, days: int = DAYS, recent: int = RECENT
) -> tuple[list[DayUsage], list[RecentRequest]]:
    """Tokens per UTC day for the last ``days`` days (oldest first, empty days included) and
    the ``recent`` newest requests (newest first) of one key.

    Opens its own short-lived read-only connection, so it may run in a worker thread.
    """
    today = int(now // _DAY)
    first = today - days + 1
    conn = sqlite3.connect(str(db_path), timeout=10)
    try:
        conn.execute("PRAGMA query_only=ON")
        per_day = {
            int(day): (int(requests), int(input_tokens or 0), int(output_tokens or 0))
            for day, requests, input_tokens, output_tokens in conn.execute(
                "SELECT CAST(ts / 86400 AS INTEGER) AS day, count(*), sum(input_tokens), "
                "sum(output_tokens) FROM usage WHERE key_id = ? AND ts >= ? GROUP BY day",
                [key_id, first * _DAY],
            )
        }
        rows = conn.execute(
            "SELECT ts, model, status, input_tokens, output_tokens, latency_ms FROM usage "
            "WHERE key_id = ? ORDER BY ts DESC LIMIT ?",
            [key_id, recent],
        ).fetchall()
    finally:
        conn.close()
    epoch = date(1970, 1, 1)
    day_list = [
        DayUsage(epoch + timedelta(days=day), *per_day.get(day, (0, 0, 0)))
        for day in range(first, today + 1)
    ]
    recent_list = [
        RecentRequest(float(ts), str(model), int(status), int(i), int(o), float(latency))
        for ts, model, status, i, o, latency in rows
    ]
    return day_list, recent_list


def build_status(
    record: KeyRecord,
    states: Sequence[LimitState],
    in_flight: int,
    days: Sequence[DayUsage],
    recent: Sequence[RecentRequest],
    now: float,
) -> KeyStatus:
    """Join a key's record, its limiter state and its stored usage."""
    limits = tuple(
        LimitView(s.limit, s.used, s.remaining, max(0.0, s.reset_seconds)) for s in states
    )
    return KeyStatus(record, now, limits, in_flight, tuple(days), tuple(recent))


def status_json(status: KeyStatus) -> dict[str, Any]:
    """The JSON form of the status, for ``GET /v1/key-status``."""
    record = status.record
    return {
        "object": "key_status",
        "generated_at": iso(status.now),
        "key": {
            "prefix": record.prefix,
            "name": record.name,
            "status": status.state,
            "created_at": iso(record.created_at),
            "expires_at": iso(record.expires_at) if record.expires_at is not None else None,
            "models": list(record.models) or ["*"],
        },
        "limits": [
            {
                "limit": str(view.limit),
                "metric": view.limit.metric,
                "amount": view.limit.amount,
                "window_seconds": view.limit.window_seconds,
                "used": view.used,
                "remaining": view.remaining,
                "reset_seconds": round(view.reset_seconds, 3),
            }
            for view in status.limits
        ],
        "concurrency": (
            None
            if record.concurrency is None
            else {"limit": record.concurrency, "in_flight": status.in_flight}
        ),
        "daily": [
            {
                "date": day.day.isoformat(),
                "requests": day.requests,
                "input_tokens": day.input_tokens,
                "output_tokens": day.output_tokens,
                "tokens": day.tokens,
            }
            for day in status.days
        ],
        "recent": [
            {
                "time": iso(row.ts),
                "model": row.model,
                "status": row.status,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "latency_ms": round(row.latency_ms, 1),
            }
            for row in status.recent
        ],
    }


# -- formatting -----------------------------------------------------------------------------


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def grouped(n: int) -> str:
    """``1234567`` → ``1,234,567``."""
    return f"{n:,}"


def compact(n: int) -> str:
    """``950`` → ``950``, ``1234`` → ``1.2k``, ``1500000`` → ``1.5M``."""
    if abs(n) < 1000:
        return str(n)
    for suffix, factor in (("k", 1e3), ("M", 1e6), ("B", 1e9)):
        value = n / factor
        text = f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
        if abs(float(text)) < 1000 or suffix == "B":
            return text.removesuffix(".0") + suffix
    raise AssertionError("unreachable")  # pragma: no cover


def window_text(seconds: int) -> str:
    """``60`` → ``1 minute``, ``18000`` → ``5 hours``, ``90`` → ``90 seconds``."""
    for unit, factor in _UNITS:
        if seconds % factor == 0:
            count = seconds // factor
            return f"{count} {unit}" if count == 1 else f"{count} {unit}s"
    return f"{seconds} seconds"  # pragma: no cover - the loop ends with a factor of 1


def latency_text(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms < 10_000 else f"{ms / 1000:,.1f} s"


def _utc(ts: float, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(fmt)


def _short_date(day: date) -> str:
    return f"{day.strftime('%b')} {day.day}"


def _relative(seconds: float) -> str:
    if seconds >= 2 * _DAY:
        return f"{int(seconds // _DAY)} days"
    return format_duration(seconds)


# -- the page shell -------------------------------------------------------------------------

_CSS = """
:root{color-scheme:light dark;--bg:#f5f6f8;--card:#fff;--text:#1b1f24;--muted:#545d68;
--border:#d9dee5;--accent:#1f5fd1;--accent-soft:#e8effc;--in:#2f6fe0;--out:#8a4fd8;
--track:#e3e7ed;--ok:#146c2e;--ok-bg:#e3f4e7;--warn:#8a5a00;--warn-bg:#fdf1d8;
--bad:#b42318;--bad-bg:#fdeceb;--grid:#e6e9ee;--shadow:0 1px 2px rgba(16,24,40,.06),
0 1px 3px rgba(16,24,40,.08)}
@media (prefers-color-scheme:dark){:root{--bg:#0f1216;--card:#181c22;--text:#e8ebef;
--muted:#a4adb8;--border:#2c333d;--accent:#7fa8ff;--accent-soft:#1c2740;--in:#6b9cff;
--out:#b48cf2;--track:#2a313b;--ok:#6fd38d;--ok-bg:#143222;--warn:#f0c060;--warn-bg:#3a2d10;
--bad:#ff8a80;--bad-bg:#3d1a18;--grid:#262c35;--shadow:none}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--text);
font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
a{color:var(--accent)}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;
font-size:.92em}
pre{white-space:pre-wrap;font:inherit;margin:0}
.skip{position:absolute;left:-999px;top:0}
.skip:focus{left:1rem;top:1rem;background:var(--card);padding:.5rem 1rem;z-index:2}
.site{background:var(--card);border-bottom:1px solid var(--border)}
.site .wrap{display:flex;align-items:center;justify-content:space-between;gap:1rem;
padding-top:.8rem;padding-bottom:.8rem;flex-wrap:wrap}
.brand{font-weight:700;font-size:1.15rem;color:var(--text);text-decoration:none;
display:flex;align-items:center;gap:.5rem}
.brand::before{content:"";width:1.1rem;height:1.1rem;border-radius:.35rem;
background:linear-gradient(135deg,var(--in),var(--out))}
.site nav ul{display:flex;gap:1.1rem;list-style:none;margin:0;padding:0}
.site nav a{color:var(--muted);text-decoration:none;font-weight:500}
.site nav a:hover{color:var(--text)}
.site nav a[aria-current=page]{color:var(--text);text-decoration:underline;
text-decoration-thickness:2px;text-underline-offset:.35em}
.wrap{max-width:62rem;margin:0 auto;padding-left:1rem;padding-right:1rem}
main.wrap{padding-top:1.75rem;padding-bottom:2.5rem}
.narrow{max-width:46rem}
h1{font-size:1.75rem;line-height:1.25;margin:0 0 .35rem}
h2{font-size:1.15rem;margin:0 0 .75rem}
h3{font-size:1rem;margin:0}
.lede{color:var(--muted);margin:0 0 1.5rem}
section{margin-top:1.5rem}
.card{background:var(--card);border:1px solid var(--border);border-radius:.9rem;
padding:1.15rem 1.25rem;box-shadow:var(--shadow)}
.grid{display:grid;gap:1rem;grid-template-columns:repeat(auto-fill,minmax(15.5rem,1fr))}
.tiles{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(10rem,1fr))}
.tile .label{color:var(--muted);font-size:.85rem;font-weight:500;margin:0}
.tile .value{font-size:1.6rem;font-weight:700;line-height:1.2;margin:.2rem 0 0;
font-variant-numeric:tabular-nums}
.tile .sub{color:var(--muted);font-size:.85rem;margin:.15rem 0 0}
.pill{display:inline-flex;align-items:center;gap:.4rem;padding:.1rem .65rem;
border-radius:99px;font-size:1rem;font-weight:600}
.pill::before{content:"";width:.55rem;height:.55rem;border-radius:50%;background:currentColor}
.pill.active{color:var(--ok);background:var(--ok-bg)}
.pill.disabled{color:var(--muted);background:var(--track)}
.pill.expired{color:var(--bad);background:var(--bad-bg)}
.card.facts{margin-top:1rem}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.45rem 1.25rem;margin:0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0;overflow-wrap:anywhere}
.limit .head span{display:block;color:var(--muted);font-size:.8rem;margin-top:.1rem}
.limit .big{font-size:1.45rem;font-weight:700;margin:.5rem 0 .4rem;color:var(--text);
font-variant-numeric:tabular-nums}
.limit .big small{font-size:.95rem;font-weight:500;color:var(--muted)}
.limit p{margin:.45rem 0 0;color:var(--muted);font-size:.9rem;font-variant-numeric:tabular-nums}
.limit p b{color:var(--text);font-weight:600}
progress{-webkit-appearance:none;appearance:none;display:block;width:100%;height:.6rem;
border:0;border-radius:99px;background:var(--track);overflow:hidden;color:var(--accent)}
progress::-webkit-progress-bar{background:var(--track);border-radius:99px}
progress::-webkit-progress-value{background:var(--accent);border-radius:99px}
progress::-moz-progress-bar{background:var(--accent);border-radius:99px}
.limit.high progress::-webkit-progress-value{background:var(--warn)}
.limit.high progress::-moz-progress-bar{background:var(--warn)}
.limit.full progress::-webkit-progress-value{background:var(--bad)}
.limit.full progress::-moz-progress-bar{background:var(--bad)}
.empty{color:var(--muted);margin:0}
.chart-head{display:flex;justify-content:space-between;align-items:baseline;flex-wrap:wrap;
gap:.25rem 1rem;margin-bottom:.75rem}
.chart-head h2{margin:0}
.legend{display:flex;gap:1rem;color:var(--muted);font-size:.85rem;margin:0;padding:0;
list-style:none}
.legend li::before{content:"";display:inline-block;width:.7rem;height:.7rem;border-radius:.2rem;
margin-right:.35rem;vertical-align:-.05rem;background:var(--in)}
.legend li.out::before{background:var(--out)}
.chart{position:relative;padding-left:3rem}
.chart svg{display:block;width:100%;height:11rem}
.chart .y{position:absolute;left:0;width:2.6rem;text-align:right;font-size:.75rem;
color:var(--muted);transform:translateY(-50%);font-variant-numeric:tabular-nums}
.chart .x{display:flex;justify-content:space-between;font-size:.75rem;color:var(--muted);
margin-top:.35rem}
.chart .gridline{stroke:var(--grid);stroke-width:1}
.chart .in{fill:var(--in)}
.chart .out{fill:var(--out)}
.chart .hit{fill:transparent}
.chart g:hover .in,.chart g:hover .out{opacity:.8}
details{margin-top:.9rem}
summary{cursor:pointer;color:var(--accent);font-weight:500}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
.scroll:focus{outline:2px solid var(--accent);outline-offset:2px}
table{border-collapse:collapse;width:100%;font-size:.92rem;font-variant-numeric:tabular-nums}
caption{text-align:left;color:var(--muted);font-size:.85rem;padding-bottom:.5rem}
th,td{padding:.5rem .6rem;border-bottom:1px solid var(--border);text-align:left;
white-space:nowrap}
th{font-weight:600;color:var(--muted);font-size:.8rem;text-transform:uppercase;
letter-spacing:.03em}
tbody tr:last-child td{border-bottom:0}
td.num,th.num{text-align:right}
.code{display:inline-block;min-width:2.7rem;text-align:center;border-radius:.4rem;
padding:0 .35rem;font-weight:600}
.code.ok{color:var(--ok);background:var(--ok-bg)}
.code.warn{color:var(--warn);background:var(--warn-bg)}
.code.bad{color:var(--bad);background:var(--bad-bg)}
form.key{display:grid;gap:.5rem}
label{font-weight:600}
.hint{color:var(--muted);font-size:.88rem;margin:0}
.row{display:flex;gap:.6rem;flex-wrap:wrap}
input[type=password]{flex:1 1 16rem;min-width:0;font:inherit;font-family:ui-monospace,
SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;padding:.6rem .75rem;
border:1px solid var(--border);border-radius:.55rem;background:var(--bg);color:var(--text)}
input:focus-visible,button:focus-visible,a:focus-visible{outline:3px solid var(--accent);
outline-offset:2px}
button{font:inherit;font-weight:600;padding:.6rem 1.2rem;border:0;border-radius:.55rem;
background:var(--accent);color:#fff;cursor:pointer}
@media (prefers-color-scheme:dark){button{color:#0b1220}}
.alert{border-radius:.7rem;padding:.8rem 1rem;margin:0 0 1.25rem;border:1px solid}
.alert.error{color:var(--bad);background:var(--bad-bg);border-color:currentColor}
.alert p{margin:0;color:var(--text)}
.alert strong{color:var(--bad)}
.policy h1{font-size:1.6rem}
.policy h2{margin:1.6rem 0 .5rem}
.policy h3{margin:1rem 0 .2rem}
.policy p{margin:.4rem 0}
.policy ul{margin:.4rem 0;padding-left:1.3rem}
footer{color:var(--muted);font-size:.85rem;padding-bottom:2rem}
footer p{margin:0;border-top:1px solid var(--border);padding-top:1rem}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);
white-space:nowrap}
@media (max-width:34rem){
#recent thead{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
#recent,#recent tbody,#recent caption{display:block}
#recent tr{display:grid;grid-template-columns:minmax(0,1fr) 4.7rem 4.7rem;gap:.15rem .6rem;
padding:.6rem 0;border-bottom:1px solid var(--border);align-items:baseline}
#recent tr:last-child{border-bottom:0}
#recent td{border:0;padding:0;font-size:.8rem;color:var(--muted);text-align:right}
#recent td.model{grid-area:1/1;text-align:left;color:var(--text);font-weight:600;
font-size:.95rem;white-space:normal;overflow-wrap:anywhere}
#recent td.latency{grid-area:1/2}
#recent td.status{grid-area:1/3}
#recent td.time{grid-area:2/1;text-align:left}
#recent td.in{grid-area:2/2}
#recent td.out{grid-area:2/3}
#recent td.in::after{content:" in"}
#recent td.out::after{content:" out"}
}
@media (max-width:24rem){
#recent tr{grid-template-columns:minmax(0,1fr) auto auto}
#recent td.time{grid-area:2/1/3/4}
#recent td.in{grid-area:3/1;text-align:left}
#recent td.out{grid-area:3/2/4/4}
}
@media (max-width:34rem){
h1{font-size:1.45rem}.card{padding:1rem}
main.wrap{padding-top:1.25rem}.tile .value{font-size:1.35rem}.chart{padding-left:2.6rem}
.chart .y{width:2.2rem}.site nav ul{gap:.9rem}}
"""

_SECTION_RE = re.compile(r"\d+\.\s")
_NAV = (("/", "Home"), ("/key-status", "Key status"), ("/privacy", "Privacy"))


def page(title: str, body: str, *, current: str | None = None, narrow: bool = True) -> str:
    """A whole HTML document: the site's header, ``body`` (already escaped) in ``<main>``,
    and its footer. ``current`` is the path of the page, marked in the navigation."""
    links = "".join(
        f"<li><a href='{href}'{' aria-current=page' if href == current else ''}>{name}</a></li>"
        for href, name in _NAV
    )
    main_class = "wrap narrow" if narrow else "wrap"
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='referrer' content='no-referrer'>"
        "<link rel='icon' href='data:,'>"
        f"<title>{html.escape(title)} · Opulon</title><style>{_CSS}</style></head><body>"
        "<a class='skip' href='#main'>Skip to content</a>"
        "<header class='site'><div class='wrap'><a class='brand' href='/'>Opulon</a>"
        f"<nav aria-label='Site'><ul>{links}</ul></nav></div></header>"
        f"<main id='main' class='{main_class}'>{body}</main>"
        f"<footer class='{main_class}'><p>Opulon stores no prompts and no answers: only token counts, "
        "times, model names, status codes and latency, per key. "
        "<a href='/privacy'>Privacy policy</a></p></footer></body></html>"
    )


def policy_html(text: str) -> str:
    """A plain-text policy as HTML: its first line the title, numbered lines sections, short
    lines without a full stop subheadings, ``- `` lines lists, the rest paragraphs."""
    e = html.escape
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    parts = [f"<h1>{e(lines[0])}</h1>"]
    items: list[str] = []
    in_section = False
    for line in lines[1:]:
        if line.startswith("- "):
            items.append(f"<li>{e(line[2:])}</li>")
            continue
        if items:
            parts.append(f"<ul>{''.join(items)}</ul>")
            items = []
        if line.lower().startswith("last updated"):
            parts.append(f"<p class='lede'>{e(line)}</p>")
        elif _SECTION_RE.match(line) or (not in_section and len(line) < 40):
            parts.append(f"<h2>{e(line)}</h2>")
            in_section = True
        elif len(line) < 50 and not line.endswith((".", ":")):
            parts.append(f"<h3>{e(line)}</h3>")
        else:
            parts.append(f"<p>{e(line)}</p>")
    if items:
        parts.append(f"<ul>{''.join(items)}</ul>")
    return f"<article class='card policy'>{''.join(parts)}</article>"


# -- the status page ------------------------------------------------------------------------


def render_status_page(
    status: KeyStatus | None = None, *, error: str | None = None, error_title: str | None = None
) -> str:
    """The ``/key-status`` page: the form alone, or with an error, or the key's status."""
    e = html.escape
    parts = ["<h1>Key status</h1>"]
    if status is None:
        parts.append(
            "<p class='lede'>See your key's limits, what is left of them, and its recent "
            "use. Paste the key below: it is sent once, in the body of this request, and is "
            "neither stored nor logged.</p>"
        )
    else:
        parts.append(
            f"<p class='lede'>Key <code>{e(status.record.prefix)}</code> as of "
            f"{_utc(status.now)} UTC.</p>"
        )
    if error:
        parts.append(
            "<div class='alert error' role='alert' id='error'>"
            f"<p><strong>{e(error_title or 'Not found')}:</strong> {e(error)}</p></div>"
        )
    if status is not None:
        parts.append(_overview(status))
        parts.append(_limits(status))
        parts.append(_chart_section(status))
        parts.append(_recent(status))
    parts.append(_form(again=status is not None))
    title = "Key status" if status is None else f"Key status of {status.record.prefix}"
    return page(title, "".join(parts), current="/key-status", narrow=status is None)


def _form(*, again: bool) -> str:
    heading = "Check another key" if again else "Check your key"
    return (
        "<section class='card' aria-labelledby='form-title'>"
        f"<h2 id='form-title'>{heading}</h2>"
        "<form class='key' method='post' action='/key-status' autocomplete='off'>"
        "<label for='key'>API key</label>"
        "<div class='row'><input id='key' name='key' type='password' required "
        "autocomplete='off' autocapitalize='off' spellcheck='false' inputmode='text' "
        "placeholder='op-ul-…' aria-describedby='key-hint' minlength='16' maxlength='200'>"
        "<button type='submit'>Show status</button></div>"
        "<p class='hint' id='key-hint'>The whole key, starting with <code>op-ul-</code>. "
        "It never appears in a URL; this page is not cached.</p>"
        "</form></section>"
    )


def _overview(status: KeyStatus) -> str:
    e = html.escape
    record = status.record
    state = status.state
    total_tokens = sum(day.tokens for day in status.days)
    total_requests = sum(day.requests for day in status.days)
    today = status.days[-1] if status.days else None
    if record.expires_at is None:
        expires, expires_sub = "Never", "no expiry date"
    elif record.expires_at > status.now:
        expires = _utc(record.expires_at, "%Y-%m-%d")
        expires_sub = f"in {_relative(record.expires_at - status.now)}"
    else:
        expires = _utc(record.expires_at, "%Y-%m-%d")
        expires_sub = f"{_relative(status.now - record.expires_at)} ago"
    tiles = [
        (
            "Status",
            f"<span class='pill {e(state)}' id='status' data-status='{e(state)}'>"
            f"{e(state.capitalize())}</span>",
            e(record.name),
        ),
        ("Expires", e(expires), e(expires_sub)),
        (
            "Requests, 30 days",
            f"<span data-requests-30d='{total_requests}'>{compact(total_requests)}</span>",
            f"{grouped(today.requests)} today" if today else "",
        ),
        (
            "Tokens, 30 days",
            f"<span data-tokens-30d='{total_tokens}'>{compact(total_tokens)}</span>",
            f"{grouped(today.tokens)} today" if today else "",
        ),
    ]
    tile_html = "".join(
        f"<div class='card tile'><p class='label'>{label}</p><p class='value'>{value}</p>"
        f"<p class='sub'>{sub}</p></div>"
        for label, value, sub in tiles
    )
    models = ", ".join(record.models) if record.models else "all models"
    facts = [
        ("Key", f"<code>{e(record.prefix)}</code>…"),
        ("Name", e(record.name)),
        ("Created", f"{_utc(record.created_at)} UTC"),
        (
            "Expires",
            "never" if record.expires_at is None else f"{_utc(record.expires_at)} UTC",
        ),
        ("Models", e(models)),
    ]
    if record.concurrency is not None:
        facts.append(
            (
                "Concurrency",
                f"<span data-in-flight='{status.in_flight}'>{status.in_flight}</span> of "
                f"{record.concurrency} requests in flight",
            )
        )
    fact_html = "".join(f"<dt>{term}</dt><dd>{value}</dd>" for term, value in facts)
    return (
        "<section aria-labelledby='overview-title'><h2 id='overview-title' class='sr'>"
        f"Overview</h2><div class='tiles'>{tile_html}</div>"
        f"<div class='card facts'><dl class='facts'>{fact_html}</dl></div>"
        "</section>"
    )


def _limits(status: KeyStatus) -> str:
    if not status.limits:
        body = "<p class='card empty'>This key has no usage limits.</p>"
        return f"<section aria-labelledby='limits-title'><h2 id='limits-title'>Limits</h2>{body}</section>"
    cards = []
    for index, view in enumerate(status.limits):
        limit = view.limit
        level = "full" if view.remaining == 0 else "high" if view.fraction >= 0.8 else "ok"
        if limit.window_seconds is None:
            reset = "A lifetime budget: it does not reset."
        elif view.used == 0:
            reset = f"Nothing used in the last {window_text(limit.window_seconds)}."
        else:
            reset = f"Resets in <b>{format_duration(view.reset_seconds)}</b>."
        pid = f"limit-{index}"
        cards.append(
            f"<div class='card limit {level}' data-limit='{html.escape(str(limit))}' "
            f"data-metric='{html.escape(limit.metric)}' data-amount='{limit.amount}' "
            f"data-used='{view.used}' data-remaining='{view.remaining}' "
            f"data-reset-seconds='{view.reset_seconds:.0f}'>"
            f"<div class='head'><h3><label for='{pid}'>{html.escape(view.title)}</label></h3>"
            f"<span>{html.escape(str(limit))}</span></div>"
            f"<p class='big'>{compact(view.used)} <small>of {compact(limit.amount)} used</small>"
            "</p>"
            f"<progress id='{pid}' max='{limit.amount}' value='{min(view.used, limit.amount)}' "
            f"aria-describedby='{pid}-text'>{round(view.fraction * 100)}%</progress>"
            f"<p id='{pid}-text'><b>{grouped(view.used)}</b> used · "
            f"<b>{grouped(view.remaining)}</b> left of {grouped(limit.amount)}. {reset}</p>"
            "</div>"
        )
    return (
        "<section aria-labelledby='limits-title'><h2 id='limits-title'>Limits</h2>"
        f"<div class='grid'>{''.join(cards)}</div></section>"
    )


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 2.5, 5 times 10^k that is at least ``value`` (at least 10)."""
    if value <= 10:
        return 10
    magnitude = 1
    while magnitude * 10 <= value:
        magnitude *= 10
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        ceiling = int(step * magnitude)
        if ceiling >= value:
            return ceiling
    return 10 * magnitude  # pragma: no cover


def tokens_chart(days: Sequence[DayUsage]) -> str:
    """Tokens per day as an inline SVG bar chart (input and output stacked), with its axes
    in HTML around it so the labels keep their size on any screen."""
    total = sum(day.tokens for day in days)
    busiest = max(days, key=lambda day: day.tokens, default=None)
    if busiest is None or total == 0:
        summary = f"Tokens per day over the last {len(days)} days: no use."
    else:
        summary = (
            f"Tokens per day over the last {len(days)} days: {grouped(total)} in total, "
            f"busiest {_short_date(busiest.day)} with {grouped(busiest.tokens)}."
        )
    top = _nice_ceiling(busiest.tokens if busiest else 0)
    width, height = 300, 100
    slot = width / max(1, len(days))
    bar = slot * 0.72
    shapes = [
        f"<line class='gridline' x1='0' x2='{width}' y1='{y}' y2='{y}' "
        "vector-effect='non-scaling-stroke'/>"
        for y in (0.5, height / 2, height - 0.5)
    ]
    for index, day in enumerate(days):
        x = index * slot + (slot - bar) / 2
        in_h = height * day.input_tokens / top
        out_h = height * day.output_tokens / top
        label = (
            f"{_short_date(day.day)}: {grouped(day.tokens)} tokens "
            f"({grouped(day.input_tokens)} in, {grouped(day.output_tokens)} out), "
            f"{grouped(day.requests)} requests"
        )
        rects = [
            f"<title>{html.escape(label)}</title>",
            f"<rect class='hit' x='{index * slot:.2f}' y='0' width='{slot:.2f}' "
            f"height='{height}'/>",
        ]
        if day.input_tokens:
            rects.append(
                f"<rect class='in' x='{x:.2f}' y='{height - in_h:.3f}' width='{bar:.2f}' "
                f"height='{in_h:.3f}'/>"
            )
        if day.output_tokens:
            rects.append(
                f"<rect class='out' x='{x:.2f}' y='{height - in_h - out_h:.3f}' "
                f"width='{bar:.2f}' height='{out_h:.3f}'/>"
            )
        shapes.append(f"<g data-day='{day.day.isoformat()}' data-tokens='{day.tokens}'>")
        shapes.extend(rects)
        shapes.append("</g>")
    svg = (
        f"<svg role='img' aria-label='{html.escape(summary)}' viewBox='0 0 {width} {height}' "
        f"preserveAspectRatio='none' focusable='false'><title>{html.escape(summary)}</title>"
        f"{''.join(shapes)}</svg>"
    )
    y_axis = "".join(
        f"<span class='y' style='top:{pos}%' aria-hidden='true'>{compact(value)}</span>"
        for pos, value in ((0, top), (50, top // 2), (100, 0))
    )
    ticks = [days[i] for i in sorted({0, len(days) // 3, 2 * len(days) // 3, len(days) - 1})]
    x_axis = "".join(
        f"<span>{'Today' if day is days[-1] else _short_date(day.day)}</span>" for day in ticks
    )
    return (
        f"<div class='chart'><div style='position:relative'>{y_axis}{svg}</div>"
        f"<div class='x' aria-hidden='true'>{x_axis}</div></div>"
    )


def _chart_section(status: KeyStatus) -> str:
    days = status.days
    rows = "".join(
        f"<tr><th scope='row'>{day.day.isoformat()}</th><td class='num'>"
        f"{grouped(day.requests)}</td><td class='num'>{grouped(day.input_tokens)}</td>"
        f"<td class='num'>{grouped(day.output_tokens)}</td></tr>"
        for day in reversed(days)
        if day.requests
    )
    table = (
        "<details><summary>Show as a table</summary><div class='scroll' tabindex='0' "
        "role='region' aria-label='Tokens per day'><table><caption>Days with use, newest "
        "first (UTC)</caption><thead><tr><th scope='col'>Day</th>"
        "<th scope='col' class='num'>Requests</th><th scope='col' class='num'>Input tokens</th>"
        "<th scope='col' class='num'>Output tokens</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div></details>"
        if rows
        else ""
    )
    return (
        "<section class='card' aria-labelledby='chart-title'><div class='chart-head'>"
        f"<h2 id='chart-title'>Tokens per day</h2><ul class='legend' aria-hidden='true'>"
        "<li>Input</li><li class='out'>Output</li></ul></div>"
        f"{tokens_chart(days) if days else ''}{table}</section>"
    )


def _status_class(code: int) -> str:
    if code < 400:
        return "ok"
    return "warn" if code < 500 else "bad"


def _recent(status: KeyStatus) -> str:
    if not status.recent:
        body = "<p class='empty'>No requests yet.</p>"
    else:
        rows = "".join(
            f"<tr data-model='{html.escape(row.model)}' data-status='{row.status}' "
            f"data-input-tokens='{row.input_tokens}' data-output-tokens='{row.output_tokens}'>"
            f"<td class='time'>{_utc(row.ts, '%Y-%m-%d %H:%M:%S')}</td>"
            f"<td class='model'>{html.escape(row.model)}</td>"
            f"<td class='status'><span class='code {_status_class(row.status)}'>{row.status}"
            "</span></td>"
            f"<td class='num in'>{grouped(row.input_tokens)}</td>"
            f"<td class='num out'>{grouped(row.output_tokens)}</td>"
            f"<td class='num latency'>{latency_text(row.latency_ms)}</td></tr>"
            for row in status.recent
        )
        body = (
            "<div class='scroll' tabindex='0' role='region' aria-labelledby='recent-title'>"
            f"<table id='recent'><caption>The last {len(status.recent)} requests, newest "
            "first. Times in UTC.</caption><thead><tr><th scope='col'>Time (UTC)</th>"
            "<th scope='col'>Model</th><th scope='col'>Status</th>"
            "<th scope='col' class='num'>Tokens in</th><th scope='col' class='num'>Tokens out"
            "</th><th scope='col' class='num'>Latency</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>"
        )
    return (
        "<section class='card' aria-labelledby='recent-title'>"
        f"<h2 id='recent-title'>Recent requests</h2>{body}</section>"
    )
