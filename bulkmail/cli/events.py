"""The commands about what happened after the send: serve (the webhooks), events import,
bounces, suppress list|add|remove. Options in, one call into the core (``bulkmail.events``,
``bulkmail.bounces``, ``bulkmail.web``, the store), output out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bulkmail.cli import app
from bulkmail.cli.common import (
    ConfigOpt,
    JsonOpt,
    StoreOpt,
    handles_errors,
    load_config,
    open_store_for,
    print_json,
)
from bulkmail.cli.env import environment
from bulkmail.cli.tokens import tokens
from bulkmail.errors import InputError

if TYPE_CHECKING:
    from bulkmail.store.records import EventSummary, Suppression

events_app = typer.Typer(
    help="Delivery events (Mailtrap webhooks) recorded against deliveries.\n\n"
    "Example:\n\n\b\n  bulkmail events import events.jsonl",
    no_args_is_help=True,
    rich_markup_mode=None,
)
suppress_app = typer.Typer(
    help="The suppression list: addresses every later job skips.\n\n"
    "Example:\n\n\b\n  bulkmail suppress add someone@example.edu --reason 'left the university'",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(events_app, name="events")
app.add_typer(suppress_app, name="suppress")


def _summary_line(s: EventSummary) -> str:
    return (
        f"{s.recorded} events recorded ({s.unmatched} matching no delivery), "
        f"{s.duplicates} duplicates ignored, {s.confirmed} in-doubt deliveries confirmed "
        f"sent, {s.suppressed} addresses suppressed"
    )


serve_app = typer.Typer(no_args_is_help=False)  # its help: the callback's docstring
app.add_typer(serve_app, name="serve")
serve_app.add_typer(tokens, name="token")


@serve_app.callback(invoke_without_command=True)
@handles_errors
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 8025,
    behind_proxy: Annotated[
        bool,
        typer.Option(
            "--behind-proxy",
            help="A TLS proxy is in front: allow a non-loopback --host.",
        ),
    ] = False,
    cert: Annotated[
        Path | None,
        typer.Option(
            "--cert",
            metavar="FILE",
            help="Serve HTTPS with this PEM certificate (chain), with --key; allows a "
            "non-loopback --host (default: cert under [serve] in the config file).",
        ),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", metavar="FILE", help="The certificate's PEM private key."),
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            metavar="NAME=PATH",
            help="A CSV or .xlsx file the dashboard and the API may send to, by NAME "
            "(repeatable); clients never send SQL or paths.",
        ),
    ] = None,
    templates: Annotated[
        Path | None,
        typer.Option(
            "--templates",
            metavar="DIR",
            help="Folder whose files are the templates a dashboard request may name.",
        ),
    ] = None,
    attachments: Annotated[
        Path | None,
        typer.Option(
            "--attachments",
            metavar="DIR",
            help="Folder whose files a dashboard request may attach, by name.",
        ),
    ] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the dashboard at / and its API at /api/bulk-email/ (log in with a token from
    `bulkmail serve token add`), and receive Mailtrap webhooks at POST /webhooks/mailtrap
    when their signing secret is set (BULKMAIL_MAILTRAP_WEBHOOK_SECRET). Loopback only,
    unless over HTTPS (--cert/--key) or behind a TLS proxy (--behind-proxy).

    Example:

    \b
      bulkmail serve --source instructors=examples/instructors.csv --templates examples
      bulkmail serve --host 0.0.0.0 --port 8443 --cert server.pem --key server.key
    """
    if ctx.invoked_subcommand is not None:
        return  # `bulkmail serve token ...`
    from bulkmail import web

    web.require_web()  # before the dashboard's modules, which import Flask
    from bulkmail.web.dashboard.core import from_settings

    settings = load_config(config)
    tls = web.choose_tls(cert, key, settings.serve)  # --cert/--key, else [serve]
    web.check_address(host, behind_proxy=behind_proxy, tls=tls is not None)
    secret = settings.mailtrap.webhook_secret or None  # None: no webhook route
    # a new server: its first token makes the store
    first = (
        "; make it with the first token: bulkmail serve token add NAME --role sender --new-store"
    )
    db = open_store_for(store, settings, if_missing=first)
    try:
        # [dashboard] of the config file, the options on top
        dashboard = from_settings(
            settings,
            db,
            config_path=config,
            sources=source or (),
            templates=templates,
            attachments=attachments,
        )
        flask_app = web.create_app(
            web.WebConfig(
                store=db,
                mailtrap_webhook_secret=secret,
                dashboard=dashboard,
                https=tls is not None or behind_proxy,
            )
        )
        scheme = "https" if tls is not None else "http"
        hooks = (
            "webhooks at /webhooks/mailtrap"
            if secret
            else "no webhooks: set BULKMAIL_MAILTRAP_WEBHOOK_SECRET to receive them"
        )
        environment().note(
            f"bulkmail: serving on {scheme}://{host}:{port}/ ({hooks}; Ctrl-C to stop)"
        )
        web.serve(flask_app, host=host, port=port, behind_proxy=behind_proxy, tls=tls)
    finally:
        db.close()


