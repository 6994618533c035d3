"""Issue 10: attachments that leave their folder through symbolic links, the Mailtrap token
over plain HTTP, a private CA for SMTP and Mailtrap, and the modes of the files bulkmail
writes and reads (report output, config file). Real files, real links, real servers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bulkmail import jobs
from bulkmail.compose import Composer, Templates
from bulkmail.config import Settings, SmtpSettings
from bulkmail.errors import InputError
from bulkmail.manager import EmailManager
from bulkmail.models import Recipient
from bulkmail.store import open_store
from tests.e2e import assert_refused, bulkmail, smtp_args, smtp_env
from tests.smtp_sink import SmtpSink

SECRET = b"-----BEGIN PRIVATE KEY----- not for mailing"


def person(row: int = 2, name: str = "Ada", **fields: str) -> Recipient:
    return Recipient(row=row, email="ada@example.org", name=name, fields=dict(fields))


def composer(*attach: str) -> Composer:
    Path("t.txt").write_text("Hello {{ name }}\n", encoding="utf-8")
    templates = Templates.load(subject="Hi", text_path="t.txt", attach=attach)
    return Composer(templates, sender="office@example.edu")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """``files/`` with one real sheet, a secret next to it (``secret/key``) and
    ``/etc``-like data outside: the links under test point at these."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "Ada.pdf").write_bytes(b"%PDF Ada")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_bytes(SECRET)
    (tmp_path / "hostname").write_bytes(SECRET)
    return tmp_path / "files"


# --------------------------------------------------------------------------- attachments


def test_a_file_link_out_of_the_folder_is_refused_with_the_row_and_path(files: Path) -> None:
    (files / "Link.pdf").symlink_to(files.parent / "hostname")
    c = composer("files/{{ name }}.pdf")
    with pytest.raises(InputError) as info:
        c.check(person(row=7, name="Link"), "people.csv")
    message = str(info.value)
    assert message.startswith("people.csv: row 7: --attach 'files/{{ name }}.pdf' renders ")
    assert "'files/Link.pdf', a link to " in message
    assert str(files.parent / "hostname") in message
    assert "outside the folder 'files/'" in message
    with pytest.raises(InputError, match="outside the folder 'files/'"):
        c.build(person(name="Link"), "<m@x>")


def test_a_folder_link_out_of_the_folder_is_refused(files: Path) -> None:
    (files / "sub").symlink_to("../secret")  # relative link, as `ln -s ../secret sub`
    c = composer("files/{{ key }}")
    with pytest.raises(InputError, match=r"renders 'files/sub/key', a link to .*secret/key"):
        c.check(person(key="sub/key"), "people.csv")
    # '..' after a folder link goes to the link target's parent, not back into files/
    (files.parent / "x.pdf").write_bytes(SECRET)
    with pytest.raises(InputError, match=r"renders 'files/sub/\.\./x\.pdf', a link to .*x\.pdf"):
        c.check(person(key="sub/../x.pdf"), "people.csv")


def test_dotdot_and_absolute_values_stay_refused(files: Path) -> None:
    c = composer("files/{{ key }}")
    for value in ("../secret/key", "/../secret/key", "sub/../../secret/key"):
        with pytest.raises(InputError, match="outside the folder 'files/'"):
            c.check(person(key=value), "people.csv")
    # an absolute value stays under the folder (the pattern is made absolute before it is
    # rendered), so it names a file that is not there, also for a pattern that is all template
    for value in (str(files.parent / "secret" / "key"), "/etc/hostname"):
        with pytest.raises(InputError, match=r"attachment 'files//.*' not found"):
            c.check(person(key=value), "people.csv")
        with pytest.raises(InputError, match=r"attachment '/.*' not found"):
            composer("{{ key }}").check(person(key=value), "people.csv")


def test_links_that_stay_inside_the_folder_still_work(files: Path) -> None:
    (files / "inner").mkdir()
    (files / "inner" / "real.pdf").write_bytes(b"%PDF inner")
    (files / "Alias.pdf").symlink_to("inner/real.pdf")
    (files / "dir").symlink_to("inner")
    c = composer("files/{{ key }}")
    m = c.build(person(key="Alias.pdf"), "<m@x>")
    assert (m.attachments[0].filename, m.attachments[0].data) == ("Alias.pdf", b"%PDF inner")
    assert c.build(person(key="dir/real.pdf"), "<m@x>").attachments[0].data == b"%PDF inner"


