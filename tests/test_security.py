"""Issue 10: attachments that leave their folder through symbolic links, the Mailtrap token
over plain HTTP, a private CA for SMTP and Mailtrap, and the modes of the files bulkmail
writes and reads (report output, config file). Real files, real links, real servers."""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import requests
from aiosmtpd.controller import Controller
from pytest_httpserver import HTTPServer

from bulkmail import jobs
from bulkmail.compose import Composer, Templates
from bulkmail.config import MailtrapSettings, Settings, SmtpSettings, load_settings
from bulkmail.errors import InputError
from bulkmail.manager import EmailManager
from bulkmail.models import Message, Recipient
from bulkmail.providers.base import FatalError
from bulkmail.providers.mailtrap import MailtrapProvider
from bulkmail.providers.mailtrap import config_problem as mailtrap_config_problem
from bulkmail.providers.smtp import SmtpProvider
from bulkmail.providers.smtp import config_problem as smtp_config_problem
from bulkmail.providers.tls import client_context
from bulkmail.store import open_store
from tests.e2e import WIDE, assert_refused, bulkmail, smtp_args, smtp_env
from tests.smtp_sink import SmtpSink, free_port

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
        "send-reminders", "--yes", "--csv", "people.csv", "--template", "t.txt", "--subject", "Hi",
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


# --------------------------------------------------------------------------- tokens in clear


class NoNetwork(requests.Session):
    """A session that fails the test if anything is sent: the refusal must come first."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a request was sent: {args} {kwargs}")


def message() -> Message:
    return Message(
        from_email="office@example.edu",
        from_name="Office",
        to_email="ada@example.org",
        to_name="Ada",
        subject="Hi",
        text="Hello\n",
        message_id="<m1@example.edu>",
    )


@pytest.mark.parametrize(
    "url", ["http://192.0.2.10", "http://192.0.2.10:8080/", "http://mailtrap.example.org"]
)
def test_the_mailtrap_token_is_never_sent_over_plain_http(url: str) -> None:
    settings = MailtrapSettings(token="tok-123", api_url=url)
    host = url.split("//")[1].split(":")[0].rstrip("/")
    expected = (
        f"refusing to send the mailtrap token unencrypted to {host}: use an https:// api_url "
        "(unencrypted is allowed to loopback only: localhost, 127.0.0.1, ::1)"
    )
    assert mailtrap_config_problem(settings) == expected
    with pytest.raises(FatalError) as info:
        MailtrapProvider(settings, session=NoNetwork()).send(message())
    assert str(info.value) == expected


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8025", "http://localhost/", "http://[::1]:80", "http://127.1.2.3"]
)
def test_plain_http_to_loopback_stays_allowed(url: str) -> None:
    assert mailtrap_config_problem(MailtrapSettings(token="tok-123", api_url=url)) is None


def test_the_refusal_has_the_smtp_wording() -> None:
    smtp = smtp_config_problem(SmtpSettings(host="192.0.2.10", security="none", username="u"))
    mailtrap = mailtrap_config_problem(
        MailtrapSettings(token="tok-123", api_url="http://192.0.2.10")
    )
    assert smtp is not None and mailtrap is not None
    assert smtp.startswith("refusing to send the SMTP password of u unencrypted to 192.0.2.10: ")
    assert mailtrap.startswith("refusing to send the mailtrap token unencrypted to 192.0.2.10: ")
    assert (
        smtp.partition(": ")[2].partition(" (")[2] == mailtrap.partition(": ")[2].partition(" (")[2]
    )


def test_plain_http_mailtrap_refuses_the_job_before_it_exists(tmp_path: Path) -> None:
    Path("people.csv").write_text("name,email\nAda,ada@example.edu\n", encoding="utf-8")
    Path("t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    env = {"BULKMAIL_MAILTRAP_TOKEN": "tok-123", "BULKMAIL_MAILTRAP_API_URL": "http://192.0.2.10"}
    result = bulkmail(
        "send-reminders", "--yes", "--csv", "people.csv", "--template", "t.txt", "--subject", "Hi",
        "--provider", "mailtrap", "--from", "office@example.edu", "--yes", env=env,
    )  # fmt: skip
    line = assert_refused(
        result, "refusing to send the mailtrap token unencrypted to 192.0.2.10: use an https://"
    )
    assert "tok-123" not in line


# --------------------------------------------------------------------------- a private CA


@dataclass(frozen=True)
class PrivateCA:
    ca: Path  # the CA certificate (PEM): what ca_file names
    cert: Path  # the server's certificate, signed by the CA, for localhost and 127.0.0.1
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def private_ca(tmp_path: Path) -> PrivateCA:
    """A CA made for this test with the openssl command, and a server certificate it signs."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test CA")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=bulkmail test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        encoding="ascii",
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
        cwd=d,
    )  # fmt: skip
    return PrivateCA(d / "ca.pem", d / "server.pem", d / "server.key")


