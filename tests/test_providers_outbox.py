"""OutboxProvider: real files in a temporary folder."""

from __future__ import annotations

import email
import email.policy
import stat
from pathlib import Path

import pytest

from bulkmail.config import OutboxSettings
from bulkmail.models import Attachment, Message
from bulkmail.providers.base import FatalError, Provider
from bulkmail.providers.outbox import OutboxProvider, eml_name


def make_message(message_id: str = "<r2.k7@bulkmail.test>", subject: str = "Reminder") -> Message:
    return Message(
        from_email="office@example.edu",
        from_name="Course Office",
        to_email="ada@example.org",
        to_name="Zoë Ñúñez",
        subject=subject,
        text="Hello Zoë,\nthe deadline is Friday.\n",
        html="<p>Hello Zoë</p>",
        attachments=(Attachment("plan.pdf", "application/pdf", b"%PDF-1.4 tiny"),),
        message_id=message_id,
    )


def read(path: Path) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_writes_an_eml_that_parses_back(tmp_path: Path) -> None:
    outbox = tmp_path / "data" / "outbox"
    p: Provider = OutboxProvider(OutboxSettings(), default_dir=outbox)
    assert p.name == "outbox"
    msg = make_message()
    name = p.send(msg)
    assert name == "r2.k7@bulkmail.test.eml"
    assert sorted(f.name for f in outbox.iterdir()) == [name]
    parsed = read(outbox / name)
    assert parsed["Message-ID"] == msg.message_id
    assert parsed["To"].addresses[0].display_name == "Zoë Ñúñez"
    assert parsed["Subject"] == "Reminder"
    body = parsed.get_body(("plain",))
    assert body is not None and "deadline is Friday" in body.get_content()
    [att] = list(parsed.iter_attachments())
    assert att.get_filename() == "plan.pdf" and att.get_content() == b"%PDF-1.4 tiny"
    p.close()
    p.close()


def test_folder_is_private_and_configured_dir_wins(tmp_path: Path) -> None:
    configured = tmp_path / "mine"
    p = OutboxProvider(OutboxSettings(dir=str(configured)), default_dir=tmp_path / "unused")
    p.send(make_message())
    assert stat.S_IMODE(configured.stat().st_mode) == 0o700
    assert not (tmp_path / "unused").exists()


def test_configured_dir_expands_home(isolated_env: Path, tmp_path: Path) -> None:
    p = OutboxProvider(OutboxSettings(dir="~/mail-out"), default_dir=tmp_path / "unused")
    p.send(make_message())
    assert len(list((isolated_env / "mail-out").glob("*.eml"))) == 1


def test_resend_of_same_message_id_overwrites(tmp_path: Path) -> None:
    outbox = tmp_path / "out"
    p = OutboxProvider(OutboxSettings(), default_dir=outbox)
    first = p.send(make_message(subject="first"))
    second = p.send(make_message(subject="second"))
    p.send(make_message(message_id="<other@bulkmail.test>"))
    assert first == second
    assert sorted(f.name for f in outbox.iterdir()) == [
        "other@bulkmail.test.eml",
        "r2.k7@bulkmail.test.eml",
    ]  # and no temporary file left behind
    assert read(outbox / str(first))["Subject"] == "second"


def test_unwritable_folder_is_fatal_and_names_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    where = blocker / "outbox"  # mkdir fails even for root
    p = OutboxProvider(OutboxSettings(dir=str(where)), default_dir=tmp_path)
    with pytest.raises(FatalError, match=f"outbox folder {where}"):
        p.send(make_message())


@pytest.mark.parametrize(
    "message_id",
    [
        "<../../etc/passwd>",
        "<a/b@x>",
        '<a b\\c:d*?"|@x>',
        "<.hidden@x>",
        "",
        "<" + "x" * 400 + "@x>",
    ],
)
def test_file_names_are_safe(tmp_path: Path, message_id: str) -> None:
    name = eml_name(message_id)
    assert name.endswith(".eml") and not name.startswith(".")
    assert "/" not in name and "\\" not in name and len(name.encode()) <= 200
    p = OutboxProvider(OutboxSettings(), default_dir=tmp_path)
    assert p.send(make_message(message_id=message_id)) == name
    assert (tmp_path / name).is_file()
    assert eml_name(message_id) == name  # stable: a resend finds the same file


def test_empty_id_still_gets_a_name() -> None:
    assert eml_name("<>") == eml_name("<>") != ".eml"


def test_ids_that_sanitise_alike_get_different_files() -> None:
    assert eml_name("<a/b@x>") != eml_name("<a_b@x>")
    assert eml_name("<a/b@x>") != eml_name("<a:b@x>")
