"""`bulkmail serve --cert FILE --key FILE`: HTTPS from bulkmail itself (cheroot; waitress has
no TLS), as a real process on a free loopback port with a self-signed certificate the
openssl command makes for the test; the one-line errors for bad certificate files; the
loopback rule with and without TLS; the session cookie marked Secure."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from bulkmail import web
from bulkmail.errors import ConfigError, InputError
from bulkmail.store import open_store
from bulkmail.web.auth import add_token
from tests.test_security import _openssl
from tests.test_serve import SECRET, free_port, wait_for_port
from tests.test_store import new_job, people

pytest.importorskip("flask", reason="bulkmail serve needs the web extra (flask, waitress)")
pytest.importorskip("cheroot", reason="bulkmail serve --cert needs the web extra (cheroot)")

API = "/api/bulk-email"


@dataclass(frozen=True)
class Pki:
    cert: Path  # self-signed, for 127.0.0.1 and localhost
    key: Path  # its key
    other_key: Path  # a key of no certificate here


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "server.key", "-out", "server.pem", "-days", "2",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        cwd=d,
    )  # fmt: skip
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", "other.key", cwd=d)  # fmt: skip
    return Pki(d / "server.pem", d / "server.key", d / "other.key")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.db"
    open_store(path).close()
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "BULKMAIL_MAILTRAP_WEBHOOK_SECRET": SECRET}


def _start(store: Path, port: int, pki: Pki) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "bulkmail", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--store", str(store),
            "--cert", str(pki.cert), "--key", str(pki.key),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.fixture
def served(store_path: Path, pki: Pki) -> Iterator[tuple[str, subprocess.Popen[bytes], str]]:
    """The TLS server, its base URL, its process and a viewer token; one job in the store."""
    s = open_store(store_path, create=False)
    try:
        s.create_job(new_job(), people(2), now=1.0, domain="example.edu")
        token = add_token(s, "auditor", "viewer")
    finally:
        s.close()
    port = free_port()
    proc = _start(store_path, port, pki)
    try:
        wait_for_port(port, proc)
        yield f"https://127.0.0.1:{port}", proc, token
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_https_serves_the_api_with_a_secure_cookie_and_refuses_plain_http(
    served: tuple[str, subprocess.Popen[bytes], str], pki: Pki
) -> None:
    base, proc, token = served
    ca = str(pki.cert)
    bearer = {"Authorization": f"Bearer {token}"}
    # a client that connects and never shakes hands stalls nobody (cheroot's own adapter
    # shook hands in its accepting thread: everyone waited its 10 s socket timeout)
    idle = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    jobs = requests.get(f"{base}{API}/recent-jobs", headers=bearer, verify=ca, timeout=5)
    assert jobs.status_code == 200, jobs.text
    assert [job["id"] for job in jobs.json()] == [1]
    assert requests.get(f"{base}{API}/recent-jobs", verify=ca, timeout=30).status_code == 401
    # the certificate is checked: a client that does not trust it cannot connect
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{base}{API}/recent-jobs", headers=bearer, timeout=30)
    # a page login: every session cookie is Secure (and HttpOnly, SameSite=Strict)
    browser = requests.Session()  # (its .verify loses to REQUESTS_CA_BUNDLE: per request)
    page = browser.get(f"{base}/dashboard/login", verify=ca, timeout=30)
    assert page.status_code == 200
    cookie = page.headers["Set-Cookie"]
    assert "; Secure" in cookie and "; HttpOnly" in cookie, cookie
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None
    login = browser.post(
        f"{base}/dashboard/login",
        data={"token": token, "csrf_token": csrf[1]},
        allow_redirects=False,
        verify=ca,
        timeout=30,
    )
    assert login.status_code == 302, login.text
    assert "; Secure" in login.headers["Set-Cookie"]
    assert browser.get(f"{base}{API}/recent-jobs", verify=ca, timeout=30).status_code == 200
    # plain HTTP to the same port gets no answer from the app
    plain = base.replace("https://", "http://")
    try:
        answer = requests.get(f"{plain}{API}/recent-jobs", headers=bearer, timeout=30)
    except requests.exceptions.ConnectionError:
        pass
    else:
        assert answer.status_code == 400 and "jobs" not in answer.text
    idle.close()
    # Ctrl-C stops it as it stops the plain server: "interrupted", exit 130
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"serving on {base}/" in (out + err).decode()
    assert err.decode().rstrip().endswith("bulkmail: interrupted")
    assert "Traceback" not in err.decode()


def test_a_client_stalling_mid_handshake_is_dropped_after_the_handshake_timeout(
    served: tuple[str, subprocess.Popen[bytes], str], pki: Pki
) -> None:
    """A client that starts a TLS handshake and stalls holds one of the 4 worker threads
    for HANDSHAKE_TIMEOUT (5 s), not the socket's 10 s (this test waits that long: the
    timeout is the socket's, with no clock to inject)."""
    from bulkmail.web import HANDSHAKE_TIMEOUT

    base, _proc, _token = served
    stalled = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    try:
        stalled.sendall(b"\x16\x03\x01")  # the first bytes of a TLS record, then nothing
        stalled.settimeout(30)
        started = time.monotonic()
        assert stalled.recv(1024) == b""  # the server closed it
        waited = time.monotonic() - started
    finally:
        stalled.close()
    assert HANDSHAKE_TIMEOUT - 1 <= waited < HANDSHAKE_TIMEOUT + 3, waited
    assert requests.get(f"{base}/dashboard/login", verify=str(pki.cert), timeout=30).ok


