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
    whose files are the templates a request may name. ``secret_key``: signs the session
    cookie; when neither it nor the host app's ``SECRET_KEY`` is set, a random key per
    process is made (sessions then end when the server restarts)."""

    store: JobStore
    config_path: str | None = None
    sources: Mapping[str, NamedSource] = field(default_factory=dict)
    templates_dir: Path | None = None
    secret_key: str | None = None
    max_body: int = MAX_BODY
    settings: Callable[[], Settings] | None = None  # tests; default: load_settings

    def load_settings(self) -> Settings:
        if self.settings is not None:
            return self.settings()
        return load_settings(config=self.config_path)

    def template_names(self) -> list[str]:
        folder = self.templates_dir
        if folder is None or not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name[:1] != ".")


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
    if template is not None:
        if template not in cfg.template_names():
            known = ", ".join(cfg.template_names()) or "none configured"
            raise InputError(f"template {template!r}: no such template (known: {known})")
        assert cfg.templates_dir is not None
        template_path = str(cfg.templates_dir / template)
    else:
        assert text is not None
        path = tmp / "template_text"
        path.write_text(text, encoding="utf-8")
        shown[str(path)] = "template_text"
        template_path = str(path)
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
        subject=subject,
        on_empty=_one(form, "on_empty"),
        only=selected(form) or (),
    )
    send = SendOptions(
        rate=_number(form, "rate", float),
        burst=_number(form, "burst", int),
        max_retries=_number(form, "max_retries", int) or 3,
        dedupe_key=(_one(form, "dedupe_key") or "").strip() or None,
        windows=tuple(w for w in _many(form, "window") or () if w.strip()),
        tz=_one(form, "tz") or None,
        not_before=_one(form, "not_before") or None,
        not_after=_one(form, "not_after") or None,
        per_hour=_number(form, "per_hour", int),
        per_day=_number(form, "per_day", int),
    )
    return opts, send


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
    started = jobs.start_detached(cfg.store, job_id, config=cfg.config_path)
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
        summary = jobs.dry_run(plan, taken=taken or None)
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
    started = jobs.start_detached(cfg.store, job_id, config=cfg.config_path)
    return True, _detached_document(cfg.store, started)


def retry(cfg: DashboardConfig, job_id: int) -> tuple[bool, documents.JobDocument]:
    count = jobs.prepare_retry(cfg.store, job_id)
    if not isinstance(count, int):
        return False, documents.job_document(count.view)
    started = jobs.start_detached(cfg.store, job_id, config=cfg.config_path)
    return True, _detached_document(cfg.store, started)
