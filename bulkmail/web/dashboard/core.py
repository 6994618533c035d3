"""What the HTTP API and the pages do, without Flask: a request's fields in, one call into
``bulkmail.jobs`` (exactly what ``send-reminders`` calls), data out.

A request names its source (an uploaded CSV or a source configured on the server, never
SQL), its template (a configured template's name, or text), the subject, the selected
addresses (``--only``) and the sending options by their CLI names. Uploads and template text
live in a temporary folder for the request only: the job keeps its recipients' fields and
its templates' text, so the worker needs neither. Errors keep the CLI's one-line messages,
with the temporary paths replaced by the names the user knows.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bulkmail import documents, jobs
from bulkmail.config import Settings, load_settings
from bulkmail.errors import BulkmailError, InputError
from bulkmail.jobs import Plan, SendOptions, SourceOptions
from bulkmail.store.contract import JobStore
from bulkmail.web.auth import Identity

Form = Mapping[str, Sequence[str]]
"""A request's fields, each with its values (a multipart form, or JSON made into lists)."""

MAX_BODY = 10 * 1024 * 1024  # a request body over this is refused (413)
TABLE_LIMIT = 5000  # rows the page's table of recipients shows at most


@dataclass(frozen=True)
class NamedSource:
    """A recipient source configured on the server, picked by name: a CSV or Excel file, or a
    course-database query (the SQL is the server's, never the client's)."""

    csv: str | None = None
    xlsx: str | None = None
    sheet: str | None = None
    db: str | None = None
    query: str | None = None


@dataclass
class DashboardConfig:
    """The dashboard's configuration (``app.extensions["bulkmail.dashboard"]``).

    ``config_path``: the bulkmail config file the server was started with (the provider,
    sender and secrets; the workers it starts read it too). ``templates_dir``: the folder
    whose files are the templates (text or HTML) a request may name. ``attachments_dir``:
    the folder whose files a request may attach, by name (or by a pattern such as
    ``{{ course }}.pdf`` that must render to a file inside it). ``secret_key``: signs the session
    cookie; when neither it nor the host app's ``SECRET_KEY`` is set, a random key per
    process is made (sessions then end when the server restarts)."""

    store: JobStore
    config_path: str | None = None
    sources: Mapping[str, NamedSource] = field(default_factory=dict)
    templates_dir: Path | None = None
    attachments_dir: Path | None = None
    secret_key: str | None = None
    max_body: int = MAX_BODY
    settings: Callable[[], Settings] | None = None  # tests; default: load_settings

    def load_settings(self) -> Settings:
        if self.settings is not None:
            return self.settings()
        return load_settings(config=self.config_path)

    def template_names(self) -> list[str]:
        return _file_names(self.templates_dir)

    def attachment_names(self) -> list[str]:
        return _file_names(self.attachments_dir)


def _file_names(folder: Path | None) -> list[str]:
    """The files directly in ``folder`` (hidden ones apart): what a request may name."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name[:1] != ".")


def from_settings(
    settings: Settings,
    store: JobStore,
    *,
    config_path: str | None = None,
    sources: Sequence[str] = (),
    templates: Path | None = None,
    attachments: Path | None = None,
) -> DashboardConfig:
    """``bulkmail serve``'s dashboard: the config file's ``[dashboard]`` section (and its
    BULKMAIL_DASHBOARD_* variables), with the command line on top: ``--source NAME=PATH``
    (repeatable) adds a source or replaces the file's of that name, ``--templates`` and
    ``--attachments`` replace the file's folders."""
    section = settings.dashboard
    named = {name: NamedSource(**keys) for name, keys in section.sources.items()}
    for item in sources:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--source: expected NAME=PATH, got {item!r}")
        kind = "xlsx" if path.lower().endswith(".xlsx") else "csv"
        named[name] = NamedSource(**{kind: str(Path(path).absolute())})

    def folder(flag: Path | None, configured: str) -> Path | None:
        if flag is not None:
            return flag.absolute()
        return Path(configured) if configured else None

    return DashboardConfig(
        store=store,
        config_path=config_path,
        sources=named,
        templates_dir=folder(templates, section.templates),
        attachments_dir=folder(attachments, section.attachments),
        secret_key=section.secret_key or None,
    )


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


