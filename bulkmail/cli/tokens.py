"""``bulkmail serve token add|remove|list``: the HTTP API's and the dashboard's tokens
(mounted under ``serve`` in :mod:`bulkmail.cli.events`). A token is printed once; the store
keeps only its hash."""

from __future__ import annotations

from typing import Annotated

import typer

from bulkmail.cli.common import (
    ConfigOpt,
    JsonOpt,
    StoreOpt,
    create_store_for,
    handles_errors,
    load_config,
    open_store_for,
    print_json,
    say_new_store,
)
from bulkmail.cli.env import environment

tokens = typer.Typer(
    name="token",
    help="API tokens for the HTTP API and the dashboard.\n\n"
    "Example: bulkmail serve token add office --role sender",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@tokens.command("add")
@handles_errors
def add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Who the token is for.")],
    role: Annotated[
        str,
        typer.Option(
            "--role",
            metavar="viewer|sender",
            help="viewer: read jobs; sender: also create, cancel, resume and retry.",
        ),
    ] = "viewer",
    new_store: Annotated[
        bool, typer.Option("--new-store", help="Start a new job store if there is none.")
    ] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Make a token and print it once (only its hash is kept).
    Example: bulkmail serve token add office --role sender"""
    from bulkmail.web.auth import add_token

    settings = load_config(config)
    if new_store:
        db, created = create_store_for(store, settings, dedupe_key=None, new_store=True)
    else:
        # the first thing a dashboard's admin does on a new machine
        start = "; to start one there, add --new-store"
        db, created = open_store_for(store, settings, if_missing=start), False
    token = add_token(db, name, role)
    if created:
        say_new_store(db.location)
    env = environment()
    env.write(token + "\n")
    env.note(f"token {name!r} ({role}) made: it is shown this once; keep it safe")


@tokens.command("remove")
@handles_errors
def remove(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The token's name.")],
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Revoke a token (its page sessions end too).  Example: bulkmail serve token remove office"""
    from bulkmail.web.auth import remove_token

    remove_token(open_store_for(store, load_config(config)), name)
    environment().note(f"token {name!r} removed")


@tokens.command("list")
@handles_errors
def list_(as_json: JsonOpt = False, store: StoreOpt = None, config: ConfigOpt = None) -> None:
    """List the tokens' names and roles (never the tokens).  Example: bulkmail serve token list"""
    from bulkmail.documents import iso
    from bulkmail.web.auth import list_tokens

    records = list_tokens(open_store_for(store, load_config(config)))
    docs = [{"name": t.name, "role": t.role, "created_at": iso(t.created_at)} for t in records]
    if as_json:
        print_json(docs)
        return
    env = environment()
    if not docs:
        env.write("no tokens\n")
    for doc in docs:
        env.write(f"{doc['name']}\t{doc['role']}\t{doc['created_at']}\n")
