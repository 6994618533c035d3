"""A real SMTP server on loopback for tests, built on aiosmtpd.

In tests::

    def test_x(smtp_sink):                      # started and stopped by the fixture
        smtp_sink.replies["bob@example.org"] = "550 5.1.1 no such user"        # at RCPT
        smtp_sink.replies["eve@example.org"] = Rule("451 4.3.0 later", at="data", times=1)
        smtp_sink.replies["amy@example.org"] = Rule(drop=True)  # hang up after the data
        smtp_sink.delay = 0.02                   # every reply 20 ms late (a slow link);
                                                 # a message is recorded before that delay
        smtp_sink.slow_messages[2] = 1.0         # the 2nd message's final reply 1 s later
        ... send to smtp_sink.host / smtp_sink.port ...
        msg = smtp_sink.messages[0].parse()      # email.message.EmailMessage

    with SmtpSink(auth=("user", "secret")) as sink: ...   # AUTH required, no TLS needed
    with SmtpSink(eight_bit=False, size_limit=1000) as sink: ...  # no 8BITMIME, SIZE 1000
    sink.commands                                # ["EHLO", "AUTH", "MAIL", ...] as received

Standalone, for crash tests (runs until SIGTERM/SIGINT)::

    python -m tests.smtp_sink --port 0 --record received.jsonl   # prints "ready PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Received:
    """One message as the server received it, recorded when its data ended, before any
    reply delay (also kept when the sink dropped the connection instead of answering, or the
    client left before the reply: a real server may have queued it)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    received_at: float  # time.monotonic()
    connection: int  # 1 for the first connection since start, 2 for the next...
    mail_options: list[str] = field(default_factory=list)  # MAIL FROM's, e.g. ["SIZE=812"]

    def parse(self) -> EmailMessage:
        """The message as a mail client would store it (LF line ends)."""
        data = self.data.replace(b"\r\n", b"\n")
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Rule:
    """How to answer for one recipient instead of accepting.

    ``reply`` is the SMTP reply to give ("550 5.1.1 no such user") at RCPT or at the end
    of DATA; ``drop`` closes the connection after the data was received, with no reply;
    ``times`` limits the rule to the first N matching commands (then the sink accepts);
    ``delay`` adds seconds before this recipient's reply.
    """

    reply: str | None = None
    at: Literal["rcpt", "data"] = "rcpt"
    times: int | None = None
    drop: bool = False
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.drop:
            self.at = "data"


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    live: set[SMTP] = field(default_factory=set)
    commands: list[str] = field(default_factory=list)


class SmtpSink:
    """A loopback SMTP server: see the module docstring. Thread-safe for the test thread."""

    def __init__(
        self,
        *,
        port: int = 0,
        auth: tuple[str, str] | None = None,
        record: Path | None = None,
        eight_bit: bool = True,
        size_limit: int | None = 2**25,
    ) -> None:
        self.host = HOST
        self.port = port
        self.replies: dict[str, str | Rule] = {}
        self.delay = 0.0
        # extra seconds before the reply to the Nth message received (1 for the first):
        # holds one message "in flight" at the client for as long as a test needs
        self.slow_messages: dict[int, float] = {}
        self.auth = auth
        self.record = record
        self.eight_bit = eight_bit  # False: EHLO does not offer 8BITMIME
        self.size_limit = size_limit  # EHLO's SIZE (None: not offered)
        self._state = _State()
        self._controller: _Controller | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> SmtpSink:
        kwargs: dict[str, Any] = {
            "hostname": HOST,
            "ready_timeout": 5.0,
            "data_size_limit": self.size_limit,
        }
        if self.auth is not None:
            # AUTH offered without TLS; "530 authentication required" is answered by the
            # handler (aiosmtpd's auth_required would warn about plain-text AUTH each time)
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        for _ in range(5):  # a free port found by binding can be taken before we listen
            port = self.port or free_port()
            self._controller = _Controller(self, _Handler(self), port=port, **kwargs)
            try:
                self._controller.start()
            except OSError:
                if self.port:
                    raise
                continue
            self.port = port
            break
        else:
            raise RuntimeError("no free port for the SMTP sink")
        with self._state.lock:  # forget the controller's own start-up probe
            self._state.connections = 0
            self._state.commands.clear()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what tests read ------------------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        with self._state.lock:
            return list(self._state.messages)

    @property
    def connections(self) -> int:
        """Connections accepted since start."""
        with self._state.lock:
            return self._state.connections

    @property
    def commands(self) -> list[str]:
        """The verbs of the commands received since start (EHLO, AUTH, MAIL, RCPT, DATA...)."""
        with self._state.lock:
            return list(self._state.commands)

    def drop_connections(self, reply: str | None = None) -> None:
        """Close every open client connection, as a server's idle timeout does; with
        ``reply`` (e.g. "421 4.4.2 timeout") send that line first."""
        assert self._controller is not None
        loop = self._controller.loop

        async def drop() -> None:
            with self._state.lock:
                live = list(self._state.live)
            for server in live:
                transport = server.transport
                if isinstance(transport, asyncio.WriteTransport):
                    if reply:
                        transport.write(reply.encode() + b"\r\n")
                    transport.close()
            await asyncio.sleep(0.01)  # let connection_lost run

        asyncio.run_coroutine_threadsafe(drop(), loop).result(timeout=5)

    # -- used by the server thread --------------------------------------------------------

    def _rule(self, address: str, at: str) -> Rule | None:
        """The rule that applies now (consuming one of its ``times``), if any."""
        with self._state.lock:
            for key, value in self.replies.items():
                if key.lower() != address.lower():
                    continue
                rule = Rule(reply=value) if isinstance(value, str) else value
                if rule.at != at or rule.times == 0:
                    return None
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return None

    def _receive(self, item: Received) -> int:
        """Record one message; returns its number (1 for the first since start)."""
        if self.record is not None:
            parsed = item.parse()
            line = {
                "recipient": item.rcpt_tos[0] if item.rcpt_tos else "",
                "recipients": item.rcpt_tos,
                "message_id": str(parsed.get("Message-ID", "")),
                "time": time.time(),
            }
            with open(self.record, "a", encoding="utf-8") as out:
                out.write(json.dumps(line) + "\n")
                out.flush()
                os.fsync(out.fileno())
        with self._state.lock:
            self._state.messages.append(item)
            return len(self._state.messages)

    def _authenticate(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert self.auth is not None
        user, password = self.auth
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            user.encode(),
            password.encode(),
        )
        return AuthResult(success=ok, handled=False)  # unhandled: aiosmtpd replies 535