# -------------------------------------------------------------------------- fields


def _one(form: Form, name: str) -> str | None:
    """A single-valued field, by its CLI name with dashes or underscores."""
    for key in (name, name.replace("_", "-")):
        values = form.get(key)
        if values:
            return str(values[-1])
    return None


def _many(form: Form, name: str) -> list[str] | None:
    for key in (name, name.replace("_", "-")):
        if key in form:
            return [str(v) for v in form[key]]
    return None


def _number(form: Form, name: str, kind: Callable[[str], Any]) -> Any:
    text = _one(form, name)
    if text is None or text.strip() == "":
        return None
    try:
        return kind(text.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise InputError(f"--{name.replace('_', '-')}: must be {what}, got {text!r}") from None


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(filename: str, default: str) -> str:
    name = _SAFE.sub("_", Path(filename.replace("\\", "/")).name).strip("._")
    return name[:100] or default


def selected(form: Form) -> list[str] | None:
    """The selected addresses: absent means everyone; given but empty is a mistake."""
    values = _many(form, "selected")
    if values is None:
        return None
    addresses = [v.strip() for v in values if v.strip()]
    if not addresses:
        raise InputError("selected: no recipient selected; select at least one")
    return addresses


def _options(
    cfg: DashboardConfig, form: Form, upload: Upload | None, tmp: Path, shown: dict[str, str]
) -> tuple[SourceOptions, SendOptions]:
    source_name = _one(form, "source")
    if (upload is None) == (source_name is None):
        raise InputError("give exactly one recipient source: csv (a file upload) or source")
    src = NamedSource()
    if upload is not None:
        name = _safe_name(upload.filename, "upload.csv")
        path = tmp / "upload" / name
        path.parent.mkdir()
        path.write_bytes(upload.data)
        shown[str(path)] = name
        src = NamedSource(csv=str(path))
    else:
        assert source_name is not None
        if source_name not in cfg.sources:
            known = ", ".join(sorted(cfg.sources)) or "none configured"
            raise InputError(f"source {source_name!r}: no such source (known: {known})")
        src = cfg.sources[source_name]
    template, text = _one(form, "template"), _one(form, "template_text")
    if (template is None) == (text is None):
        raise InputError("give exactly one template: template (a configured name) or template_text")
    template_path = _template(cfg, "template", template, text, tmp, shown)
    assert template_path is not None
    html, html_text = _one(form, "html_template") or None, _one(form, "html_template_text") or None
    if html is not None and html_text is not None:
        raise InputError(
            "give at most one HTML template: html_template (a configured name) "
            "or html_template_text"
        )
    html_path = _template(cfg, "html_template", html, html_text, tmp, shown)
    subject = _one(form, "subject")
    if subject is None or not subject.strip():
        raise InputError("--subject: missing; give the subject (a template)")
    opts = SourceOptions(
        csv=src.csv,
        xlsx=src.xlsx,
        sheet=src.sheet,
        db=src.db,
        query=src.query,
        template=template_path,
        html_template=html_path,
        attach=_attachments(cfg, form, shown),
        subject=subject,
        on_empty=_one(form, "on_empty"),
        only=selected(form) or (),
    )
    send = SendOptions(
        rate=_number(form, "rate", float),
        burst=_number(form, "burst", int),
        max_retries=_given_or(_number(form, "max_retries", int), 3),
        dedupe_key=(_one(form, "dedupe_key") or "").strip() or None,
        windows=tuple(w for w in _many(form, "window") or () if w.strip()),
        tz=_one(form, "tz") or None,
        not_before=_one(form, "not_before") or None,
        not_after=_one(form, "not_after") or None,
        per_hour=_number(form, "per_hour", int),
        per_day=_number(form, "per_day", int),
        name=_one(form, "name") or None,
        recheck=_flag(form, "recheck"),
    )
    return opts, send


_TRUE, _FALSE = ("1", "true", "on", "yes"), ("", "0", "false", "off", "no")


def _flag(form: Form, name: str) -> bool:
    """A yes/no field (a ticked checkbox sends "on"; JSON true arrives as "True")."""
    text = (_one(form, name) or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InputError(f"--{name.replace('_', '-')}: must be true or false, got {text!r}")


def _worker_env(cfg: DashboardConfig, job_id: int) -> dict[str, str]:
    """The environment a worker for the job needs (``jobs.worker_env``): with --recheck,
    the course database URL with its password, from the configured source naming the
    database the job records (the job keeps it without the password)."""
    from bulkmail.recheck import runtime_url

    recorded = cfg.store.get_job(job_id).recheck_url
    candidates = [s.db for s in cfg.sources.values() if s.db]
    db_url = runtime_url(recorded, candidates) if recorded is not None else None
    return jobs.worker_env(cfg.load_settings(), db_url)


def _given_or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _template(
    cfg: DashboardConfig,
    field: str,
    name: str | None,
    text: str | None,
    tmp: Path,
    shown: dict[str, str],
) -> str | None:
    """The path of a template a request gives by ``field`` (a configured template's name) or
    ``field_text`` (the text itself, written to the request's temporary folder)."""
    if name is not None:
        names = cfg.template_names()
        if name not in names:
            known = ", ".join(names) or "none configured"
            raise InputError(f"{field} {name!r}: no such template (known: {known})")
        assert cfg.templates_dir is not None
        return str(cfg.templates_dir / name)
    if text is None:
        return None
    path = tmp / f"{field}_text"
    path.write_text(text, encoding="utf-8")
    shown[str(path)] = f"{field}_text"
    return str(path)


def _attachments(cfg: DashboardConfig, form: Form, shown: dict[str, str]) -> tuple[str, ...]:
    """``attach``: names of files in the configured attachments folder, never a client's
    path. A name with template syntax (``{{ course }}.pdf``) is a pattern as ``--attach``
    takes it: rendered for each recipient, and refused when it leads out of the folder."""
    given = [a.strip() for a in _many(form, "attach") or () if a.strip()]
    if not given:
        return ()
    folder = cfg.attachments_dir
    if folder is None:
        raise InputError("attach: no attachments folder is configured on the server")
    names = cfg.attachment_names()
    base = os.path.join(str(folder.absolute()), "")
    if any(d in base for d in ("{{", "{%", "{#")):
        base = "{% raw %}" + base + "{% endraw %}"
    # an error names an attachment as the request did, not by the server's folder (which
    # the CLI's message shows relative to the current directory when it is under it)
    cwd = os.path.join(os.getcwd(), "")
    for folder_shown in {base, base.removeprefix(cwd)} - {""}:
        for quote in "'\"":
            shown[f"the folder {quote}{folder_shown}{quote}"] = "the attachments folder"
            shown[quote + folder_shown] = quote
    patterns: list[str] = []
    for name in given:
        if "/" in name or "\\" in name or name.startswith("."):
            # a name is a file of the folder, never a path: '..' or a hidden file would lead
            # out of what the folder offers
            raise InputError(
                f"attach {name!r}: a file name of the attachments folder, not a path "
                "(no '/', no leading '.')"
            )
        if any(d in name for d in ("{{", "{%", "{#")):
            patterns.append(base + name)  # rendered per recipient, kept inside the folder
            continue
        if name not in names:
            known = ", ".join(names) or "none in the folder"
            raise InputError(f"attach {name!r}: no such attachment (known: {known})")
        # as a pattern whose literal part is the folder, so the composer keeps it inside
        # the folder with every link followed (a link planted there cannot lead out)
        quoted = "{% raw %}" + name + "{% endraw %}"
        shown[quoted] = name
        patterns.append(base + quoted)
    return tuple(patterns)


@contextmanager
def planned(cfg: DashboardConfig, form: Form, upload: Upload | None) -> Iterator[Plan]:
    """The request's plan (``jobs.plan``, as ``send-reminders`` makes it), valid while the
    ``with`` block runs; a BulkmailError raised in it names the upload and the template
    text as the user gave them, not their temporary paths."""
    with tempfile.TemporaryDirectory(prefix="bulkmail-web-") as folder:
        shown: dict[str, str] = {}
        try:
            opts, send = _options(cfg, form, upload, Path(folder), shown)
            plan = jobs.plan(opts, send, cfg.load_settings())
            if "template_text" in shown.values():
                plan.templates = replace(plan.templates, text_name="template_text")
            if "html_template_text" in shown.values():
                plan.templates = replace(plan.templates, html_name="html_template_text")
            for path, name in shown.items():
                if plan.source.description == path:
                    plan.source.description = f"upload {name}"
            yield plan
        except BulkmailError as exc:
            message = exc.message
            for path, name in shown.items():
                message = message.replace(path, name)
            exc.message, exc.args = message, (message,)
            raise


# -------------------------------------------------------------------------- operations


def _checked_summary(store: JobStore, plan: Plan) -> jobs.DryRun:
    """The dry run ``send-reminders`` makes before it asks, and its refusals (exit 2 there,
    400 here), with the same messages."""
    key = plan.send.dedupe_key
    taken = store.taken_under(key) if key else None
    summary = jobs.dry_run(plan, taken=taken, history=jobs.account_history(store, plan))
    if summary.refused:
        more = len(summary.refused) - 1
        raise InputError(summary.refused[0][2] + (f" (and {more} more rows)" if more else ""))
    if summary.nothing_valid:
        raise InputError(f"{summary.source}: no valid recipient; every row is skipped")
    return summary


@dataclass(frozen=True)
class Started:
    job_id: int
    document: documents.JobDocument


def send(cfg: DashboardConfig, form: Form, upload: Upload | None, who: Identity) -> Started:
    """Validate and render everything, create the job (recording ``who``) and start a
    detached worker for it: the web process never sends."""
    with planned(cfg, form, upload) as plan:
        _checked_summary(cfg.store, plan)
        job_id = jobs.create_job(cfg.store, plan, created_by=who.name)
    started = jobs.start_detached(
        cfg.store, job_id, config=cfg.config_path, env=_worker_env(cfg, job_id)
    )
    return Started(job_id, _detached_document(cfg.store, started))


def _detached_document(store: JobStore, started: jobs.Detached) -> documents.JobDocument:
    """As ``send-reminders --detach --json`` prints it."""
    doc = documents.job_document(store.view(started.job_id))
    doc["worker_pid"], doc["log_path"] = started.pid, started.log_path
    return doc


def inspect(cfg: DashboardConfig, form: Form, upload: Upload | None) -> dict[str, Any]:
    """Every recipient of the source (for the page's table: all of them, whatever is
    selected), the skipped ones with their reasons, and what a send of all would take."""
    with planned(cfg, form, upload) as plan:
        key = plan.send.dedupe_key
        taken = cfg.store.taken_under(key) if key else {}
        rows: list[dict[str, Any]] = []
        total = 0
        for s in jobs.vetted(plan):
            r = s.recipient
            reason = s.fatal or r.skip_reason
            held = taken.get(r.email.lower()) if key else None
            if reason is None and key and held is not None:
                from bulkmail.store.records import dedupe_reason

                reason = dedupe_reason(key, *held)
            total += 1
            if len(rows) < TABLE_LIMIT:
                rows.append(
                    {
                        "row": r.row,
                        "email": r.email,
                        "name": r.name,
                        "skip_reason": reason,
                        "fatal": s.fatal is not None,
                    }
                )
        if total == 0:
            raise InputError(f"{plan.source.description}: no recipients")
        history = jobs.account_history(cfg.store, plan)
        summary = jobs.dry_run(plan, taken=taken or None, history=history)
        from bulkmail import ui

        calendar = ui.calendar_line(summary.calendar) if summary.calendar else None
        return {
            "source": plan.source.description,
            "provider": plan.provider,
            "sender": plan.sender,
            "rate": plan.rate,
            "burst": plan.burst,
            "total": total,
            "to_send": summary.to_send,
            "estimated_seconds": summary.estimated_seconds,
            "calendar": calendar,
            "warnings": list(plan.source.warnings),
            "recipients": rows,
            "truncated": total > len(rows),
        }


def preview(cfg: DashboardConfig, form: Form, upload: Upload | None) -> dict[str, Any]:
    """The message one recipient (``email``) gets, rendered exactly as it will be sent."""
    email = (_one(form, "email") or "").strip()
    if not email:
        raise InputError("email: give the address of the recipient to preview")
    narrowed = {k: v for k, v in form.items() if k != "selected"}
    narrowed["selected"] = [email]
    with planned(cfg, narrowed, upload) as plan:
        for s in jobs.vetted(plan):
            reason = s.fatal or s.recipient.skip_reason
            if reason is not None:
                return {"to": s.recipient.email, "skipped": reason}
        message = jobs.preview(plan, 1)[0]
    return {
        "from": f"{message.from_name} <{message.from_email}>"
        if message.from_name
        else message.from_email,
        "to": f"{message.to_name} <{message.to_email}>" if message.to_name else message.to_email,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "attachments": [a.filename for a in message.attachments],
        "skipped": None,
    }


def choices(cfg: DashboardConfig) -> dict[str, list[str]]:
    """What a request may name: the configured sources, templates and attachments."""
    return {
        "sources": sorted(cfg.sources),
        "templates": cfg.template_names(),
        "attachments": cfg.attachment_names(),
    }


def status(store: JobStore, job_id: int, *, failed: bool = False) -> documents.JobDocument:
    """``status --json`` (``--failed``: with the failures, the last one last)."""
    doc = documents.job_document(store.view(job_id))
    if failed:
        doc["failures"] = documents.failures(store, job_id)
    return doc


def recent(store: JobStore, limit: int) -> list[documents.JobDocument]:
    return [documents.job_document(v) for v in store.recent(limit)]


def cancel(store: JobStore, job_id: int) -> documents.JobDocument:
    from bulkmail.liveness import this_host, worker_alive

    now, host = time.time(), this_host()
    store.cancel(job_id, now=now, alive=lambda w: worker_alive(w, now=now, host=host))
    return documents.job_document(store.view(job_id))


def resume(cfg: DashboardConfig, job_id: int) -> tuple[bool, documents.JobDocument]:
    """(started, document): a finished job has nothing to resume (its document as is)."""
    nothing = jobs.check_resume(cfg.store, job_id)
    if nothing is not None:
        return False, documents.job_document(nothing.view)
    started = jobs.start_detached(
        cfg.store, job_id, config=cfg.config_path, env=_worker_env(cfg, job_id)
    )
    return True, _detached_document(cfg.store, started)


def retry(cfg: DashboardConfig, job_id: int) -> tuple[bool, documents.JobDocument]:
    count = jobs.prepare_retry(cfg.store, job_id)
    if not isinstance(count, int):
        return False, documents.job_document(count.view)
    started = jobs.start_detached(
        cfg.store, job_id, config=cfg.config_path, env=_worker_env(cfg, job_id)
    )
    return True, _detached_document(cfg.store, started)
