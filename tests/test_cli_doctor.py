from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from cli_helpers import run, run_json, run_ok


def test_doctor_reports_a_sound_setup(isolated_home: Path) -> None:
    run_ok("keys", "list")
    report = run_json("doctor")
    assert report["ok"] is True
    assert report["schema"].startswith("m0")
    names = {check["name"] for check in report["checks"]}
    assert {"database", "master key file", "master key fits", "schema"} <= names
    python = next(check for check in report["checks"] if check["name"] == "python")
    assert python["ok"] is True  # advice only: any CPython serves
    assert python["detail"].startswith(f"Python {sys.version.split()[0]} ")
    assert "Nothing is wrong" in run_ok("doctor").stdout  # providers and keys still to add


def test_doctor_fails_on_a_loose_file_mode(isolated_home: Path) -> None:
    run_ok("keys", "list")
    os.chmod(isolated_home / "opulon.db", 0o644)
    result = run("doctor")
    assert result.exit_code == 1
    assert "FAIL" in result.stdout


def test_doctor_fails_on_a_wrong_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    run_ok("keys", "list")
    monkeypatch.setenv("OPULON_MASTER_KEY", "q" * 43 + "=")
    result = run("doctor", "--json")
    assert result.exit_code == 1
    assert "does not fit" in result.stdout


def test_doctor_on_a_new_data_dir_says_what_to_create_and_passes(isolated_home: Path) -> None:
    result = run("doctor")
    assert result.exit_code == 0, result.stdout
    out = "".join(result.stdout.split())
    assert "FAIL" not in out and "missing" not in out
    assert f"tododatadir{isolated_home}doesnotexistyet" in out
    assert "opulonkeyslist(oranycommand)createsit" in out
    assert "thestepsmarkedtodoarestilltotake" in out
    assert not isolated_home.exists()  # doctor only looks


def test_doctor_names_the_first_steps_once_the_store_exists(isolated_home: Path) -> None:
    run_ok("keys", "list")
    report = run_json("doctor")
    steps = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert steps["providers"] == ("todo", "none yet: opulon providers add NAME --kind openai ...")
    assert steps["keys"][0] == "todo" and report["ok"] is True


def test_doctor_fails_on_a_schema_newer_than_itself(isolated_home: Path) -> None:
    import sqlite3

    run_ok("keys", "list")
    with sqlite3.connect(isolated_home / "opulon.db") as conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
            "VALUES ('opulon', 'm999_from_the_future', '2030-01-01')"
        )
    result = run("doctor")
    assert result.exit_code == 1
    assert "newerthanthisopulon(m999_from_the_future)" in "".join(result.stdout.split())


