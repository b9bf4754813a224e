"""Usage rows seeded by the report and dashboard tests, with figures computed by hand."""

from __future__ import annotations

MINUTE, HOUR, DAY = 60, 3600, 86400

# key, age, model, status, latency (ms), input tokens, output tokens
ROWS = [
    ("alice", 10 * MINUTE, "gpt-4o", 200, 100.0, 1000, 200),
    ("alice", 50 * MINUTE, "gpt-4o", 200, 300.0, 2000, 400),
    ("alice", 2 * HOUR, "claude-haiku", 200, 500.0, 500, 100),
    ("alice", 5 * HOUR, "gpt-4o", 429, 2.0, 0, 0),
    ("alice", 30 * HOUR, "gpt-4o", 200, 700.0, 3000, 600),
    ("bob", 20 * MINUTE, "claude-haiku", 200, 250.0, 800, 300),
    ("bob", 3 * HOUR, "claude-haiku", 500, 1500.0, 800, 0),
    ("bob", 3 * DAY, "claude-haiku", 200, 400.0, 100, 50),
    ("bob", 10 * DAY, "gpt-4o", 200, 900.0, 5000, 1000),
    ("carol", 40 * MINUTE, "gpt-4o", 499, 1200.0, 300, 20),
    ("carol", 8 * HOUR, "gpt-4o", 200, 600.0, 400, 80),
]
