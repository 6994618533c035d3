"""The dashboard's pages (server-rendered; a little JavaScript calls the API with the
session's cookie and CSRF token): the recent jobs, "New reminder", the login."""

from __future__ import annotations

from typing import Any

from flask import redirect, render_template, request, session, url_for

from bulkmail.web.auth import authenticate
from bulkmail.web.dashboard import blueprint
from bulkmail.web.dashboard.security import Denied, config, csrf_ok, csrf_token, identify

# the pages run only their own script: an HTML template's preview (an iframe's srcdoc,
# sandboxed without scripts) and anything a template or a CSV value smuggles in cannot
# script the dashboard's origin
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


@blueprint.after_request
def _security_headers(response: Any) -> Any:
    if request.path.startswith("/dashboard/") and response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


def _page(template: str, role: str, **context: Any) -> Any:
    try:
        who = identify(role)
    except Denied as denied:
        if denied.status == 401:
            return redirect(url_for("bulkmail_dashboard.login", next=request.path))
        return render_template("dashboard/denied.html", message=denied.message), 403
    return render_template(template, who=who, csrf=csrf_token(), **context)


@blueprint.get("/dashboard/")
def jobs_page() -> Any:
    return _page("dashboard/jobs.html", "viewer")


@blueprint.get("/dashboard/new")
def new_page() -> Any:
    cfg = config()
    templates = cfg.template_names()
    # the text template preselected: the first that is not HTML
    text = [t for t in templates if not t.lower().endswith((".html", ".htm"))]
    return _page(
        "dashboard/new.html",
        "viewer",
        sources=sorted(cfg.sources),
        templates=templates,
        text_default=(text or templates or [""])[0],
        attachments=cfg.attachment_names(),
    )


@blueprint.route("/dashboard/login", methods=["GET", "POST"])
def login() -> Any:
    error = None
    status = 200
    if request.method == "POST":
        if not csrf_ok():
            error, status = "The form expired; please try again.", 403
        else:
            who = authenticate(config().store, request.form.get("token", ""))
            if who is None:
                error, status = "Unknown or revoked token.", 401
            else:
                from bulkmail.web.auth import hash_token

                session.clear()  # a new session on login (no fixation)
                session["token_hash"] = hash_token(request.form["token"].strip())
                target = request.args.get("next", "")
                if not target.startswith("/") or target.startswith("//"):
                    target = url_for("bulkmail_dashboard.jobs_page")
                return redirect(target)
    return render_template("dashboard/login.html", error=error, csrf=csrf_token()), status


@blueprint.post("/dashboard/logout")
def logout() -> Any:
    if not csrf_ok():
        return render_template("dashboard/denied.html", message="missing or wrong CSRF token"), 403
    session.clear()
    return redirect(url_for("bulkmail_dashboard.login"))
