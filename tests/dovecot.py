"""A real Dovecot IMAP server for the tests: our own instance (not the package's service),
in the foreground, with a generated configuration in a private folder, on a free loopback
port, speaking IMAPS with a throwaway certificate made by openssl. ``start_dovecot`` raises
``pytest.skip`` with the reason when it cannot start (no dovecot, no openssl)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


@dataclass
class Dovecot:
    host: str
    port: int
    user: str
    password: str
    ca_file: Path
    maildir: Path  # the user's INBOX, to drop messages into (new/)
    uid: int
    gid: int

    def deliver(self, name: str, raw: bytes) -> None:
        path = self.maildir / "new" / name
        path.write_bytes(raw)
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _users() -> tuple[str, str, int, int]:
    """(internal user, login user, mail uid, mail gid): as root, the package's users and
    nobody for the mail (Dovecot never gives mail to root); else ourselves throughout."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        return "dovecot", "dovenull", nobody.pw_uid, nobody.pw_gid
    me = pwd.getpwuid(os.geteuid())
    return me.pw_name, me.pw_name, me.pw_uid, me.pw_gid


def start_dovecot() -> Iterator[Dovecot]:
    if not os.path.exists(DOVECOT):
        pytest.skip("dovecot is not installed (Debian: apt-get install dovecot-imapd)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no test certificate for IMAPS")
    try:
        internal, login, uid, gid = _users()
    except KeyError as exc:
        pytest.skip(f"dovecot's users are missing: {exc}")
    # not under pytest's tmp_path: Dovecot's unprivileged processes must reach the folder
    base = Path(tempfile.mkdtemp(prefix="bulkmail-dovecot-"))
    base.chmod(0o755)
    proc = None
    try:
        cert, key = base / "cert.pem", base / "key.pem"
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        if made.returncode != 0:
            pytest.skip(f"openssl could not make a certificate: {made.stderr.decode()[-200:]}")
        password = "imap-test-password"
        (base / "passwd").write_text(f"bounces:{{PLAIN}}{password}\n", encoding="utf-8")
        home = base / "home" / "bounces"
        maildir = home / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(parents=True)
        if os.geteuid() == 0:
            for path in [base / "home", home, maildir, *maildir.iterdir()]:
                os.chown(path, uid, gid)
        port = _free_port()
        conf = base / "dovecot.conf"
        conf.write_text(
            f"""
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = {min(uid, 100)}
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
auth_mechanisms = plain
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%u
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
""",
            encoding="utf-8",
        )
        proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(conf)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                log = base / "dovecot.log"
                more = log.read_text() if log.exists() else ""
                pytest.skip(f"dovecot could not start: {(out + more)[-400:]}")
            try:
                context = ssl.create_default_context(cafile=str(cert))
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
                ):
                    if tls.recv(100).startswith(b"* OK"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.skip("dovecot did not answer on its port in time")
            time.sleep(0.1)
        yield Dovecot("127.0.0.1", port, "bounces", password, cert, maildir, uid, gid)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)