class _Collect:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(bytes(envelope.content))
        return "250 2.0.0 Ok: queued as TLS1"


@pytest.fixture
def tls_smtp(private_ca: PrivateCA) -> Iterator[tuple[Controller, _Collect]]:
    """aiosmtpd on loopback offering STARTTLS with the test CA's certificate (required
    before any mail)."""
    handler = _Collect()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=private_ca.server_context(),
        require_starttls=True,
    )
    controller.start()
    try:
        yield controller, handler
    finally:
        controller.stop()


def test_smtp_starttls_with_a_private_ca(
    tls_smtp: tuple[Controller, _Collect], private_ca: PrivateCA
) -> None:
    controller, handler = tls_smtp
    base = SmtpSettings(host="127.0.0.1", port=controller.port, security="starttls", timeout=10)
    without = SmtpProvider(base)
    try:
        with pytest.raises(FatalError) as info:
            without.send(message())
    finally:
        without.close()
    assert "certificate verify failed" in str(info.value)
    assert "a private CA: set ca_file under [smtp] (BULKMAIL_SMTP_CA_FILE)" in str(info.value)
    assert handler.received == []
    provider = SmtpProvider(replace(base, ca_file=str(private_ca.ca)))
    try:
        assert provider.send(message()) == "TLS1"
    finally:
        provider.close()
    assert len(handler.received) == 1 and b"Subject: Hi" in handler.received[0]