def test_sigterm_stops_the_tls_server_with_exit_143(
    served: tuple[str, subprocess.Popen[bytes], str], pki: Pki
) -> None:
    base, proc, _token = served
    assert requests.get(f"{base}/dashboard/login", verify=str(pki.cert), timeout=30).ok
    proc.terminate()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "Traceback" not in err.decode()


def _serve_fails(store: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bulkmail", "serve", "--port", str(free_port()),
         "--store", str(store), *args],
        env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    return lines[0]


def test_bad_certificate_files_are_one_line_before_listening(
    store_path: Path, pki: Pki, tmp_path: Path
) -> None:
    cert, key = str(pki.cert), str(pki.key)
    assert _serve_fails(store_path, "--cert", cert) == (
        "bulkmail: --cert needs --key too: HTTPS takes a certificate and its key"
    )
    mismatch = _serve_fails(store_path, "--cert", cert, "--key", str(pki.other_key))
    assert mismatch == (
        f"bulkmail: {pki.other_key}: this private key does not match the certificate {cert}"
    )
    missing = tmp_path / "nowhere.pem"
    assert _serve_fails(store_path, "--cert", str(missing), "--key", key) == (
        f"bulkmail: {missing}: no such file"
    )


def test_load_tls_names_the_file_at_fault(pki: Pki, tmp_path: Path) -> None:
    tls = web.load_tls(pki.cert, pki.key)
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.context.verify_mode == ssl.CERT_NONE  # no client certificates asked for
    missing = tmp_path / "nowhere.key"
    with pytest.raises(InputError, match=r"^\S*nowhere\.key: no such file$"):
        web.load_tls(pki.cert, missing)
    # the files swapped: a key is not a certificate, a certificate not a key
    with pytest.raises(InputError, match=r"server\.key: not a PEM certificate$"):
        web.load_tls(pki.key, pki.key)
    with pytest.raises(InputError, match=r"server\.pem: not a PEM private key$"):
        web.load_tls(pki.cert, pki.cert)
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkey", "-in", str(pki.key), "-aes256", "-passout", "pass:secret",
             "-out", str(encrypted), cwd=tmp_path)  # fmt: skip
    with pytest.raises(InputError, match=r"encrypted\.key: the private key is encrypted"):
        web.load_tls(pki.cert, encrypted)  # never a passphrase prompt
    with pytest.raises(InputError, match=r": is a directory, expected a PEM certificate"):
        web.load_tls(tmp_path, pki.key)
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / "unreadable.key"
        unreadable.write_bytes(pki.key.read_bytes())
        unreadable.chmod(0)
        with pytest.raises(InputError, match=r"unreadable\.key: cannot read"):
            web.load_tls(pki.cert, unreadable)


def test_beyond_loopback_needs_tls_or_a_proxy() -> None:
    with pytest.raises(InputError, match="--cert FILE --key FILE"):
        web.check_address("0.0.0.0", behind_proxy=False)
    with pytest.raises(InputError, match="--behind-proxy"):
        web.check_address("192.0.2.10", behind_proxy=False, tls=False)
    web.check_address("0.0.0.0", behind_proxy=False, tls=True)
    web.check_address("192.0.2.10", behind_proxy=True)
    web.check_address("127.0.0.1", behind_proxy=False)
    web.check_address("::1", behind_proxy=False)


def test_the_session_cookie_is_secure_only_when_the_browser_sees_https(
    store_path: Path,
) -> None:
    from bulkmail.web.dashboard import DashboardConfig

    s = open_store(store_path, create=False)
    try:
        for https in (False, True):
            app = web.create_app(
                web.WebConfig(
                    store=s,
                    mailtrap_webhook_secret=SECRET,
                    dashboard=DashboardConfig(store=s),
                    https=https,
                )
            )
            cookie = app.test_client().get("/dashboard/login").headers["Set-Cookie"]
            assert ("; Secure" in cookie) is https, cookie
    finally:
        s.close()


def test_serve_section_of_the_config_file_gives_the_certificate(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bulkmail.config import ServeSettings, load_settings

    for var in ("BULKMAIL_SERVE_CERT", "BULKMAIL_SERVE_KEY"):
        monkeypatch.delenv(var, raising=False)
    config = pki.cert.parent / "bulkmail.toml"
    config.write_text('[serve]\ncert = "server.pem"\nkey = "server.key"\n', encoding="utf-8")
    serve = load_settings(config=str(config), env={}).serve
    assert (serve.cert, serve.key) == (str(pki.cert), str(pki.key))  # beside the file
    tls = web.choose_tls(None, None, serve)
    assert tls is not None and (tls.cert, tls.key) == (pki.cert, pki.key)
    # the options win over the file; none anywhere is plain HTTP
    other = tmp_path / "other.pem"
    with pytest.raises(InputError, match=r"other\.pem: no such file"):
        web.choose_tls(other, pki.key, serve)
    assert web.choose_tls(None, None, ServeSettings()) is None
    with pytest.raises(InputError, match=r"^--key needs --cert too"):
        web.choose_tls(None, pki.key, serve)
    with pytest.raises(ConfigError, match=r"^\[serve\] cert and key go together"):
        web.choose_tls(None, None, ServeSettings(cert=str(pki.cert)))
    env = {"BULKMAIL_SERVE_CERT": str(pki.cert), "BULKMAIL_SERVE_KEY": str(pki.other_key)}
    with pytest.raises(InputError, match="does not match the certificate"):
        web.choose_tls(None, None, load_settings(config=None, env=env).serve)
