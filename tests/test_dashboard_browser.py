"""The dashboard as a real server process (``python -m bulkmail.web.dashboard`` under
waitress), over HTTP and in a real browser (Debian's chromium and chromium-driver, driven
by selenium) as a person uses it: log in, pick the example CSV, untick all but three
instructors, send, watch the progress modal reach 3/3 against a local SMTP server, and find
exactly those three deliveries in the store. A screenshot of each page, at a desktop's
width and a phone's, is saved in $BULKMAIL_SCREENSHOTS or the test's tmp dir (not committed;
the test prints where) for a person to look at; at the phone's width no page may be wider
than the screen. An HTML template's preview must not run its script in the dashboard."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from bulkmail.store import Store, open_store
from bulkmail.web.auth import add_token
from tests.dashboard_helpers import EXAMPLE_CSV, REPO, SENDER, SUBJECT, wait_finished
from tests.smtp_sink import SmtpSink

THREE = ["b.okafor@example.edu", "chen.wei@example.edu", "grace.nakamura@example.edu"]
# read at import: the tests' isolated environment drops every BULKMAIL_* variable
SCREENSHOTS = os.environ.get("BULKMAIL_SCREENSHOTS")
BROWSER_REQUIRED = bool(os.environ.get("BULKMAIL_TEST_BROWSER_REQUIRED"))
DESKTOP, PHONE = (1280, 900), (390, 844)
HOSTILE = (
    "<p>Hello {{ name }}</p><script>parent.document.title = 'pwned';</script>"
    '<img src="x" onerror="parent.document.body.dataset.pwned = 1">'
)


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
    shutil.copy(REPO / "examples" / "reminder.html", templates / "reminder.html")
    attachments = tmp_path / "attachments"
    attachments.mkdir()
    (attachments / "grading-policy.pdf").write_bytes(b"%PDF-1.4 the grading policy\n")
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
        "--source", f"instructors={EXAMPLE_CSV}", "--attachments", str(attachments),
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


class Pages:
    """Screenshots of each page at a desktop's and a phone's width, each checked for
    horizontal overflow at the phone's."""

    def __init__(self, driver: Any, folder: Path) -> None:
        self.driver = driver
        self.folder = folder
        self.taken: list[str] = []

    def shoot(self, name: str) -> None:
        driver = self.driver
        for label, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
            driver.set_window_size(width, height)
            # the layout settles at the new width before the measure and the picture
            wide, inner, tall = driver.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth,"
                " document.documentElement.scrollHeight]"
            )
            if label == "phone":
                assert wide <= inner, f"{name}: {wide} px wide at a {inner} px phone"
            # the whole page, not only what the window shows
            driver.set_window_size(width, min(max(height, tall + 140), 5000))
            shot = self.folder / f"{len(self.taken) // 2 + 1:02d}-{name}-{label}.png"
            driver.save_screenshot(str(shot))
            self.taken.append(shot.name)
        driver.set_window_size(*DESKTOP)


