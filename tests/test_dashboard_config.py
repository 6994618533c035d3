"""The ``[dashboard]`` section of the config file: what ``bulkmail serve`` offers the
dashboard without long options (the sources, the templates and attachments folders, the
session key), the options on top; and a real ``bulkmail serve --config`` process answering
the source list."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from bulkmail.config import load_settings
from bulkmail.errors import ConfigError, InputError
from bulkmail.store import open_store
from bulkmail.web.auth import add_token
from bulkmail.web.dashboard.core import NamedSource, from_settings
from tests.dashboard_helpers import EXAMPLE_CSV
from tests.test_serve import free_port, wait_for_port

CONFIG = """
[dashboard]
templates = "templates"
attachments = "/srv/attachments"
secret_key = "s3cret-key-from-the-file"

[dashboard.sources]
instructors = "lists/instructors.csv"
staff = "lists/staff.xlsx"
courses = { db = "sqlite:///courses.db", query = "SELECT name, email FROM instructors" }
"""


def write_config(folder: Path, text: str = CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bulkmail.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_the_config_file_makes_serves_dashboard_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc")
    settings = load_settings(config=str(path), env={})
    assert "s3cret" not in repr(settings)  # a secret is never printed
    store = open_store(tmp_path / "jobs.db")
    cfg = from_settings(settings, store, config_path=str(path))
    etc = tmp_path / "etc"
    assert cfg.sources == {
        "instructors": NamedSource(csv=str(etc / "lists" / "instructors.csv")),
        "staff": NamedSource(xlsx=str(etc / "lists" / "staff.xlsx")),
        "courses": NamedSource(
            db="sqlite:///courses.db", query="SELECT name, email FROM instructors"
        ),
    }
    assert cfg.templates_dir == etc / "templates"  # relative to the config file
    assert cfg.attachments_dir == Path("/srv/attachments")
    assert cfg.secret_key == "s3cret-key-from-the-file"
    assert cfg.config_path == str(path)
    # the environment over the file, the options over both
    env = {
        "BULKMAIL_DASHBOARD_SECRET_KEY": "from-env",
        "BULKMAIL_DASHBOARD_TEMPLATES": "/env/templates",
    }
    settings = load_settings(config=str(path), env=env)
    cfg = from_settings(
        settings,
        store,
        sources=[f"instructors={EXAMPLE_CSV}", "extra=more.xlsx"],
        attachments=Path("/opt/files"),
    )
    assert (cfg.secret_key, cfg.templates_dir) == ("from-env", Path("/env/templates"))
    assert cfg.attachments_dir == Path("/opt/files")
    assert cfg.sources["instructors"] == NamedSource(csv=str(EXAMPLE_CSV))
    assert cfg.sources["extra"] == NamedSource(xlsx=str(tmp_path / "more.xlsx"))
    assert set(cfg.sources) == {"instructors", "staff", "courses", "extra"}
    cfg = from_settings(settings, store, templates=Path("tpl"))
    assert cfg.templates_dir == tmp_path / "tpl"
    with pytest.raises(InputError, match="--source: expected NAME=PATH, got 'nope'"):
        from_settings(settings, store, sources=["nope"])
    # no section: nothing configured, as before
    empty = from_settings(
        load_settings(config=str(write_config(tmp_path / "e", "")), env={}), store
    )
    assert (empty.sources, empty.templates_dir, empty.attachments_dir) == ({}, None, None)
    assert empty.secret_key is None
    store.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dashboard]\nsources = 3\n", "[dashboard.sources]: expected a table"),
        ("[dashboard.sources]\nx = 3\n", "[dashboard.sources] x: expected a path or a table"),
        ("[dashboard.sources]\nx = { db = 'sqlite://' }\n", "x: query goes with db"),
        ("[dashboard.sources]\nx = { csv = 'a', db = 'b' }\n", "x: give exactly one of"),
        ("[dashboard.sources]\nx = { path = 'a' }\n", "x: unknown key 'path'"),
        ("[dashboard]\ntemplate = 'x'\n", "unknown key 'template' in [dashboard]"),
        ("[dashboard]\nsecret_key = [1]\n", "[dashboard] secret_key: expected a string"),
    ],
)
def test_a_bad_dashboard_section_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config=str(path), env={})
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_serve_with_a_config_file_answers_the_source_list(tmp_path: Path) -> None:
    pytest.importorskip("waitress", reason="bulkmail serve needs the web extra")
    (tmp_path / "etc" / "templates").mkdir(parents=True)
    (tmp_path / "etc" / "templates" / "reminder.txt").write_text("Dear {{ name }}\n")
    (tmp_path / "etc" / "files").mkdir()
    (tmp_path / "etc" / "files" / "policy.pdf").write_bytes(b"%PDF-1.4\n")
    path = write_config(
        tmp_path / "etc",
        f'[dashboard]\ntemplates = "templates"\nattachments = "files"\n'
        f'[dashboard.sources]\ninstructors = "{EXAMPLE_CSV}"\n'
        '[mailtrap]\nwebhook_secret = "whsec"\n',
    )
    store = open_store(tmp_path / "jobs.db")
    token = add_token(store, "office", "viewer")
    port = free_port()
    cmd = [sys.executable, "-m", "bulkmail", "serve", "--port", str(port), "--config", str(path)]
    cmd += ["--store", str(tmp_path / "jobs.db"), "--source", f"more={EXAMPLE_CSV}"]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        wait_for_port(port, proc)
        answer = requests.get(
            f"http://127.0.0.1:{port}/api/bulk-email/sources",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "sources": ["instructors", "more"],
            "templates": ["reminder.txt"],
            "attachments": ["policy.pdf"],
        }
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        store.close()
    assert b"whsec" not in err
