"""``opulon usage``: a terminal dashboard of usage metadata, or JSON / CSV for scripts."""

from __future__ import annotations

import csv as csv_module
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Group as Stack
from rich.console import RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from opulon.cli.common import opened_store
from opulon.cli.console import console, print_json
from opulon.errors import InvalidInput
from opulon.formatting import (
    DATE,
    MINUTE,
    compact,
    format_duration,
    grouped,
    latency_exact,
    latency_short,
    utc,
)
from opulon.limit_use import LimitState
from opulon.reports import (
    DAY,
    HOUR,
    Figures,
    Group,
    UsageReport,
    build_report,
    resolve_query,
)
from opulon.storage import Store

#: Consoles at least this wide show exact figures and key names.
WIDE = 120
#: Seconds between two refreshes of ``--watch``.
WATCH_INTERVAL = 2.0
_BAR_WIDTH = 10
_SPARKS = " ▁▂▃▄▅▆▇█"
_HEADINGS = {"key": "key", "model": "model", "day": "day (UTC)", "hour": "hour (UTC)"}


def usage(
    ctx: typer.Context,
    since: Annotated[
        str,
        typer.Option("--since", help="Start: 24h, 7d, 30d ago, or a UTC date like 2026-11-01."),
    ] = "24h",
    until: Annotated[
        str | None,
        typer.Option("--until", help="End, in the same forms as --since. Default: now."),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Only this key (its display prefix).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Only models matching this glob, e.g. 'gpt-4o*'.")
    ] = None,
    by: Annotated[
        str,
        typer.Option("--by", help="Main breakdown: key, model, day, hour or status."),
    ] = "key",
    json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    csv: Annotated[bool, typer.Option("--csv", help="Print the main breakdown as CSV.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh the dashboard every 2 s until Ctrl-C.")
    ] = False,
    watch_iterations: Annotated[int | None, typer.Option("--watch-iterations", hidden=True)] = None,
) -> None:
    """Show usage: totals, per key with limits, per model, over time, and errors by status.

    Counts requests, tokens, errors (status 400 and up) and p50 / p95 latency. Times are UTC.

    Example: opulon usage --since 7d --model 'gpt-4o*' --by day
    """
    if json and csv:
        raise InvalidInput("give either --json or --csv, not both")
    if watch and (json or csv):
        raise InvalidInput("--watch refreshes the dashboard; leave out --json and --csv")
    if watch_iterations is not None and watch_iterations < 1:
        raise InvalidInput(f"invalid --watch-iterations {watch_iterations}: at least 1")

    def read(store: Store) -> UsageReport:
        now = time.time()
        query = resolve_query(since=since, until=until, by=by, key=key, model=model, now=now)
        return build_report(store, query, now=now)

    # Bad input fails here, before the database is opened.
    resolve_query(since=since, until=until, by=by, key=key, model=model, now=time.time())
    with opened_store(ctx) as store:
        report = read(store)
        if json:
            print_json(report.to_json())
        elif csv:
            writer = csv_module.writer(sys.stdout, lineterminator="\n")
            writer.writerows(report.csv_rows())
        elif not watch:
            console.print(dashboard(report, console.width))
        else:
            _watch(store, report, read, watch_iterations)


def _watch(
    store: Store,
    report: UsageReport,
    read: Callable[[Store], UsageReport],
    iterations: int | None,
) -> None:
    """Redraw every :data:`WATCH_INTERVAL` seconds until Ctrl-C (or ``iterations`` draws)."""
    shown = 1
    with Live(dashboard(report, console.width), console=console, auto_refresh=False) as live:
        try:
            while iterations is None or shown < iterations:
                time.sleep(WATCH_INTERVAL)
                live.update(dashboard(read(store), console.width), refresh=True)
                shown += 1
        except KeyboardInterrupt:
            pass


# -- the dashboard ------------------------------------------------------------------------


def dashboard(report: UsageReport, width: int) -> RenderableType:
    """The whole dashboard. Below :data:`WIDE` columns, numbers are rounded (13.9M, 3.9s)."""
    fmt = _Format(wide=width >= WIDE)
    by = report.query.by
    parts: list[RenderableType] = [_title(report), _totals(report, fmt)]
    parts.append(_breakdown(by, report.groups, fmt))
    if by != "key":
        parts.append(_breakdown("key", report.keys, fmt))
    if any(group.limits for group in report.keys):
        parts.append(_limits(report, fmt))
    if by != "model":
        parts.append(_breakdown("model", report.models, fmt))
    parts.append(_chart(report, width))
    if by != "status":
        parts.append(_errors(report))
    return Stack(*parts)


@dataclass(frozen=True, slots=True)
class _Format:
    """Exact figures on a wide console, rounded ones on a narrow one."""

    wide: bool

    @property
    def headings(self) -> tuple[str, ...]:
        if self.wide:
            return ("requests", "tokens in", "tokens out", "errors", "error %", "p50", "p95")
        return ("req", "in", "out", "err", "err%", "p50", "p95")

    def count(self, value: int) -> str:
        return grouped(value) if self.wide or value < 10_000 else compact(value)

    def latency(self, value: float | None) -> str:
        if value is None:
            return "-"
        return latency_exact(value) if self.wide else latency_short(value)

    def figures(self, figures: Figures) -> list[str]:
        return [
            self.count(figures.requests),
            self.count(figures.input_tokens),
            self.count(figures.output_tokens),
            self.count(figures.errors),
            f"{figures.error_rate:.1%}",
            self.latency(figures.latency_p50_ms),
            self.latency(figures.latency_p95_ms),
        ]


