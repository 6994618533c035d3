"""After the send: delivery events, bounces (RFC 3464) and the suppression list, on both
store backends (``store``), and through the command line on real files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from bulkmail import bounces, events
from bulkmail.cli import app
from bulkmail.store import Claimed, NewEvent, Outcome, Store, open_store
from bulkmail.store.records import SCHEMA_VERSION, message_id, parse_message_id
from bulkmail.store.schema import schema_version
from tests.dovecot import Dovecot, start_dovecot
from tests.test_store import new_job, people, start

DEC_1 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC).timestamp()


def send_all(store: Store, job_id: int, *, now: float = 200.0) -> list[Any]:
    """Claim and record every delivery of the job as sent, with provider ids ``mt-N``."""
    start(store, job_id)
    sent: list[Any] = []
    while True:
        claim = store.claim(job_id, "w1", now=now)
        if not isinstance(claim, Claimed):
            return sent
        d = claim.delivery
        store.record(Outcome.sent(d.id, f"mt-{d.position}", now), "w1")
        sent.append(d)


def webhook_event(kind: str, d: Any, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "event": kind,
        "event_id": f"ev-{n}",
        "timestamp": int(DEC_1),
        "email": d.email,
        "message_id": d.provider_message_id or f"mt-{d.position}",
        "sending_stream": "transactional",
        "custom_variables": {"bulkmail_job": str(d.job_id), "bulkmail_delivery": str(d.id)},
        **extra,
    }


# --------------------------------------------------------------------------- the store


def test_events_are_matched_counted_and_deduplicated(store: Store) -> None:
    job_id = store.create_job(new_job(), people(3), now=1.0, domain="example.edu")
    sent = send_all(store, job_id)
    body = json.dumps(
        {
            "events": [
                webhook_event("delivery", sent[0], 1),
                webhook_event("delivery", sent[1], 2),
                webhook_event(
                    "bounce",
                    sent[2],
                    3,
                    response="550 5.1.1 user unknown",
                    response_code=550,
                ),
                webhook_event("open", sent[0], 4),
                {"event": "something new", "event_id": "ev-5", "email": "x@example.edu"},
            ]
        }
    ).encode()
    found = events.parse_payload(body)
    assert [e.kind for e in found] == ["delivery", "delivery", "bounce", "open"]
    first = events.record(store, found, now=DEC_1)
    assert (first.recorded, first.duplicates, first.unmatched, first.suppressed) == (4, 0, 0, 1)
    again = events.record(store, found, now=DEC_1 + 5)
    assert (again.recorded, again.duplicates, again.suppressed) == (0, 4, 0)
    counts = store.counts(job_id)
    assert (counts.sent, counts.delivered, counts.bounced, counts.complained) == (3, 2, 1, 0)
    [bounce] = store.job_events(job_id, kinds=["bounce"])
    assert (bounce.email, bounce.detail) == ("p2@example.edu", "550 5.1.1 user unknown")


def test_an_event_without_custom_variables_is_matched_by_the_provider_id(store: Store) -> None:
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="example.edu")
    sent = send_all(store, job_id)
    spam = {
        "event": "spam",
        "event_id": "s1",
        "timestamp": int(DEC_1),
        "email": "P1@example.edu",
        "message_id": "mt-2",
    }
    stranger = {**spam, "event_id": "s2", "email": "someone@else.org", "message_id": "mt-9"}
    summary = events.record(store, events.parse_payload(json.dumps([spam, stranger]).encode()))
    assert (summary.recorded, summary.unmatched) == (2, 1)
    assert store.counts(job_id).complained == 1
    assert sent[1].email == "p1@example.edu"
    # both addresses are suppressed: the complaint matched or not
    assert {s.email.lower() for s in store.suppressions()} == {"p1@example.edu", "someone@else.org"}


def test_a_delivery_event_confirms_a_delivery_left_in_doubt(store: Store) -> None:
    job_id = store.create_job(new_job(), people(2), now=1.0, domain="example.edu")
    start(store, job_id)
    claim = store.claim(job_id, "w1", now=200.0)
    assert isinstance(claim, Claimed)
    d = claim.delivery
    # the outcome was unknown (a timeout after the request went out): in doubt, pending
    store.record(Outcome.retry(d.id, "timed out", 210.0, in_doubt=True), "w1")
    event = NewEvent(
        event_id="mailtrap:c1",
        kind="delivery",
        email=d.email,
        at=DEC_1,
        source="mailtrap",
        job_id=job_id,
        delivery_id=d.id,
        provider_message_id="mt-x",
    )
    summary = store.record_events([event], now=DEC_1)
    assert summary.confirmed == 1
    again = next(x for x in store.deliveries(job_id) if x.id == d.id)
    assert (again.state, again.provider_message_id, again.sent_at) == ("sent", "mt-x", DEC_1)
    # it is not sent again: the next claim is the other delivery, then nothing
    nxt = store.claim(job_id, "w1", now=300.0)
    assert isinstance(nxt, Claimed) and nxt.delivery.id != d.id
    store.record(Outcome.sent(nxt.delivery.id, "mt-y", 300.0), "w1")
    assert not isinstance(store.claim(job_id, "w1", now=400.0), Claimed)


def test_a_later_job_skips_suppressed_addresses_with_the_reason(store: Store) -> None:
    first = store.create_job(new_job(), people(2), now=1.0, domain="example.edu")
    sent = send_all(store, first)
    bounce = webhook_event("bounce", sent[1], 1, response="550 5.1.1 user unknown")
    events.record(store, events.parse_payload(json.dumps(bounce).encode()), now=DEC_1)
    second = store.create_job(new_job(), people(2), now=DEC_1 + 60, domain="example.edu")
    states = {d.email: (d.state, d.last_error) for d in store.deliveries(second)}
    assert states == {
        "p0@example.edu": ("pending", None),
        "p1@example.edu": (
            "skipped",
            f"suppressed: bounced 2026-12-01 in job {first}: 550 5.1.1 user unknown",
        ),
    }
    third = store.create_job(
        new_job(), people(2), now=DEC_1 + 90, domain="example.edu", include_suppressed=True
    )
    assert {d.state for d in store.deliveries(third)} == {"pending"}
    # by hand: add (kept as first given), remove
    held = store.add_suppression("P0@example.edu", reason="left", now=DEC_1)
    assert held is None
    held = store.add_suppression("p0@example.edu", reason="other", now=DEC_1 + 1)
    assert held is not None and held.reason == "left"
    assert store.remove_suppression("p0@EXAMPLE.edu")
    assert not store.remove_suppression("p0@example.edu")


def test_a_store_of_schema_4_gains_the_event_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    s = open_store(path)
    job_id = s.create_job(new_job(), people(1), now=1.0, domain="d")
    with s.engine.begin() as conn:  # what schema 4 looked like
        for table in ("events", "suppressions", "processed"):
            conn.execute(sa.text(f"DROP TABLE {table}"))
        conn.execute(sa.text("DROP INDEX ix_deliveries_provider_message_id"))
        conn.execute(sa.text("UPDATE meta SET value = '4' WHERE key = 'schema_version'"))
    s.close()
    s = open_store(path)
    with s.engine.connect() as conn:
        assert schema_version(conn) == SCHEMA_VERSION  # 4 -> 5 -> every step since
    names = {i["name"] for i in sa.inspect(s.engine).get_indexes("deliveries")}
    assert "ix_deliveries_provider_message_id" in names
    assert s.counts(job_id).delivered == 0 and s.suppressions() == []
    s.close()


# --------------------------------------------------------------------------- DSNs


def dsn(
    original_id: str,
    recipient: str,
    *,
    status: str = "5.1.1",
    action: str = "failed",
    diagnostic: str = "smtp; 550 5.1.1 <{rcpt}>... User unknown",
    own_id: str = "<dsn-1@mx.example.edu>",
    returned: str = "text/rfc822-headers",
    to: str = "office@example.edu",
) -> bytes:
    """A DSN as RFC 3464's examples lay it out (section 10)."""
    headers = (
        f"From: office@example.edu\r\nTo: {recipient}\r\nSubject: Reminder\r\n"
        f"Message-ID: {original_id}\r\n"
    )
    if returned == "message/rfc822":
        returned_part = f"Content-Type: message/rfc822\r\n\r\n{headers}\r\nHello\r\n"
    else:
        returned_part = f"Content-Type: text/rfc822-headers\r\n\r\n{headers}"
    text = (
        "From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.edu>\r\n"
        f"To: {to}\r\n"
        "Subject: Returned mail: User unknown\r\n"
        f"Message-ID: {own_id}\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        '    boundary="RAA14128.773615765/mx.example.edu"\r\n'
        "\r\n"
        "--RAA14128.773615765/mx.example.edu\r\n"
        "\r\n"
        "   ----- The following addresses had delivery problems -----\r\n"
        f"<{recipient}>  (unrecoverable error)\r\n"
        "\r\n"
        "--RAA14128.773615765/mx.example.edu\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.example.edu\r\n"
        "Arrival-Date: Tue, 01 Dec 2026 09:59:58 +0000\r\n"
        "\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Final-Recipient: RFC822; {recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        "Remote-MTA: DNS; mail.example.edu\r\n"
        f"Diagnostic-Code: {diagnostic.format(rcpt=recipient)}\r\n"
        "\r\n"
        "--RAA14128.773615765/mx.example.edu\r\n"
        f"{returned_part}"
        "\r\n"
        "--RAA14128.773615765/mx.example.edu--\r\n"
    )
    return text.encode()