@events_app.command("import")
@handles_errors
def import_(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="JSON or JSON Lines events.")],
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Record Mailtrap events from a file (as a webhook would post them).
    Example:

    \b
      bulkmail events import events.jsonl
    """
    from bulkmail import events

    db = open_store_for(store, load_config(config))
    try:
        summary = events.import_events(db, file)
    finally:
        db.close()
    if as_json:
        print_json(vars(summary))
    else:
        environment().note(_summary_line(summary))


@app.command()
@handles_errors
def bounces(
    maildir: Annotated[
        Path | None, typer.Option("--maildir", metavar="DIR", help="A Maildir to read.")
    ] = None,
    imap: Annotated[
        str | None,
        typer.Option(
            "--imap",
            metavar="URL",
            help="imaps://user@host/INBOX (password: BULKMAIL_IMAP_PASSWORD).",
        ),
    ] = None,
    return_path: Annotated[
        str | None,
        typer.Option(
            "--return-path",
            metavar="TEMPLATE",
            help="VERP return path, e.g. 'bounces+{token}@example.edu'.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Record RFC 3464 bounces from a Maildir or an IMAP mailbox; a second run adds
    nothing.

    Example:

    \b
      bulkmail bounces --maildir ~/Maildir/.bounces
    """
    from bulkmail import bounces as core

    if (maildir is None) == (imap is None):
        raise InputError("pass one of --maildir DIR or --imap imaps://user@host/MAILBOX")
    verp = core.verp_pattern(return_path) if return_path else None
    settings = load_config(config)
    source = core.ImapSource.parse(imap) if imap else None
    db = open_store_for(store, settings)
    try:
        if source is not None:
            messages = core.read_imap(
                db,
                source,
                password=settings.imap.password,
                ca_file=settings.imap.ca_file,
                timeout=settings.imap.timeout,
            )
        else:
            assert maildir is not None
            messages = core.read_maildir(db, maildir)
        run = core.process(db, messages, verp=verp)
    finally:
        db.close()
    summary = run.summary()
    if as_json:
        print_json({"messages": run.messages, "not_dsn": run.not_dsn, **vars(summary)})
    else:
        environment().note(
            f"{run.messages} new messages read ({run.not_dsn} not bounces): "
            + _summary_line(summary)
        )


def _suppression_doc(s: Suppression) -> dict[str, Any]:
    from bulkmail.documents import iso
    from bulkmail.store.records import suppression_reason

    return {
        "email": s.email,
        "reason": s.reason,
        "at": iso(s.at),
        "job_id": s.job_id,
        "detail": s.detail,
        "skip_reason": suppression_reason(s),
    }


@suppress_app.command("list")
@handles_errors
def suppress_list(
    as_json: JsonOpt = False, store: StoreOpt = None, config: ConfigOpt = None
) -> None:
    """List suppressed addresses and why.

    Example:

    \b
      bulkmail suppress list --json
    """
    from bulkmail import ui

    db = open_store_for(store, load_config(config))
    try:
        docs = [_suppression_doc(s) for s in db.suppressions()]
    finally:
        db.close()
    if as_json:
        print_json(docs)
    elif not docs:
        environment().stdout.print("no suppressed addresses", markup=False)
    else:
        environment().stdout.print(ui.suppressions_table(docs))


@suppress_app.command("add")
@handles_errors
def suppress_add(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The address to suppress.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (shown when a job skips it).")
    ] = "added",
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Suppress an address for every later job.

    Example:

    \b
      bulkmail suppress add a@b.edu
    """
    text = address.strip()
    if "@" not in text or any(c.isspace() for c in text):
        raise InputError(f"{address!r}: not an email address")
    if not reason.strip() or not reason.isprintable():
        raise InputError("--reason: one line of text, please")
    db = open_store_for(store, load_config(config))
    try:
        held = db.add_suppression(text, reason=reason.strip(), now=time.time())
        entry = db.suppression(text)
    finally:
        db.close()
    assert entry is not None
    if as_json:
        print_json({"added": held is None, **_suppression_doc(entry)})
    elif held is None:
        environment().note(f"suppressed {text}")
    else:
        environment().note(
            f"{text} is already suppressed ({_suppression_doc(held)['skip_reason']})"
        )


@suppress_app.command("remove")
@handles_errors
def suppress_remove(
    address: Annotated[str, typer.Argument(metavar="ADDR", help="The address to allow again.")],
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Take an address off the suppression list.

    Example:

    \b
      bulkmail suppress remove a@b.edu
    """
    db = open_store_for(store, load_config(config))
    try:
        removed = db.remove_suppression(address)
    finally:
        db.close()
    if as_json:
        print_json({"email": address.strip(), "removed": removed})
    elif removed:
        environment().note(f"{address.strip()} is no longer suppressed")
    else:
        raise InputError(f"{address.strip()} is not on the suppression list")
