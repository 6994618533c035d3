"""Shared fixtures. Every test runs with its own HOME, XDG dirs and no BULKMAIL_* variables,
so nothing a developer has configured leaks in and nothing is written outside tmp_path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bulkmail.store import Store


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith("BULKMAIL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.chdir(tmp_path)
    yield home


from tests.pg import pg_server, pg_url, store_url  # noqa: E402, F401
from tests.smtp_sink import smtp_sink  # noqa: E402, F401


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:  # noqa: F811 (store_url: a fixture)
    """The job store under test, once on each backend (``store_url``: a SQLite file, then a
    PostgreSQL database): every test taking ``store`` checks the contract on both."""
    from bulkmail.store import open_store

    s = open_store(store_url)
    yield s
    s.close()
