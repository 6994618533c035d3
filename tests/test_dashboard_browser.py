"""The dashboard as a real server process (``python -m bulkmail.web.dashboard`` under
waitress), over HTTP and in a real browser (Debian's chromium and chromium-driver, driven
by selenium) as a person uses it: log in, pick the example CSV, untick all but three
instructors, send, watch the progress modal reach 3/3 against a local SMTP server, and find
exactly those three deliveries in the store. A screenshot of each page is saved in the
test's tmp dir (not committed) for a person to look at."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from bulkmail.store import Store, open_store
from bulkmail.web.auth import add_token
from tests.dashboard_helpers import EXAMPLE_CSV, REPO, SENDER, SUBJECT, wait_finished
from tests.smtp_sink import SmtpSink

THREE = ["b.okafor@example.edu", "chen.wei@example.edu", "grace.nakamura@example.edu"]


@dataclass
class Server:
    base: str
    store: Store
    sender: str
    viewer: str
    proc: subprocess.Popen[str]


@pytest.fixture
def server(tmp_path: Path, smtp_sink: SmtpSink) -> Iterator[Server]:
    store = open_store(tmp_path / "jobs.db")
    sender = add_token(store, "office", "sender")
    viewer = add_token(store, "auditor", "viewer")
    templates = tmp_path / "templates"
    templates.mkdir()
    shutil.copy(REPO / "examples" / "reminder.txt", templates / "reminder.txt")
    env = {
        **os.environ,
        "BULKMAIL_PROVIDER": "smtp",
        "BULKMAIL_SMTP_HOST": smtp_sink.host,
        "BULKMAIL_SMTP_PORT": str(smtp_sink.port),
        "BULKMAIL_SMTP_SECURITY": "none",
        "BULKMAIL_FROM": SENDER,
        "BULKMAIL_RATE": "0",
    }
    cmd = [
        sys.executable, "-m", "bulkmail.web.dashboard", "--port", "0",
        "--store", str(tmp_path / "jobs.db"), "--templates", str(templates),
        "--source", f"instructors={EXAMPLE_CSV}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", line
    yield Server(f"http://127.0.0.1:{line[1]}", store, sender, viewer, proc)
    proc.terminate()
    proc.wait(10)
    store.close()


def test_the_api_through_a_real_server(server: Server, smtp_sink: SmtpSink) -> None:
    api = f"{server.base}/api/bulk-email"
    assert requests.get(f"{api}/recent-jobs", timeout=10).status_code == 401
    viewer = {"Authorization": f"Bearer {server.viewer}"}
    sender = {"Authorization": f"Bearer {server.sender}"}
    fields = {"source": "instructors", "template": "reminder.txt", "subject": SUBJECT}
    refused = requests.post(f"{api}/send-instructor-reminders", data=fields, headers=viewer)
    assert refused.status_code == 403
    answer = requests.post(
        f"{api}/send-instructor-reminders",
        data={**fields, "selected": THREE[:2]},
        headers=sender,
        timeout=30,
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    assert wait_finished(server.store, job_id) == "completed"
    status = requests.get(f"{server.base}{answer.json()['status_url']}", headers=viewer).json()
    assert (status["sent"], status["created_by"]) == (2, "office")
    too_big = requests.post(
        f"{api}/send-instructor-reminders",
        files={"csv": ("big.csv", b"x" * (11 * 1024 * 1024))},
        data={"subject": "s"},
        headers=sender,
        timeout=30,
    )
    assert too_big.status_code == 413
    assert len(server.store.recent(10)) == 1


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_a_person_sends_to_three_instructors_in_a_browser(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    found = chromium()
    if found is None:
        if os.environ.get("BULKMAIL_TEST_BROWSER_REQUIRED"):
            pytest.fail("chromium and chromium-driver are required here (apt-get install them)")
        pytest.skip("no chromium/chromedriver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    wait = WebDriverWait(driver, 30)
    try:
        driver.get(f"{server.base}/dashboard/")
        wait.until(ec.presence_of_element_located((By.ID, "token")))
        driver.save_screenshot(str(shots / "1-login.png"))
        driver.find_element(By.ID, "token").send_keys(server.sender)
        driver.find_element(By.CSS_SELECTOR, "form.login button").click()
        wait.until(ec.presence_of_element_located((By.ID, "jobs")))
        driver.save_screenshot(str(shots / "2-jobs-empty.png"))

        driver.find_element(By.LINK_TEXT, "New reminder").click()
        Select(wait.until(ec.presence_of_element_located((By.ID, "source")))).select_by_value(
            "instructors"
        )
        driver.find_element(By.ID, "load").click()
        rows = "#recipients tbody tr"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, rows)) == 12)
        wait.until(lambda d: "Subject: Reminder: CS101" in d.find_element(By.ID, "message").text)
        driver.find_element(By.ID, "none").click()
        for email in THREE:
            driver.find_element(By.CSS_SELECTOR, f'input[value="{email}"]').click()
        send = driver.find_element(By.ID, "send")
        assert send.text.startswith("Send 3 reminders"), send.text
        # the highlighted instructor's exact message
        driver.find_element(By.XPATH, "//td[text()='Chen Wei']").click()
        wait.until(lambda d: "CHEM110" in d.find_element(By.ID, "message").text)
        driver.save_screenshot(str(shots / "3-new-reminder.png"))
        driver.set_window_size(390, 844)  # a phone
        driver.save_screenshot(str(shots / "3b-new-reminder-phone.png"))
        driver.set_window_size(1280, 900)

        send.click()
        wait.until(lambda d: d.find_element(By.ID, "progress").get_attribute("open") is not None)

        def field(name: str) -> str:
            return str(
                driver.find_element(By.CSS_SELECTOR, f'#progress [data-field="{name}"]').text
            )

        wait.until(
            lambda d: (field("sent"), field("sendable"), field("state")) == ("3", "3", "completed")
        )
        driver.save_screenshot(str(shots / "4-progress.png"))
        # reopening the page finds the job again
        driver.get(f"{server.base}/dashboard/new")
        wait.until(lambda d: d.find_element(By.ID, "progress").get_attribute("open") is not None)
        driver.find_element(By.ID, "close-progress").click()
        driver.get(f"{server.base}/dashboard/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 1)
        driver.save_screenshot(str(shots / "5-jobs.png"))
    finally:
        driver.quit()
    jobs = server.store.recent(10)
    assert len(jobs) == 1
    deliveries = list(server.store.deliveries(jobs[0].job.id))
    assert sorted((d.email, d.state) for d in deliveries) == [(e, "sent") for e in sorted(THREE)]
    assert sorted(r for m in smtp_sink.messages for r in m.rcpt_tos) == sorted(THREE)
    assert jobs[0].job.created_by == "office"
    print(f"screenshots: {shots}")
