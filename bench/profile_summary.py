"""Summarise a py-spy speedscope profile: where each thread spends its time.

For every thread: the functions with the most own time (the function itself, not what it
calls), the files with the most own time, and the functions with the most total time. Usable
on its own: ``python bench/profile_summary.py bench/out/profile-....speedscope.json``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def _where(path: str) -> str:
    """A short location: the part after site-packages, or from the project's package on."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    if "/opulon/" in path:
        return "opulon/" + path.rsplit("/opulon/", 1)[1]
    if "/lib/python3" in path:
        return "stdlib/" + path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return path


def _table(counter: Counter[str], samples: int, title: str, top: int) -> list[str]:
    lines = [title, f"{'%':>6}  {'samples':>7}  where"]
    for name, count in counter.most_common(top):
        lines.append(f"{100 * count / samples:6.1f}  {count:7d}  {name}")
    return lines


def summarize(path: Path, top: int = 25) -> str:
    document: dict[str, Any] = json.loads(path.read_text())
    frames = document["shared"]["frames"]
    functions = [f"{frame['name']} ({_where(frame.get('file', '?'))})" for frame in frames]
    files = [_where(frame.get("file", "?")) for frame in frames]
    sections: list[str] = []
    profiles = sorted(document["profiles"], key=lambda p: -len(p["samples"]))
    for rank, profile in enumerate(profiles):
        own: Counter[str] = Counter()
        own_files: Counter[str] = Counter()
        total: Counter[str] = Counter()
        samples = 0
        for stack in profile["samples"]:
            if not stack:
                continue
            samples += 1
            own[functions[stack[-1]]] += 1
            own_files[files[stack[-1]]] += 1
            for name in {functions[index] for index in stack}:
                total[name] += 1
        if not samples:
            continue
        count = top if rank == 0 else min(top, 8)
        sections.append(f"== {profile['name']}: {samples} samples ==")
        sections += _table(own, samples, "own time by function", count)
        if rank == 0:
            sections += ["", *_table(own_files, samples, "own time by file", min(top, 15))]
            # The entry frames (in every sample) say nothing: leave them out.
            inner = Counter({name: n for name, n in total.items() if n < samples})
            title = "total time by function (frames present in every sample left out)"
            sections += ["", *_table(inner, samples, title, top)]
        sections.append("")
    return "\n".join(sections).rstrip() or "no samples"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: profile_summary.py FILE.speedscope.json")
    print(summarize(Path(sys.argv[1])))
