"""What the templates draw, worked out in Python: the tokens chart's geometry and the
privacy policy's structure. Plain data, no HTML: the templates escape every text in it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from opulon.formatting import grouped, short_date
from opulon.key_status_data import DayUsage
from opulon.providers import Provider

__all__ = [
    "ChartBar",
    "PolicyBlock",
    "ServedApi",
    "TokensChart",
    "policy_blocks",
    "served_apis",
    "tokens_chart",
]

#: The chart's SVG user units; the SVG stretches to its box (``preserveAspectRatio='none'``).
CHART_WIDTH = 300
CHART_HEIGHT = 100


@dataclass(frozen=True, slots=True)
class ChartBar:
    """One day of the chart: a slot the width of the day, input and output stacked in it."""

    usage: DayUsage
    label: str  # the day in words, for the bar's tooltip
    slot_x: float
    slot_width: float
    x: float
    width: float
    input_y: float
    input_height: float
    output_y: float
    output_height: float


@dataclass(frozen=True, slots=True)
class TokensChart:
    """Tokens per day as bars, with the axes' labels and a summary for screen readers."""

    summary: str
    top: int  # the value at the top of the y axis
    bars: tuple[ChartBar, ...]
    gridlines: tuple[float, ...]
    x_labels: tuple[str, ...]
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT

    @property
    def y_labels(self) -> tuple[tuple[str, int], ...]:
        """(position, value) of each y-axis label; the stylesheet places each position."""
        return (("top", self.top), ("middle", self.top // 2), ("bottom", 0))


def nice_ceiling(value: int) -> int:
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


def tokens_chart(days: Sequence[DayUsage]) -> TokensChart:
    """The chart of ``days`` (oldest first), scaled to its busiest day."""
    total = sum(day.tokens for day in days)
    busiest = max(days, key=lambda day: day.tokens, default=None)
    if busiest is None or total == 0:
        summary = f"Tokens per day over the last {len(days)} days: no use."
    else:
        summary = (
            f"Tokens per day over the last {len(days)} days: {grouped(total)} in total, "
            f"busiest {short_date(busiest.day)} with {grouped(busiest.tokens)}."
        )
    top = nice_ceiling(busiest.tokens if busiest else 0)
    width, height = CHART_WIDTH, CHART_HEIGHT
    slot = width / max(1, len(days))
    bar = slot * 0.72
    bars = []
    for index, day in enumerate(days):
        in_h = height * day.input_tokens / top
        out_h = height * day.output_tokens / top
        label = (
            f"{short_date(day.day)}: {grouped(day.tokens)} tokens "
            f"({grouped(day.input_tokens)} in, {grouped(day.output_tokens)} out), "
            f"{grouped(day.requests)} request{'' if day.requests == 1 else 's'}"
        )
        bars.append(
            ChartBar(
                usage=day,
                label=label,
                slot_x=round(index * slot, 2),
                slot_width=round(slot, 2),
                x=round(index * slot + (slot - bar) / 2, 2),
                width=round(bar, 2),
                input_y=round(height - in_h, 3),
                input_height=round(in_h, 3),
                output_y=round(height - in_h - out_h, 3),
                output_height=round(out_h, 3),
            )
        )
    ticks = sorted({0, len(days) // 3, 2 * len(days) // 3, len(days) - 1}) if days else []
    x_labels = tuple(
        "Today" if i == len(days) - 1 else short_date(days[i].day) for i in ticks if i >= 0
    )
    return TokensChart(summary, top, tuple(bars), (0.5, height / 2, height - 0.5), x_labels)


@dataclass(frozen=True, slots=True)
class PolicyBlock:
    """One block of the policy: ``h1``, ``lede``, ``h2``, ``h3``, ``p`` (``text``) or ``ul``
    (``items``)."""

    kind: str
    text: str = ""
    items: tuple[str, ...] = ()

    @property
    def anchor(self) -> str:
        """A heading's fragment id: ``3. What We DO Collect`` is ``what-we-do-collect``."""
        words = re.findall(r"[a-z0-9]+", _SECTION_RE.sub("", self.text, count=1).lower())
        return "-".join(words)


_SECTION_RE = re.compile(r"\d+\.\s")


def policy_blocks(text: str) -> list[PolicyBlock]:
    """A plain-text policy as blocks: its first line the title, numbered lines sections, short
    lines without a full stop subheadings, ``- `` lines lists, the rest paragraphs."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    blocks = [PolicyBlock("h1", lines[0])]
    items: list[str] = []
    in_section = False
    for line in lines[1:]:
        if line.startswith("- "):
            items.append(line[2:])
            continue
        if items:
            blocks.append(PolicyBlock("ul", items=tuple(items)))
            items = []
        if line.lower().startswith("last updated"):
            blocks.append(PolicyBlock("lede", line))
        elif _SECTION_RE.match(line) or (not in_section and len(line) < 40):
            blocks.append(PolicyBlock("h2", line))
            in_section = True
        elif len(line) < 50 and not line.endswith((".", ":")):
            blocks.append(PolicyBlock("h3", line))
        else:
            blocks.append(PolicyBlock("p", line))
    if items:
        blocks.append(PolicyBlock("ul", items=tuple(items)))
    return blocks


@dataclass(frozen=True, slots=True)
class ServedApi:
    """One API the gateway serves, for the landing page: its SDK and the models behind it."""

    kind: str  # openai | anthropic
    name: str
    models: tuple[str, ...]  # names and patterns (``gpt-*``), sorted
    any_model: bool  # a provider of this kind serves whatever model it offers

    @property
    def example_model(self) -> str:
        """A model to show in the examples: the first one named outright, else a usual one."""
        named = [model for model in self.models if not any(ch in model for ch in "*?[")]
        return named[0] if named else _EXAMPLE_MODELS[self.kind]


_API_NAMES = {"openai": "OpenAI", "anthropic": "Anthropic"}
_EXAMPLE_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5"}


def served_apis(providers: Sequence[Provider]) -> tuple[ServedApi, ...]:
    """The APIs of ``providers``, OpenAI first; both (with no models) when there are none."""
    apis = []
    for kind, name in _API_NAMES.items():
        own = [provider for provider in providers if provider.kind == kind]
        if own or not providers:
            models = tuple(sorted({model for p in own for model in p.models}))
            any_model = any(not p.models for p in own)
            apis.append(ServedApi(kind, name, models, any_model))
    return tuple(apis)