def test_smtp_ca_file_from_the_environment_end_to_end(
    tls_smtp: tuple[Controller, _Collect], private_ca: PrivateCA
) -> None:
    controller, handler = tls_smtp
    Path("people.csv").write_text("name,email\nAda,ada@example.edu\n", encoding="utf-8")
    Path("t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    env = {
        "BULKMAIL_SMTP_HOST": "127.0.0.1",
        "BULKMAIL_SMTP_PORT": str(controller.port),
        "BULKMAIL_SMTP_SECURITY": "starttls",
        "BULKMAIL_SMTP_CA_FILE": str(private_ca.ca),
    }
    result = bulkmail(
        "send-reminders", "--yes", "--csv", "people.csv", "--template", "t.txt", "--subject", "Hi",
        *smtp_args(), "--yes", env=env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(handler.received) == 1


def test_a_missing_or_unusable_ca_file_refuses_the_job(tmp_path: Path) -> None:
    Path("people.csv").write_text("name,email\nAda,ada@example.edu\n", encoding="utf-8")
    Path("t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    Path("empty.pem").write_text("not a certificate\n", encoding="ascii")
    for provider, env in (
        ("smtp", {"BULKMAIL_SMTP_HOST": "127.0.0.1", "BULKMAIL_SMTP_PORT": "9"}),
        ("mailtrap", {"BULKMAIL_MAILTRAP_TOKEN": "tok-123"}),
    ):
        var = f"BULKMAIL_{provider.upper()}_CA_FILE"
        for value, reason in (("nowhere.pem", "No such file"), ("empty.pem", "no PEM")):
            result = bulkmail(
                "send-reminders", "--csv", "people.csv", "--template", "t.txt", "--subject",
                "Hi", "--provider", provider, "--from", "office@example.edu", "--yes",
                env={**env, var: value},
            )  # fmt: skip
            assert_refused(
                result,
                f"ca_file under [{provider}] ({var}): cannot use "
                f"{str(tmp_path / value)!r} as a CA certificate file",
                reason,
            )


def test_mailtrap_over_https_with_a_private_ca(private_ca: PrivateCA) -> None:
    server = HTTPServer(host="127.0.0.1", port=0, ssl_context=private_ca.server_context())
    server.expect_request("/api/send", method="POST").respond_with_json(
        {"success": True, "message_ids": ["mt-1"]}
    )
    server.start()
    try:
        base = MailtrapSettings(token="tok-123", api_url=server.url_for("/"), timeout=10)
        assert base.api_url.startswith("https://127.0.0.1:")
        with pytest.raises(FatalError) as info:
            MailtrapProvider(base).send(message())
        assert "could not be verified" in str(info.value)
        assert "a private CA: set ca_file under [mailtrap] (BULKMAIL_MAILTRAP_CA_FILE)" in str(
            info.value
        )
        assert server.log == []
        provider = MailtrapProvider(replace(base, ca_file=str(private_ca.ca)))
        try:
            assert provider.send(message()) == "mt-1"
            assert provider.send(message()) == "mt-1"  # the connection is reused
        finally:
            provider.close()
        [(request, _), _] = server.log
        assert request.headers["Authorization"] == "Bearer tok-123"
    finally:
        server.clear()
        server.stop()


def test_the_ca_file_is_added_to_the_system_store_not_replacing_it(
    private_ca: PrivateCA,
) -> None:
    """Public servers stay trusted with a private CA added: the context holds every
    certificate of the system's store and the test CA (SSL_CERT_FILE would replace them)."""
    system = client_context()
    context = client_context(str(private_ca.ca))
    assert context.cert_store_stats()["x509_ca"] == system.cert_store_stats()["x509_ca"] + 1
    serials = {c["serialNumber"] for c in context.get_ca_certs()}
    assert {c["serialNumber"] for c in system.get_ca_certs()} <= serials
    subjects = [c["subject"] for c in context.get_ca_certs()]
    assert ((("commonName", "bulkmail test CA"),),) in subjects


def test_a_relative_ca_file_is_found_from_the_config_files_folder(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "bulkmail.toml"
    conf.parent.mkdir()
    conf.write_text('[smtp]\nca_file = "ca.pem"\n[mailtrap]\nca_file = "~/ca.pem"\n')
    settings = load_settings(config=str(conf), env={})
    assert settings.smtp.ca_file == str(tmp_path / "etc" / "ca.pem")
    assert settings.mailtrap.ca_file == str(Path.home() / "ca.pem")
    env = load_settings(config=str(conf), env={"BULKMAIL_SMTP_CA_FILE": "here.pem"})
    assert env.smtp.ca_file == str(Path.cwd() / "here.pem")
    # a file of this host: not recorded on a job (a worker elsewhere reads its own)
    assert "ca_file" not in settings.provider_public("smtp")


# --------------------------------------------------------------------------- file modes


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def make_outbox_job() -> None:
    Path("people.csv").write_text("name,email\nAda,ada@example.edu\n", encoding="utf-8")
    Path("t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    result = bulkmail(
        "send-reminders", "--yes", "--csv", "people.csv", "--template", "t.txt", "--subject", "Hi",
        "--yes",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_report_output_is_created_0600(open_umask: None) -> None:
    make_outbox_job()
    result = bulkmail("report", "1", "--output", "r.csv")
    assert result.exit_code == 0, result.output
    assert mode_of(Path("r.csv")) == 0o600
    assert "ada@example.edu" in Path("r.csv").read_text(encoding="utf-8")


def test_report_output_over_an_existing_file_becomes_0600(open_umask: None) -> None:
    make_outbox_job()
    old = Path("r.csv")
    old.write_text("an older, longer report\n" * 50, encoding="utf-8")
    old.chmod(0o644)
    result = bulkmail("report", "1", "--output", "r.csv")
    assert result.exit_code == 0, result.output
    assert mode_of(old) == 0o600
    text = old.read_text(encoding="utf-8")
    assert "older" not in text and "ada@example.edu" in text


def write_config(text: str, mode: int) -> Path:
    path = Path("bulkmail.toml")
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "text",
    ['[smtp]\npassword = "hunter2"\n', '[smtp]\nhost = "smtp.example.edu"\n', ""],
    ids=["with-secret", "without-secret", "empty"],
)
def test_a_world_writable_config_file_is_refused(text: str) -> None:
    """Whoever can change the config file could point bulkmail at their own server, secret
    or not: one line naming the file and the fix, exit 2."""
    write_config(text, 0o666)
    result = bulkmail("recent", env=WIDE)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "bulkmail: bulkmail.toml: refusing a config file that every user can change "
        "(world-writable): chmod 600 bulkmail.toml"
    ]
    assert "hunter2" not in result.output


def test_a_readable_secret_still_only_warns() -> None:
    Path("people.csv").write_text("name,email\nAda,ada@example.edu\n", encoding="utf-8")
    Path("t.txt").write_text("Hi {{ name }}\n", encoding="utf-8")
    dry_run = ("send-reminders", "--csv", "people.csv", "--template", "t.txt", "--subject", "Hi",
               "--dry-run")  # fmt: skip
    write_config('[smtp]\npassword = "hunter2"\n', 0o644)
    result = bulkmail(*dry_run, env=WIDE)
    assert result.exit_code == 0, result.output
    assert "holds a secret and other users can read it: chmod 600 bulkmail.toml" in result.stderr
    write_config('[smtp]\npassword = "hunter2"\n', 0o600)
    result = bulkmail(*dry_run, env=WIDE)
    assert result.exit_code == 0 and "chmod" not in result.stderr
    # a database password in a dashboard source's URL, or in a URL's query, is one too
    for config in (
        '[dashboard.sources]\ncourses = { db = "postgresql://r:hunter2@h/c", query = "SELECT 1" }'
        "\n",
        '[defaults]\ndb = "postgresql://r@h/c?password=hunter2"\n',
    ):
        write_config(config, 0o644)
        result = bulkmail(*dry_run, env=WIDE)
        assert result.exit_code == 0, result.output
        assert "holds a secret and other users can read it" in result.stderr, config
