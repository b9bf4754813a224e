"""Aligned plain-text and Markdown tables, and a description of the machine."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(cell) for cell in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for index, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            numeric = index > 0 and _numeric(cell)
            out.append(cell.rjust(width) if numeric else cell.ljust(width))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    aligns = [
        "---:" if index > 0 and rows and all(_numeric(row[index]) for row in rows) else "---"
        for index in range(len(header))
    ]
    return "\n".join([line(header), "| " + " | ".join(aligns) + " |", *(line(r) for r in rows)])


def _numeric(cell: str) -> bool:
    stripped = cell.replace(",", "").replace("+", "").replace("-", "").replace(".", "")
    return stripped.isdigit() or cell in ("", "-", "n/a")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "?"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def fmt_ms(value: float) -> str:
    return f"{value:.2f}"


def fmt_delta(value: float) -> str:
    return f"{value:+.2f}"


def fmt_count(value: float) -> str:
    return f"{value:,.0f}"
