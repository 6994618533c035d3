// bulkmail dashboard: plain JavaScript, no build step. Calls the JSON API with the page's
// session cookie and its CSRF token; every error shown is the API's one-line message.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const api = document.querySelector('meta[name="api-base"]').content;
  const $ = (sel) => document.querySelector(sel);
  const ACTIVE = "bulkmail-active-job";

  async function call(method, path, body) {
    const options = { method, headers: { "X-CSRF-Token": csrf, Accept: "application/json" }, credentials: "same-origin" };
    if (body) options.body = body;
    const response = await fetch(api + path, options);
    const data = await response.json().catch(() => ({ error: "the server answered " + response.status }));
    if (!response.ok) throw new Error(data.error || ("error " + response.status));
    return data;
  }

  function showError(error) {
    const box = $("#error");
    if (!box) return;
    box.hidden = !error;
    box.textContent = error ? error.message || String(error) : "";
  }

  function text(node, value) { if (node) node.textContent = value === null || value === undefined ? "" : String(value); }

  // ----------------------------------------------------------------- progress modal
  const dialog = $("#progress");
  let watching = null, timer = null;

  function field(name) { return dialog.querySelector('[data-field="' + name + '"]'); }

  function render(doc) {
    const sendable = doc.total - doc.skipped - doc.cancelled;
    text(field("id"), doc.id);
    text(field("state"), doc.state);
    text(field("sent"), doc.sent);
    text(field("sendable"), sendable);
    text(field("failed"), doc.failed);
    text(field("pending"), doc.pending + doc.in_doubt);
    text(field("skipped"), doc.skipped);
    const done = doc.sent + doc.failed;
    const percent = sendable > 0 ? Math.round((100 * done) / sendable) : 100;
    dialog.querySelector(".fill").style.width = percent + "%";
    dialog.querySelector(".bar").setAttribute("aria-valuenow", percent);
    const failures = doc.failures || [];
    const last = failures.length ? failures[failures.length - 1] : null;
    const error = doc.error || (last ? last.email + ": " + last.error : "");
    const box = field("last_error");
    box.hidden = !error;
    text(box, error ? "Last error: " + error : "");
    field("report").href = api + "/jobs/" + doc.id + "/report";
    const cancel = $("#cancel-job");
    const finished = ["completed", "cancelled"].includes(doc.state);
    if (cancel) cancel.disabled = finished;

    return finished;
  }

  async function poll() {
    if (watching === null) return;
    try {
      const finished = render(await call("GET", "/job-status/" + watching + "?failed=1"));
      timer = setTimeout(poll, finished ? 5000 : 1000);
    } catch (error) {
      text(field("last_error"), error.message);
      field("last_error").hidden = false;
      timer = setTimeout(poll, 3000);
    }
  }

  function openJob(id) {
    watching = Number(id);
    localStorage.setItem(ACTIVE, String(watching));
    if (!dialog.open) dialog.showModal();
    clearTimeout(timer);
    poll();
  }

  function closeJob() {
    watching = null;
    clearTimeout(timer);
    localStorage.removeItem(ACTIVE);
    dialog.close();
  }

  if (dialog) {
    $("#close-progress").addEventListener("click", closeJob);
    dialog.addEventListener("cancel", () => { watching = null; clearTimeout(timer); });
    const cancel = $("#cancel-job");
    if (cancel) cancel.addEventListener("click", async () => {
      if (!confirm("Cancel job " + watching + "? Pending reminders will not be sent.")) return;
      try { render(await call("POST", "/jobs/" + watching + "/cancel")); } catch (error) { text(field("last_error"), error.message); field("last_error").hidden = false; }
    });
    // reopening the page finds the job again
    const wanted = new URLSearchParams(location.search).get("job") || localStorage.getItem(ACTIVE);
    if (wanted) openJob(wanted);
  }

  // ----------------------------------------------------------------- recent jobs
  const jobsTable = $("#jobs");
  async function refreshJobs() {
    try {
      const docs = await call("GET", "/recent-jobs?limit=20");
      const body = jobsTable.tBodies[0];
      body.replaceChildren();
      $("#no-jobs").hidden = docs.length > 0;
      for (const doc of docs) {
        const row = body.insertRow();
        row.dataset.job = doc.id;
        const sendable = doc.total - doc.skipped - doc.cancelled;
        const percent = sendable > 0 ? Math.round((100 * (doc.sent + doc.failed)) / sendable) : 100;
        const cells = [doc.id, doc.state, null, doc.name || doc.subject, doc.source, doc.created_by || "cli", (doc.created_at || "").replace("T", " ").replace("Z", "")];
        cells.forEach((value, n) => {
          const cell = row.insertCell();
          if (n === 2) {
            cell.innerHTML = '<div class="bar"><div class="fill"></div></div>';
            cell.querySelector(".fill").style.width = percent + "%";
            cell.append(doc.sent + "/" + sendable + (doc.failed ? ", " + doc.failed + " failed" : ""));
          } else text(cell, value);
        });
        row.addEventListener("click", () => openJob(doc.id));
      }
      showError(null);
    } catch (error) { showError(error); }
    setTimeout(refreshJobs, 2000);
  }
  if (jobsTable) refreshJobs();

  // ----------------------------------------------------------------- new reminder
  const form = $("#reminder");
  if (!form) return;
  const source = $("#source"), csvInput = $("#csv"), template = $("#template"), templateText = $("#template_text");
  const htmlTemplate = $("#html_template"), htmlText = $("#html_template_text");
  let plan = null, highlighted = null;

  function syncInputs() {
    csvInput.hidden = source.value !== "";
    templateText.hidden = template.value !== "";
    htmlText.hidden = htmlTemplate.value !== "-text";
  }
  source.addEventListener("change", syncInputs);
  template.addEventListener("change", syncInputs);
  htmlTemplate.addEventListener("change", syncInputs);
  syncInputs();

  function baseForm() {
    const data = new FormData();
    if (source.value) data.append("source", source.value);
    else if (csvInput.files.length) data.append("csv", csvInput.files[0]);
    if (template.value) data.append("template", template.value);
    else data.append("template_text", templateText.value);
    if (htmlTemplate.value === "-text") data.append("html_template_text", htmlText.value);
    else if (htmlTemplate.value) data.append("html_template", htmlTemplate.value);
    for (const box of form.querySelectorAll('input[name="attach"]:checked')) data.append("attach", box.value);
    for (const name of ["subject", "name", "rate", "per_hour", "per_day", "window", "dedupe_key"]) {
      const value = form.elements[name].value.trim();
      if (value) data.append(name, value);
    }
    if (form.elements.recheck.checked) data.append("recheck", "on");
    return data;
  }

  function chosen() {
    return [...document.querySelectorAll("#recipients tbody input:checked")].map((box) => box.value);
  }

  function duration(seconds) {
    if (seconds < 60) return Math.max(1, Math.round(seconds)) + " s";
    if (seconds < 3600) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function updateSend() {
    const button = $("#send");
    if (!button || !plan) return;
    const count = chosen().length;
    let label = "Send " + count + " reminder" + (count === 1 ? "" : "s");
    if (count && plan.rate > 0 && count > plan.burst) label += ", about " + duration((count - plan.burst) / plan.rate);
    else if (count) label += ", at once";
    if (plan.calendar) label += " (" + plan.calendar + ")";
    button.textContent = label;
    button.disabled = count === 0;
  }

  async function showMessage(row, email) {
    if (highlighted) highlighted.classList.remove("highlight");
    highlighted = row;
    row.classList.add("highlight");
    const box = $("#message");
    box.textContent = "…";
    try {
      const data = baseForm();
      data.append("email", email);
      const message = await call("POST", "/preview", data);
      box.replaceChildren();
      const head = document.createElement("div");
      head.className = "head";
      if (message.skipped) { head.textContent = message.to + " is skipped: " + message.skipped; box.append(head); return; }
      for (const [label, value] of [["From", message.from], ["To", message.to], ["Subject", message.subject]]) {
        const line = document.createElement("div");
        line.textContent = label + ": " + value;
        head.append(line);
      }
      if (message.attachments && message.attachments.length) {
        const line = document.createElement("div");
        line.className = "attached";
        line.textContent = "Attachments: " + message.attachments.join(", ");
        head.append(line);
      }
      const body = document.createElement("div");
      body.className = "body";
      body.textContent = message.text;
      box.append(head, body);
      if (message.html !== null && message.html !== undefined) {
        // the HTML part in a sandbox: no scripts, an opaque origin (never this page's)
        const label = document.createElement("div");
        label.className = "part";
        label.textContent = "HTML part";
        const frame = document.createElement("iframe");
        frame.className = "html-part";
        frame.setAttribute("sandbox", "");
        frame.setAttribute("referrerpolicy", "no-referrer");
        frame.title = "HTML part of the message";
        frame.srcdoc = message.html;
        box.append(label, frame);
      }
    } catch (error) { box.textContent = error.message; }
  }

  $("#load").addEventListener("click", async () => {
    showError(null);
    try {
      plan = await call("POST", "/recipients", baseForm());
    } catch (error) { showError(error); $("#pick").hidden = true; return; }
    const body = $("#recipients").tBodies[0];
    body.replaceChildren();
    const skipped = $("#skipped");
    skipped.replaceChildren();
    for (const r of plan.recipients) {
      if (r.skip_reason) {
        const item = document.createElement("li");
        item.textContent = "row " + r.row + " (" + (r.email || "no address") + "): " + r.skip_reason;
        skipped.append(item);
        continue;
      }
      const row = body.insertRow();
      row.dataset.search = (r.name + " " + r.email).toLowerCase();
      const box = document.createElement("input");
      box.type = "checkbox"; box.checked = true; box.value = r.email;
      box.setAttribute("aria-label", "send to " + r.email);
      box.addEventListener("change", updateSend);
      box.addEventListener("click", (event) => event.stopPropagation());
      row.insertCell().append(box);
      text(row.insertCell(), r.row);
      text(row.insertCell(), r.name);
      text(row.insertCell(), r.email);
      row.addEventListener("click", () => showMessage(row, r.email));
    }
    if (!skipped.children.length) { const none = document.createElement("li"); none.textContent = "none"; skipped.append(none); }
    text($("#summary"), plan.total + " rows from " + plan.source + (plan.truncated ? " (first " + plan.recipients.length + " shown)" : ""));
    $("#pick").hidden = false;
    updateSend();
    const first = body.rows[0];
    if (first) showMessage(first, first.querySelector("input").value);
  });

  function visibleBoxes() { return [...document.querySelectorAll("#recipients tbody tr")].filter((row) => !row.hidden).map((row) => row.querySelector("input")); }
  $("#all").addEventListener("click", () => { visibleBoxes().forEach((box) => { box.checked = true; }); updateSend(); });
  $("#none").addEventListener("click", () => { visibleBoxes().forEach((box) => { box.checked = false; }); updateSend(); });
  $("#filter").addEventListener("input", (event) => {
    const needle = event.target.value.trim().toLowerCase();
    for (const row of document.querySelectorAll("#recipients tbody tr")) row.hidden = needle !== "" && !row.dataset.search.includes(needle);
  });

  const send = $("#send");
  if (send) send.addEventListener("click", async () => {
    const data = baseForm();
    for (const email of chosen()) data.append("selected", email);
    send.disabled = true;
    showError(null);
    try {
      const answer = await call("POST", "/send-instructor-reminders", data);
      openJob(answer.job_id);
    } catch (error) { showError(error); }
    updateSend();
  });
})();