def test_a_person_sends_to_three_instructors_in_a_browser(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    found = chromium()
    if found is None:
        if BROWSER_REQUIRED:
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
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--hide-scrollbars",
    ):  # fmt: skip
        options.add_argument(flag)
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {shots}")
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    wait = WebDriverWait(driver, 30)
    pages = Pages(driver, shots)
    try:
        driver.get(f"{server.base}/dashboard/")
        wait.until(ec.presence_of_element_located((By.ID, "token")))
        pages.shoot("login")
        driver.find_element(By.ID, "token").send_keys("bm_not-a-token")
        driver.find_element(By.CSS_SELECTOR, "form.login button").click()
        wait.until(
            lambda d: "Unknown or revoked token." in d.find_element(By.TAG_NAME, "main").text
        )
        pages.shoot("login-error")
        driver.find_element(By.ID, "token").send_keys(server.sender)
        driver.find_element(By.CSS_SELECTOR, "form.login button").click()
        wait.until(ec.presence_of_element_located((By.ID, "jobs")))
        wait.until(lambda d: d.find_element(By.ID, "no-jobs").is_displayed())
        pages.shoot("jobs-empty")

        driver.find_element(By.LINK_TEXT, "New reminder").click()
        source = Select(wait.until(ec.presence_of_element_located((By.ID, "source"))))
        source.select_by_value("instructors")
        # a mistake: the CLI's one line in the page
        subject = driver.find_element(By.ID, "subject")
        subject.clear()
        subject.send_keys("Reminder: {{ cours }}")
        driver.find_element(By.ID, "load").click()
        wait.until(lambda d: "did you mean 'course'?" in d.find_element(By.ID, "error").text)
        pages.shoot("new-reminder-error")
        subject.clear()
        subject.send_keys(SUBJECT)

        # an HTML template that tries to script the dashboard: previewed in a sandbox
        Select(driver.find_element(By.ID, "html_template")).select_by_value("-text")
        driver.find_element(By.ID, "html_template_text").send_keys(HOSTILE)
        driver.find_element(By.ID, "load").click()
        rows = "#recipients tbody tr"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, rows)) == 12)
        frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe.html-part")))
        assert frame.get_attribute("sandbox") == ""
        driver.switch_to.frame(frame)
        wait.until(lambda d: "Hello Ada Whitfield" in d.find_element(By.TAG_NAME, "body").text)
        driver.switch_to.default_content()
        assert driver.title == "New reminder · bulkmail"
        assert driver.execute_script("return document.body.dataset.pwned") is None

        # the configured HTML template and an attachment, then all but three unticked
        Select(driver.find_element(By.ID, "html_template")).select_by_value("reminder.html")
        driver.find_element(By.CSS_SELECTOR, 'input[name="attach"]').click()
        driver.find_element(By.ID, "load").click()
        wait.until(lambda d: "Subject: Reminder: CS101" in d.find_element(By.ID, "message").text)
        wait.until(lambda d: "grading-policy.pdf" in d.find_element(By.ID, "message").text)
        driver.find_element(By.ID, "none").click()
        for email in THREE:
            driver.find_element(By.CSS_SELECTOR, f'input[value="{email}"]').click()
        send = driver.find_element(By.ID, "send")
        assert send.text.startswith("Send 3 reminders"), send.text
        # the highlighted instructor's exact message
        driver.find_element(By.XPATH, "//td[text()='Chen Wei']").click()
        wait.until(lambda d: "CHEM110" in d.find_element(By.ID, "message").text)
        frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe.html-part")))
        driver.switch_to.frame(frame)
        wait.until(lambda d: "Dear Chen Wei" in d.find_element(By.TAG_NAME, "body").text)
        driver.switch_to.default_content()
        pages.shoot("new-reminder")

        send.click()
        wait.until(lambda d: d.find_element(By.ID, "progress").get_attribute("open") is not None)

        def field(name: str) -> str:
            return str(
                driver.find_element(By.CSS_SELECTOR, f'#progress [data-field="{name}"]').text
            )

        wait.until(
            lambda d: (field("sent"), field("sendable"), field("state")) == ("3", "3", "completed")
        )
        pages.shoot("progress")
        # reopening the page finds the job again
        driver.get(f"{server.base}/dashboard/new")
        wait.until(lambda d: d.find_element(By.ID, "progress").get_attribute("open") is not None)
        driver.find_element(By.ID, "close-progress").click()
        driver.get(f"{server.base}/dashboard/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 1)
        pages.shoot("jobs")
    finally:
        driver.quit()
    jobs = server.store.recent(10)
    assert len(jobs) == 1
    deliveries = list(server.store.deliveries(jobs[0].job.id))
    assert sorted((d.email, d.state) for d in deliveries) == [(e, "sent") for e in sorted(THREE)]
    assert sorted(r for m in smtp_sink.messages for r in m.rcpt_tos) == sorted(THREE)
    assert jobs[0].job.created_by == "office"
    for received in smtp_sink.messages:
        message = received.parse()
        assert message.get_body(("html",)) is not None
        assert [p.get_filename() for p in message.iter_attachments()] == ["grading-policy.pdf"]
    assert len(pages.taken) == 14
    print(f"screenshots: {shots}: {', '.join(pages.taken)}")
