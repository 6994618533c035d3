"""``python -m bulkmail.web.dashboard``: the dashboard alone under waitress, on loopback
(tests; ``bulkmail serve`` is the way to run it otherwise). Prints ``ready PORT`` once it
listens."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bulkmail.errors import BulkmailError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bulkmail.web.dashboard")
    parser.add_argument("--store", required=True, help="the job store (path or URL)")
    parser.add_argument("--config", help="the bulkmail config file")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=CSV")
    parser.add_argument("--templates", type=Path, help="the folder of templates")
    parser.add_argument("--attachments", type=Path, help="the folder of attachments")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    import waitress

    from bulkmail.providers.tls import is_loopback
    from bulkmail.store.sql import open_store
    from bulkmail.web.dashboard import DashboardConfig, NamedSource, create_app

    if not is_loopback(args.host):
        print("this entry point serves loopback only; use bulkmail serve", file=sys.stderr)
        return 2
    sources = {}
    for item in args.source:
        name, _, path = item.partition("=")
        sources[name] = NamedSource(csv=str(Path(path).absolute()))
    try:
        store = open_store(args.store, create=False)
    except BulkmailError as exc:
        print(f"bulkmail: {exc}", file=sys.stderr)
        return 2
    app = create_app(
        DashboardConfig(
            store=store,
            config_path=args.config,
            sources=sources,
            templates_dir=args.templates.absolute() if args.templates else None,
            attachments_dir=args.attachments.absolute() if args.attachments else None,
        )
    )
    server = waitress.create_server(app, host=args.host, port=args.port, threads=4)
    print(f"ready {server.effective_port}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