def _title(report: UsageReport) -> Text:
    query = report.query
    title = Text("Usage ", style="bold")
    title.append(f"{utc(query.since)} → {utc(query.until)} UTC", style="bold")
    title.append(f"   key: {query.key or 'all'}   model: {query.model or 'all'}")
    return title


def _totals(report: UsageReport, fmt: _Format) -> Table:
    how = "exact" if report.percentiles == "exact" else "from hourly histograms (interpolated)"
    table = Table(title="Totals", caption=f"latency percentiles {how}", title_justify="left")
    for heading in fmt.headings:
        table.add_column(heading, justify="right", no_wrap=True)
    table.add_row(*fmt.figures(report.totals))
    return table


def _breakdown(by: str, groups: tuple[Group, ...], fmt: _Format) -> Table:
    table = Table(title=f"By {by}", title_justify="left")
    table.add_column(_HEADINGS.get(by, by), no_wrap=True, overflow="ellipsis")
    named = by == "key" and fmt.wide
    if named:
        table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=30)
    for heading in fmt.headings:
        table.add_column(heading, justify="right", no_wrap=True)
    for group in groups:
        label = str(group.label(by))
        if by in ("day", "hour"):
            label = label[: 10 if by == "day" else 16].replace("T", " ")
        table.add_row(label, *([group.name or ""] if named else []), *fmt.figures(group.figures))
    if not groups:
        table.add_row("no requests", *([""] * (len(table.columns) - 1)))
    return table


def _limits(report: UsageReport, fmt: _Format) -> Table:
    """Each key's use of each of its limits, now, as bars."""
    table = Table(title="Limits (use now)", title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("limit", no_wrap=True, overflow="ellipsis")
    table.add_column("use", no_wrap=True)
    table.add_column("used / limit", justify="right", no_wrap=True)
    table.add_column("frees in", justify="right", no_wrap=True)
    for group in report.keys:
        for index, state in enumerate(group.limits):
            limit = state.limit
            frees = (
                "" if limit.is_budget or not state.used else format_duration(state.reset_seconds)
            )
            table.add_row(
                str(group.value) if index == 0 else "",
                f"budget {limit}" if limit.is_budget else str(limit),
                _bar(state, _BAR_WIDTH if fmt.wide else _BAR_WIDTH // 2),
                f"{fmt.count(state.used)} / {fmt.count(limit.amount)}",
                frees,
            )
    return table


def _bar(state: LimitState, width: int) -> str:
    ratio = min(1.0, state.used / state.limit.amount)
    filled = round(ratio * width)
    colour = "green" if ratio < 0.7 else "yellow" if ratio < 0.9 else "red"
    return f"[{colour}]{'█' * filled}[/][dim]{'░' * (width - filled)}[/] {ratio:4.0%}"


def _errors(report: UsageReport) -> RenderableType:
    failed = [group for group in report.statuses if int(group.value) >= 400]
    if not failed:
        return Text("Errors by status: none", style="green")
    table = Table(title="Errors by status", title_justify="left")
    table.add_column("status", no_wrap=True)
    table.add_column("requests", justify="right")
    table.add_column("share", justify="right")
    total = report.totals.requests
    for group in failed:
        count = group.figures.requests
        table.add_row(str(group.value), grouped(count), f"{count / total:.1%}")
    return table


def _sparkline(values: list[int]) -> str:
    peak = max(values, default=0)
    if not peak:
        return _SPARKS[0] * len(values)
    top = len(_SPARKS) - 1
    return "".join(_SPARKS[0 if not v else max(1, round(v / peak * top))] for v in values)


def _chart(report: UsageReport, width: int) -> Panel:
    series = report.series
    room = max(10, width - 40)
    per = max(1, math.ceil(len(series) / room))
    requests: list[int] = []
    tokens: list[int] = []
    for start in range(0, len(series), per):
        chunk = series[start : start + per]
        requests.append(sum(group.figures.requests for group in chunk))
        tokens.append(sum(group.figures.tokens for group in chunk))
    unit = "hour" if report.series_seconds == HOUR else "day"
    if per > 1:
        unit = f"{per} {unit}s"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, justify="right")
    grid.add_row(
        "requests", Text(_sparkline(requests), style="cyan"), f"peak {grouped(max(requests))}"
    )
    grid.add_row(
        "tokens", Text(_sparkline(tokens), style="magenta"), f"peak {grouped(max(tokens))}"
    )
    step = report.series_seconds
    first = int(series[0].value)
    last = int(series[-1].value) + step
    fmt = MINUTE if step < DAY else DATE
    axis = f"{utc(first, fmt)} … {utc(last, fmt)}"
    return Panel(
        grid,
        title=f"Requests and tokens per {unit}",
        title_align="left",
        subtitle=f"{axis} UTC",
        subtitle_align="left",
        expand=False,
    )