def test_a_dsn_is_read_per_recipient() -> None:
    mid = message_id(7, 3, "abcd1234", "example.edu")
    assert parse_message_id(mid) == (7, 3, "abcd1234")
    found = bounces.parse_dsn(dsn(mid, "gone@example.edu", returned="message/rfc822"))
    assert found is not None
    assert found.original_message_id == mid
    [r] = found.recipients
    assert (r.recipient, r.action, r.status) == ("gone@example.edu", "failed", "5.1.1")
    assert r.diagnostic == "550 5.1.1 <gone@example.edu>... User unknown"
    assert bounces.parse_dsn(b"From: a@b\r\nSubject: hi\r\n\r\nnot a report\r\n") is None


def write_maildir(folder: Path, messages: dict[str, bytes]) -> None:
    for sub in ("new", "cur", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, raw in messages.items():
        (folder / "new" / name).write_bytes(raw)


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_bounces_from_a_maildir_once_with_status_report_and_suppression(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    s = open_store(path)
    job_id = s.create_job(new_job(), people(3), now=1.0, domain="example.edu")
    sent = send_all(s, job_id)
    token = parse_message_id(sent[0].message_id)
    assert token is not None
    s.close()
    box = tmp_path / "Maildir"
    write_maildir(
        box,
        {
            "1.a.host": dsn(sent[0].message_id, sent[0].email),
            "2.b.host": dsn(
                sent[1].message_id,
                sent[1].email,
                status="4.2.2",
                action="delayed",
                diagnostic="smtp; 452 4.2.2 mailbox full",
                own_id="<dsn-2@mx.example.edu>",
            ),
            # no returned headers: found by the VERP address it was sent to
            "3.c.host": dsn(
                "<not-ours@x>",
                sent[2].email,
                own_id="<dsn-3@mx.example.edu>",
                to=f"bounces+{job_id}.3.{token[2]}@example.edu",
            ).replace(b"Message-ID: <not-ours@x>\r\n", b""),
            "4.d.host": b"From: someone@example.edu\r\nSubject: out of office\r\n\r\nAway.\r\n",
        },
    )
    store = ["--store", str(path)]
    first = run("bounces", "--maildir", str(box), "--return-path", "bounces+{token}@example.edu",
                "--json", *store)  # fmt: skip
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert (doc["messages"], doc["not_dsn"], doc["recorded"], doc["unmatched"]) == (4, 1, 3, 0)
    assert doc["suppressed"] == 2
    # a second run adds nothing, even once the messages moved to cur/ (flags appended)
    for f in (box / "new").iterdir():
        f.rename(box / "cur" / (f.name + ":2,S"))
    second = run("bounces", "--maildir", str(box), "--json", *store)
    assert json.loads(second.stdout) | {} == {
        "messages": 0, "not_dsn": 0, "recorded": 0, "duplicates": 0, "unmatched": 0,
        "confirmed": 0, "suppressed": 0,
    }  # fmt: skip
    status = json.loads(run("status", str(job_id), "--bounced", "--json", *store).stdout)
    assert (status["sent"], status["bounced"], status["soft_bounced"]) == (3, 2, 1)
    assert [(b["email"], b["event"], b["reason"]) for b in status["bounces"]] == [
        ("p0@example.edu", "bounce", "550 5.1.1 <p0@example.edu>... User unknown"),
        ("p1@example.edu", "soft bounce", "452 4.2.2 mailbox full"),
        ("p2@example.edu", "bounce", "550 5.1.1 <p2@example.edu>... User unknown"),
    ]
    shown = run("status", str(job_id), "--bounced", *store)
    assert "2 bounced" in shown.stdout and "User unknown" in shown.stdout
    report = run("report", str(job_id), *store).stdout.splitlines()
    assert report[0].endswith(",last_event,last_event_at,last_event_detail")
    assert report[2].endswith(",soft bounce,2026-12-01T10:00:00Z,452 4.2.2 mailbox full")
    listed = json.loads(run("suppress", "list", "--json", *store).stdout)
    assert [(x["email"], x["reason"], x["job_id"]) for x in listed] == [
        ("p0@example.edu", "bounced", job_id),
        ("p2@example.edu", "bounced", job_id),
    ]
    assert listed[0]["skip_reason"] == (
        f"suppressed: bounced 2026-12-01 in job {job_id}: "
        "550 5.1.1 <p0@example.edu>... User unknown"
    )


def test_suppress_commands_and_include_suppressed(tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "jobs.db")]
    csv = tmp_path / "list.csv"
    csv.write_text("email,name\na@example.edu,A\nb@example.edu,B\n", encoding="utf-8")
    template = tmp_path / "t.txt"
    template.write_text("Hello {{ name }}\n", encoding="utf-8")
    send = ["send-reminders", "--csv", str(csv), "--template", str(template), "--subject", "Hi",
            "--provider", "outbox", "--rate", "0", "--yes", "--json", *store]  # fmt: skip
    assert run(*send).exit_code == 0
    added = run("suppress", "add", "B@example.edu", "--reason", "left the university", *store)
    assert added.exit_code == 0, added.output
    again = run("suppress", "add", "b@example.edu", *store)
    assert "already suppressed" in again.stderr
    dry = json.loads(run(*send[:-3], "--dry-run", "--json", *store).stdout)
    assert dry["pending"] == 1
    second = json.loads(run(*send).stdout)
    assert (second["sent"], second["skipped"]) == (1, 1)
    skips = json.loads(run("status", str(second["id"]), "--skipped", "--json", *store).stdout)
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert skips["skips"][0]["reason"] == f"suppressed: left the university {day}"
    third = json.loads(run(*send, "--include-suppressed").stdout)
    assert (third["sent"], third["skipped"]) == (2, 0)
    assert run("suppress", "remove", "b@example.edu", *store).exit_code == 0
    assert run("suppress", "remove", "b@example.edu", *store).exit_code == 2
    assert json.loads(run("suppress", "list", "--json", *store).stdout) == []


def test_events_import_from_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    s = open_store(path)
    job_id = s.create_job(new_job(), people(2), now=1.0, domain="example.edu")
    sent = send_all(s, job_id)
    s.close()
    lines = tmp_path / "events.jsonl"
    lines.write_text(
        "\n".join(json.dumps(webhook_event("delivery", d, n)) for n, d in enumerate(sent)) + "\n"
        + json.dumps(webhook_event("unsubscribe", sent[0], 9)) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    first = run("events", "import", str(lines), "--json", "--store", str(path))
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["recorded"] == 3
    second = json.loads(run("events", "import", str(lines), "--json", "--store", str(path)).stdout)
    assert (second["recorded"], second["duplicates"]) == (0, 3)
    status = json.loads(run("status", str(job_id), "--json", "--store", str(path)).stdout)
    assert (status["delivered"], status["bounced"], status["complained"]) == (2, 0, 0)
    assert status["unsubscribed"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "delivery"}\nnot json\n', encoding="utf-8")
    refused = run("events", "import", str(bad), "--store", str(path))
    assert refused.exit_code == 2 and "line 2: not JSON" in refused.stderr


@pytest.mark.parametrize("header", [None, "", "00" * 32])
def test_signatures(header: str | None) -> None:
    body = b'{"events": []}'
    assert events.signature_ok("s3cret", body, events.sign("s3cret", body))
    assert not events.signature_ok("s3cret", body, header)
    assert not events.signature_ok("", body, events.sign("", body))


# --------------------------------------------------------------------------- IMAP (Dovecot)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    yield from start_dovecot()


def test_bounces_from_a_real_imap_server_once(dovecot: Dovecot, tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    s = open_store(path)
    job_id = s.create_job(new_job(), people(2), now=1.0, domain="example.edu")
    sent = send_all(s, job_id)
    s.close()
    dovecot.deliver("1.a.host", dsn(sent[0].message_id, sent[0].email))
    dovecot.deliver(
        "2.b.host",
        dsn(sent[1].message_id, sent[1].email, status="4.4.1", action="delayed",
            diagnostic="smtp; 451 4.4.1 no answer", own_id="<dsn-2@mx.example.edu>"),
    )  # fmt: skip
    dovecot.deliver("3.c.host", b"From: x@example.edu\r\nSubject: hello\r\n\r\nhi\r\n")
    env = {
        "BULKMAIL_IMAP_PASSWORD": dovecot.password,
        "BULKMAIL_IMAP_CA_FILE": str(dovecot.ca_file),
    }
    url = f"imaps://{dovecot.user}@{dovecot.host}:{dovecot.port}/INBOX"
    first = run("bounces", "--imap", url, "--json", "--store", str(path), env=env)
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert (doc["messages"], doc["not_dsn"], doc["recorded"], doc["suppressed"]) == (3, 1, 2, 1)
    second = json.loads(
        run("bounces", "--imap", url, "--json", "--store", str(path), env=env).stdout
    )
    assert (second["messages"], second["recorded"]) == (0, 0)
    status = json.loads(run("status", str(job_id), "--json", "--store", str(path)).stdout)
    assert (status["bounced"], status["soft_bounced"]) == (1, 1)
    # TLS is verified: without the test CA the server's certificate is refused
    untrusted = run("bounces", "--imap", url, "--store", str(path),
                    env={"BULKMAIL_IMAP_PASSWORD": dovecot.password})  # fmt: skip
    assert untrusted.exit_code == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    wrong = run("bounces", "--imap", url, "--store", str(path),
                env={**env, "BULKMAIL_IMAP_PASSWORD": "nope"})  # fmt: skip
    assert wrong.exit_code == 2 and "login as bounces refused" in wrong.stderr
    plain = run("bounces", "--imap", "imap://bounces@mail.example.edu/INBOX", "--store",
                str(path), env=env)  # fmt: skip
    assert plain.exit_code == 2 and "unencrypted" in plain.stderr