def test_doctor_says_whether_email_is_set_up(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_ok("keys", "list")
    steps = {c["name"]: (c["status"], c["detail"]) for c in run_json("doctor")["checks"]}
    assert steps["email"][0] == "todo" and "opulon email configure" in steps["email"][1]
    monkeypatch.setenv("RESEND_KEY", "re_secret_123")
    run_ok("email", "configure", "--provider", "resend", "--from", "keys@example.com",
           "--api-key-env", "RESEND_KEY")  # fmt: skip
    steps = {c["name"]: (c["status"], c["detail"]) for c in run_json("doctor")["checks"]}
    assert steps["email"] == (
        "todo",
        "Resend, no public URL: keys cannot be sent (opulon site configure --public-url URL)",
    )
    run_ok("email", "configure", "--provider", "resend", "--from", "keys@example.com",
           "--api-key-env", "RESEND_KEY", "--public-url", "https://api.example.com")  # fmt: skip
    report = run_json("doctor")
    steps = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert steps["email"] == ("ok", "Resend, for https://api.example.com")
    assert "re_secret_123" not in run_ok("doctor").stdout + str(report)


def test_doctor_says_whether_the_site_is_set_up(isolated_home: Path) -> None:
    run_ok("keys", "list")
    report = run_json("doctor")
    names = [c["name"] for c in report["checks"]]
    assert names.index("site") == names.index("email") + 1
    steps = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert steps["site"] == (
        "todo",
        "not configured (name, contact, public URL): "
        "opulon site configure --name ... --contact ... --public-url ...",
    )
    assert report["ok"] is True
    run_ok("site", "configure", "--name", "Opulon API", "--gtm-id", "GTM-ABCD")
    steps = {c["name"]: (c["status"], c["detail"]) for c in run_json("doctor")["checks"]}
    assert steps["site"] == (
        "todo",
        "no contact, public URL: opulon site configure --contact ... --public-url ...",
    )
    run_ok("site", "configure", "--contact", "info@example.com",
           "--public-url", "https://api.example.com", "--meta-pixel-id", "1234567")  # fmt: skip
    report = run_json("doctor")
    steps = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert steps["site"] == (
        "ok",
        "Opulon API, https://api.example.com, contact info@example.com; "
        "analytics: GTM-ABCD, Meta Pixel 1234567 (after consent)",
    )
    assert report["ok"] is True
    run_ok("site", "configure", "--remove", "gtm-id", "--remove", "meta-pixel-id")
    steps = {c["name"]: (c["status"], c["detail"]) for c in run_json("doctor")["checks"]}
    assert steps["site"] == (
        "ok",
        "Opulon API, https://api.example.com, contact info@example.com; no analytics",
    )
    assert "site" in "".join(run_ok("doctor").stdout.split())


def _check(payload: dict[str, object], name: str) -> dict[str, object]:
    found = [c for c in payload["checks"] if c["name"] == name]  # type: ignore[attr-defined]
    assert len(found) == 1, payload
    check: dict[str, object] = found[0]
    return check


def test_doctor_checks_the_shared_redis_and_names_one_that_is_not_there() -> None:
    from services import redis_url

    run_ok("keys", "list")
    alone = _check(run_json("doctor", "--json"), "redis")
    assert alone["status"] == "ok" and "not used: one node" in str(alone["detail"])
    url = redis_url()
    there = _check(run_json("doctor", "--json", "--redis", url), "redis")
    # The test Redis has no password: a step to take, not a failure.
    assert there["status"] == ("ok" if "@" in url else "todo"), there
    assert ("no password" in str(there["detail"])) == ("@" not in url)
    there["detail"] = str(there["detail"]).split(";")[0]
    assert re.search(r"^Redis \d+\.\d+\.\d+ at redis://.*, \d+\.\d\d ms a round trip$",
                     str(there["detail"])), there  # fmt: skip
    result = run("doctor", "--redis", "redis://:hunter2@127.0.0.1:1/0")
    assert result.exit_code == 1
    assert "Redis at redis://***@127.0.0.1:1/0 cannot be reached" in result.stdout
    assert "hunter2" not in result.stdout and "Traceback" not in result.stdout


def test_doctor_checks_a_postgresql_store() -> None:
    from store_engines import postgres_schema

    with postgres_schema() as url:
        fresh = run_json("--database", url, "doctor", "--json")
        assert fresh["ok"] is True
        assert re.match(
            r"PostgreSQL \d+\.\d+ at postgresql://", str(_check(fresh, "database")["detail"])
        )
        assert _check(fresh, "schema")["status"] == "todo"  # nothing created yet
        run_ok("--database", url, "keys", "list")
        ready = run_json("--database", url, "doctor", "--json")
        assert ready["ok"] is True and _check(ready, "schema")["status"] == "ok"
        assert _check(ready, "master key fits")["detail"] == "yes"
    gone = run("--database", "postgresql://postgres:hunter2@127.0.0.1:1/test", "doctor")
    assert gone.exit_code == 1 and "PostgreSQL at postgresql://postgres@127.0.0.1:1/test" in (
        " ".join(gone.stdout.split())
    )
    assert "hunter2" not in gone.stdout


@pytest.mark.parametrize(
    ("option", "url", "secret"),
    [
        ("--redis", "redis://127.0.0.1:1/0?password=s3cret", "s3cret"),
        ("--redis", "redis://user:s3cret@127.0.0.1:1/0", "s3cret"),
        ("--database", "postgresql://postgres:se%zzcret@127.0.0.1:1/test", "zzcret"),
    ],
)
def test_doctor_never_prints_a_password_however_it_is_given(
    option: str, url: str, secret: str
) -> None:
    args = ["doctor", "--redis", url] if option == "--redis" else ["--database", url, "doctor"]
    result = run(*args)
    flat = " ".join(result.stdout.split())
    assert result.exit_code == 1 and "cannot be reached" in flat
    assert secret not in flat and secret not in result.stdout.replace("\n", "").replace(" ", "")


def test_doctor_says_when_a_stopped_gateways_rows_wait_in_the_journal(isolated_home: Path) -> None:
    from opulon.usage import UsageRow
    from opulon.usage_journal import UsageJournal

    run_ok("keys", "list")
    journal_check = next(c for c in run_json("doctor")["checks"] if c["name"] == "usage journal")
    assert journal_check["status"] == "ok"
    dead = UsageJournal(isolated_home / "journal")
    for n in range(3):
        dead.append(UsageRow(1, "op-ul-abcdef0123", 1.8e9 + n, "gpt-4o", 200, 1.0, 1, 1))
    dead.close(all_written=False)  # as a gateway killed before writing them
    report = run_json("doctor")
    journal_check = next(c for c in report["checks"] if c["name"] == "usage journal")
    assert report["ok"] is True and journal_check["status"] == "todo"
    assert "3 usage rows of 1 gateway process(es) that stopped" in journal_check["detail"]