class _Server(SMTP):
    """Counts connections and keeps the live ones so the sink can drop them."""

    def __init__(self, sink: SmtpSink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink_state = sink._state
        self.connection_number = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # not the switch to TLS after STARTTLS
        super().connection_made(transport)
        if first:
            state = self._sink_state
            with state.lock:
                state.connections += 1
                self.connection_number = state.connections
                state.live.add(self)

    def _command(self, verb: str) -> None:
        with self._sink_state.lock:
            self._sink_state.commands.append(verb)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._command("EHLO")
        await super().smtp_EHLO(hostname)

    async def smtp_AUTH(self, arg: str) -> None:
        self._command("AUTH")
        await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._command("MAIL")
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self._command("DATA")
        await super().smtp_DATA(arg)

    def connection_lost(self, error: Exception | None) -> None:
        with self._sink_state.lock:
            self._sink_state.live.discard(self)
        super().connection_lost(error)


class _Controller(Controller):
    def __init__(self, sink: SmtpSink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        return _Server(self._sink, self.handler, **self.SMTP_kwargs)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.sink.eight_bit:
            return responses
        return [r for r in responses if r[4:].upper() != "8BITMIME"]

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await self._pause(None)
        if self.sink.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        rule = self.sink._rule(address, "rcpt")
        await self._pause(rule)
        if rule is not None and rule.reply:
            return rule.reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _Server, session: Any, envelope: Any) -> str:
        rule = None
        for address in envelope.rcpt_tos:
            rule = rule or self.sink._rule(address, "data")
        if rule is not None and rule.reply:
            await self._pause(rule)
            return rule.reply  # refused: not received
        # recorded the moment the data ends, before any reply delay: a client that gives up
        # while waiting for the reply has still handed the message over (a real server may
        # deliver it), so an abandoned message shows up here instead of vanishing
        number = self.sink._receive(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                data=envelope.original_content or envelope.content,
                received_at=time.monotonic(),
                connection=server.connection_number,
                mail_options=list(envelope.mail_options),
            )
        )
        await self._pause(rule, self.sink.slow_messages.get(number, 0.0))
        if rule is not None and rule.drop:
            assert server.transport is not None
            server.transport.close()
            await asyncio.sleep(60)  # cancelled by connection_lost: no reply ever goes out
        return "250 2.0.0 Ok: queued"

    async def _pause(self, rule: Rule | None, extra: float = 0.0) -> None:
        delay = self.sink.delay + (rule.delay if rule is not None else 0.0) + extra
        if delay > 0:
            await asyncio.sleep(delay)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


# -- as a separate process (crash tests, several workers) ----------------------------------

_REPO = Path(__file__).resolve().parent.parent


@dataclass
class SinkProcess:
    """A sink running as its own process (``python -m tests.smtp_sink``), recording every
    message it accepts to a JSON-lines file at the end of its data (fsynced before any reply
    delay and before it answers)."""

    proc: subprocess.Popen[str]
    port: int
    record: Path

    def received(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        lines = self.record.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received()) < count:
            assert time.monotonic() < deadline, f"sink got {len(self.received())} of {count}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_sink_process(
    folder: Path,
    name: str = "sink",
    delay: float = 0.0,
    slow_messages: dict[int, float] | None = None,
) -> SinkProcess:
    record = folder / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "tests.smtp_sink", "--port", "0", "--record", str(record)]
    if delay:
        cmd += ["--delay", str(delay)]
    for number, seconds in (slow_messages or {}).items():
        cmd += ["--slow-message", f"{number}:{seconds}"]
    proc = subprocess.Popen(cmd, cwd=_REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[0] == "ready", line
    return SinkProcess(proc, int(line[1]), record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.smtp_sink", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--record", type=Path, help="append one JSON line per message")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument(
        "--slow-message",
        action="append",
        default=[],
        metavar="N:SECONDS",
        help="extra seconds before the reply to the Nth message received (repeatable)",
    )
    args = parser.parse_args(argv)
    slow: dict[int, float] = {}
    for item in args.slow_message:
        number, _, seconds = item.partition(":")
        slow[int(number)] = float(seconds)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with SmtpSink(port=args.port, record=args.record) as sink:
        sink.delay = args.delay
        sink.slow_messages = slow
        print(f"ready {sink.port}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