def test_a_folder_that_is_itself_a_link_is_its_target(tmp_path: Path, files: Path) -> None:
    """The boundary is the folder's real path: a linked folder works, and a link inside it
    may not leave it."""
    (tmp_path / "sheets").symlink_to("files")
    (files / "Out.pdf").symlink_to("../hostname")
    c = composer("sheets/{{ name }}.pdf")
    assert c.build(person(name="Ada"), "<m@x>").attachments[0].data == b"%PDF Ada"
    with pytest.raises(InputError, match="outside the folder 'sheets/'"):
        c.check(person(name="Out"), "people.csv")


def test_a_fixed_path_is_the_operators_own_choice(files: Path) -> None:
    (files / "Common.pdf").symlink_to("../hostname")
    c = composer("files/Common.pdf")
    assert c.build(person(), "<m@x>").attachments[0].data == SECRET


def test_a_link_swapped_in_after_the_check_is_not_read(files: Path) -> None:
    """The read itself refuses to follow a link (the final name, or a folder on the way)
    that appeared after the path was resolved."""
    from bulkmail.compose import _Attachment, _read_attachment

    real_folder = os.path.realpath(files)
    (files / "Late.pdf").symlink_to("../hostname")
    item = _Attachment(str(files / "Late.pdf"), os.path.join(real_folder, "Late.pdf"), real_folder)
    with pytest.raises(InputError, match=r"^row 2: attachment 'files/Late\.pdf' cannot be read"):
        _read_attachment(item, "row 2")
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc: the opened file cannot be located")
    (files / "late").symlink_to("../secret")
    item = _Attachment(str(files / "late/key"), os.path.join(real_folder, "late/key"), real_folder)
    with pytest.raises(InputError, match=r"'files/late/key' leads to .*secret/key', outside"):
        _read_attachment(item, "row 2")


def test_attaching_through_a_link_refuses_the_job(smtp_sink: SmtpSink, files: Path) -> None:
    Path("people.csv").write_text(
        "name,email\nAda,ada@example.edu\nLink,eve@example.org\n", encoding="utf-8"
    )
    (files / "Link.pdf").symlink_to(files.parent / "hostname")
    Path("t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    result = bulkmail(
        "send-reminders", "--csv", "people.csv", "--template", "t.txt", "--subject", "Hi",
        "--attach", "files/{{ name }}.pdf", *smtp_args(), "--yes", env=smtp_env(smtp_sink),
    )  # fmt: skip
    assert_refused(
        result,
        "people.csv: row 3: --attach 'files/{{ name }}.pdf' renders 'files/Link.pdf', a link to",
        "outside the folder 'files/'",
        sink=smtp_sink,
    )


def test_a_link_made_between_plan_and_send_fails_that_delivery(
    smtp_sink: SmtpSink, files: Path, tmp_path: Path
) -> None:
    """The job was planned with real files; then a sheet is replaced by a link out of the
    folder. The worker checks again when it builds the message: that delivery fails with the
    reason, the others are sent, and the secret reaches nobody."""
    Path("people.csv").write_text(
        "name,email\nAda,ada@example.edu\nBob,bob@example.edu\n", encoding="utf-8"
    )
    (files / "Bob.pdf").write_bytes(b"%PDF Bob")
    Path("t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    settings = Settings(
        provider="smtp",
        sender="office@example.edu",
        smtp=SmtpSettings(host=smtp_sink.host, port=smtp_sink.port, security="none"),
    )
    plan = jobs.plan(
        jobs.SourceOptions(
            csv="people.csv", template="t.txt", subject="Hi", attach=("files/{{ name }}.pdf",)
        ),
        jobs.SendOptions(provider="smtp", rate=0.0, max_retries=0),
        settings,
    )
    store = open_store(tmp_path / "jobs.db")
    try:
        job = jobs.create_job(store, plan)
        (files / "Bob.pdf").unlink()
        (files / "Bob.pdf").symlink_to("../hostname")
        EmailManager(store, job, provider_factory=jobs.provider_factory(settings)).run()
        by_email = {d.email: d for d in store.deliveries(job)}
    finally:
        store.close()
    assert by_email["ada@example.edu"].state == "sent"
    bob = by_email["bob@example.edu"]
    assert bob.state == "failed"
    assert "renders 'files/Bob.pdf', a link to " in (bob.last_error or "")
    assert "outside the folder 'files/'" in (bob.last_error or "")
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["ada@example.edu"]]
    assert all(SECRET not in m.data for m in smtp_sink.messages)


# --------------------------------------------------------------------------- helpers


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
