"""The Airflow 3.3 UI end to end, in a real browser (Debian's chromium, driven by Playwright):

1. the Add Connection form for an ``llmq`` Azure connection with a CA, saved, reopened: the values
   come back and the key stays masked; saved again as reopened (``***`` in the key box), the
   stored key is kept, or the run in 2 could not authenticate;
2. ``llmq_pipeline`` triggered from the UI, run by ``airflow standalone`` against the mock server
   over TLS (its own CA) with the connection from 1, finishing in ``success``;
3. the ``query_llm`` task log shows llmq's progress lines and its XCom tab the summary.

Screenshots of every step go to ``$LLMQ_BROWSER_ARTIFACTS`` (default tests/browser/artifacts/);
``LLMQ_BROWSER_UPDATE_DOCS=1`` also copies the form and the finished run to docs/screenshots/.
Run with ``make test-browser`` or ``pytest -m browser tests/browser -s``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser.conftest import BROWSER_KEY, DAG_ID, DEPLOYMENT, REPO, SAMPLE_ROWS, RunStats
from tests.browser.stack import AirflowStandalone, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

    from airflow_provider_llmq.testing.mock_server import MockServerProcess

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1200)]

CONN_ID = "llmq_default"  # what dags/llmq_pipeline.py's query_llm uses
CONN_TYPE_NAME = "LLM Query (OpenAI / Azure OpenAI)"  # hook-name in get_provider_info()
API_VERSION = "2024-06-01"  # typed in: the field has no default (Azure's v1 API takes none)
# conn-fields of Entra ID authentication (auth_type is a dropdown, checked apart)
ENTRA_FIELDS = (
    "tenant_id",
    "client_id",
    "client_secret",
    "certificate_path",
    "authority_host",
    "scope",
    "authority_ca_cert",
)
RUN_TIMEOUT = 600.0  # about 1 min on an idle machine, 3 min seen on a busy one
# the docs keep two of the screenshots: artifact name -> docs/screenshots/ name
DOCS_SCREENSHOTS = {
    "02-connection-form-extra.png": "connection-form.png",
    "05-run-graph.png": "finished-run.png",
}
# llmq's progress lines (airflow_provider_llmq/core/accounting/progress.py), matched on fragments
# that survived its rewordings: "llmq", one of "progress" / "requests" / "rows", and a done/total count, as in
# "llmq progress: 240/240 requests (100%), 25.8 requests/s, ETA 0 s; ..."
PROGRESS_WORDS = ("progress", "requests", "rows")
PROGRESS_COUNT = re.compile(r"(?<![\w/])(\d+)/(\d+)(?![\w/])")
SUMMARY_KEYS = ("rows", "ok", "errors", "requests_sent", "retries", "prompt_tokens", "completion_tokens")


def shot(page: Page, artifacts: Path, name: str, target: Locator | None = None) -> Path:
    path = artifacts / name
    (target or page).screenshot(path=str(path), animations="disabled")
    return path


def open_accordion(dialog: Locator, title: str) -> Locator:
    """Opens a section of the connection form (a Chakra accordion) and returns its content."""
    trigger = dialog.get_by_role("button", name=title, exact=True)
    if trigger.get_attribute("aria-expanded") != "true":
        trigger.click()
    content = dialog.locator(f"[id='{trigger.get_attribute('aria-controls')}']")
    content.wait_for(state="visible")
    return content


def fill_connection_form(page: Page, artifacts: Path, mock: MockServerProcess) -> None:
    page.goto("/connections")
    page.get_by_role("button", name="Add Connection").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Connection ID").fill(CONN_ID)
    conn_type = dialog.get_by_role("combobox")  # a searchable dropdown (react-select)
    conn_type.click()
    conn_type.fill("LLM Query")
    page.get_by_role("option", name=CONN_TYPE_NAME, exact=True).click()

    # standard fields, relabelled by ui-field-behaviour: host -> API base URL, password -> API key
    standard = open_accordion(dialog, "Standard Fields")
    standard.get_by_label("API base URL").fill(mock.base_url)
    key_box = standard.get_by_label("API key")
    key_box.fill(BROWSER_KEY)
    assert key_box.get_attribute("type") == "password", "the key is typed into a clear-text box"
    for hidden in ("Login", "Port", "Schema"):
        assert dialog.get_by_label(hidden, exact=True).count() == 0, f"{hidden} should be hidden"
    shot(page, artifacts, "01-connection-form-standard.png")

    # the llmq conn-fields, in the collapsed "Extra Fields" section
    extra = open_accordion(dialog, "Extra Fields")
    api_type = extra.locator("#element_api_type [role=combobox]")
    api_type.click()
    page.get_by_role("option", name="azure", exact=True).click()
    assert extra.locator("input[name=element_api_version]").input_value() == ""
    extra.locator("input[name=element_api_version]").fill(API_VERSION)
    extra.locator("input[name=element_deployment]").fill(DEPLOYMENT)
    assert mock.ca_path
    extra.locator("input[name=element_ca_cert]").fill(mock.ca_path)
    # the Entra ID fields: shown, left empty (the key authenticates), the client secret masked
    assert extra.locator("#element_auth_type [role=combobox]").count() == 1
    for name in ENTRA_FIELDS:
        assert extra.locator(f"input[name=element_{name}]").count() == 1, f"no {name} field"
    assert extra.locator("input[name=element_client_secret]").get_attribute("type") == "password"
    # tall enough for the whole dialog with its Extra Fields open (one section opens at a time)
    page.set_viewport_size({"width": 1400, "height": 1700})
    dialog.get_by_role("heading", name="Add Connection").scroll_into_view_if_needed()
    shot(page, artifacts, "02-connection-form-extra.png")
    page.set_viewport_size({"width": 1400, "height": 1000})

    dialog.get_by_role("button", name="Save").click()
    dialog.wait_for(state="hidden")
    page.get_by_role("row").filter(has_text=CONN_ID).wait_for()


def check_stored_connection(airflow: AirflowStandalone, mock: MockServerProcess) -> None:
    """What the form sent, read back through the REST API (which masks the password too)."""
    stored = airflow.get(f"/api/v2/connections/{CONN_ID}")
    assert stored["conn_type"] == "llmq"
    assert stored["host"] == mock.base_url
    assert stored["port"] is None and stored["login"] is None
    assert stored["password"] != BROWSER_KEY and BROWSER_KEY not in json.dumps(stored)
    extra = json.loads(stored["extra"])
    assert extra["api_type"] == "azure"
    assert extra["deployment"] == DEPLOYMENT
    assert extra["ca_cert"] == mock.ca_path
    assert extra["api_version"] == API_VERSION


def reopen_connection(page: Page, artifacts: Path, mock: MockServerProcess) -> None:
    page.goto("/connections")
    page.get_by_role("row").filter(has_text=CONN_ID).get_by_role("button", name="Edit Connection").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("heading", name="Edit Connection").wait_for()
    assert dialog.get_by_label("Connection ID").input_value() == CONN_ID
    assert dialog.get_by_role("combobox").first.is_visible()
    assert CONN_TYPE_NAME in dialog.inner_text()

    standard = open_accordion(dialog, "Standard Fields")
    assert standard.get_by_label("API base URL").input_value() == mock.base_url
    key_box = standard.get_by_label("API key")
    shown = key_box.input_value()
    assert shown and shown != BROWSER_KEY and set(shown) == {"*"}, f"the key comes back as {shown!r}"
    assert key_box.get_attribute("type") == "password"
    shot(page, artifacts, "03-connection-reopened-standard.png")

    extra = open_accordion(dialog, "Extra Fields")
    assert extra.locator("input[name=element_api_type]").input_value() == "azure"
    assert extra.locator("#element_api_type").inner_text().strip() == "azure"
    assert extra.locator("input[name=element_deployment]").input_value() == DEPLOYMENT
    assert extra.locator("input[name=element_ca_cert]").input_value() == mock.ca_path
    assert extra.locator("input[name=element_api_version]").input_value() == API_VERSION
    assert BROWSER_KEY not in page.content(), "the key is somewhere in the page"
    shot(page, artifacts, "03-connection-reopened-extra.png")
    # saved as reopened, "***" in the key box: the stored key must stay (the run below needs it)
    dialog.get_by_role("button", name="Save").click()
    dialog.wait_for(state="hidden")


def trigger_run(page: Page, run_id: str) -> None:
    """The Trigger button of the DAG page, with "unpause on trigger" (the DAG ships paused) and
    our run id (Advanced Options)."""
    page.goto(f"/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("heading", name=re.compile("Trigger Dag")).wait_for()
    unpause = dialog.get_by_label(f"Unpause {DAG_ID} on trigger")
    if unpause.count() and not unpause.is_checked():
        dialog.get_by_text(f"Unpause {DAG_ID} on trigger").click()
    dialog.get_by_role("button", name="Advanced Options").click()
    dialog.get_by_label("Run ID").fill(run_id)
    dialog.get_by_role("button", name="Trigger", exact=True).click()
    dialog.wait_for(state="hidden")


def wait_for_run(airflow: AirflowStandalone, run_id: str) -> dict[str, Any]:
    run_path = f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
    seen: dict[str, str] = {}

    def finished() -> dict[str, Any] | None:
        airflow.check_alive()
        run = airflow.get(run_path)
        for ti in airflow.get(run_path + "/taskInstances")["task_instances"]:
            state = f"{ti['state']} (try {ti['try_number']})"
            if seen.get(ti["task_id"]) != state:
                seen[ti["task_id"]] = state
                print(f"  {ti['task_id']}: {state}", flush=True)
        return run if run["state"] in ("success", "failed") else None

    return wait_for(f"run {run_id} to finish", finished, timeout=RUN_TIMEOUT, interval=3)


def task_log_lines(page: Page) -> list[str]:
    return [line.strip() for line in page.locator("main, body").first.inner_text().splitlines()]


def progress_lines(lines: list[str]) -> list[tuple[str, int, int]]:
    found = []
    for line in lines:
        lowered = line.lower()
        if "llmq" in lowered and "summary" not in lowered and any(w in lowered for w in PROGRESS_WORDS):
            match = PROGRESS_COUNT.search(line)
            if match:
                found.append((line, int(match.group(1)), int(match.group(2))))
    return found


def test_connection_form_pipeline_run_log_and_xcom(
    page: Page,
    airflow_ui: AirflowStandalone,
    mock_llm: MockServerProcess,
    artifacts: Path,
    run_stats: RunStats,
) -> None:
    # 1. the connection, through the form
    fill_connection_form(page, artifacts, mock_llm)
    check_stored_connection(airflow_ui, mock_llm)
    reopen_connection(page, artifacts, mock_llm)
    check_stored_connection(airflow_ui, mock_llm)
    run_stats.mark("connection saved and reopened")

    # 2. a run from the UI, against the mock server
    run_id = f"browser_test_{int(time.time())}"
    trigger_run(page, run_id)
    run_stats.mark("run triggered")
    run = wait_for_run(airflow_ui, run_id)
    run_stats.mark("run finished")
    assert run["state"] == "success", f"run {run_id} ended {run['state']}; see the task logs in the UI"

    run_url = f"/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}"
    page.goto(run_url)
    tasks = page.get_by_role("row").filter(has=page.get_by_role("link", name="query_llm"))
    tasks.get_by_text("Success").wait_for()
    shot(page, artifacts, "04-run-grid.png")
    page.get_by_role("button", name=re.compile("Show Graph")).click()
    nodes = page.locator(".react-flow__node")
    wait_for("the graph's 4 task nodes", lambda: nodes.count() >= 4, timeout=30, interval=0.5)
    shot(page, artifacts, "05-run-graph.png")
    # the UI remembers the view: back to the grid, where a task's tabs get the page's full width
    page.get_by_role("button", name=re.compile("Show Grid")).click()
    page.get_by_role("row").filter(has=page.get_by_role("link", name="query_llm")).wait_for()

    # what the run wrote, under the test's LLMQ_DATA_DIR
    data_dir = Path(airflow_ui.extra_env["LLMQ_DATA_DIR"])
    reports = list((data_dir / DAG_ID).glob(f"*/{run_id}/report.json"))
    assert len(reports) == 1, f"no report.json of {run_id} under {data_dir}"
    report = json.loads(reports[0].read_text())
    assert report["final"]["rows"] == SAMPLE_ROWS
    assert report["final"]["by_status"] == {"ok": SAMPLE_ROWS}, report["final"]

    # the summary, from the REST API: what the XCom tab has to show
    xcom_path = f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
    summary = airflow_ui.get(xcom_path + "/taskInstances/query_llm/xcomEntries/return_value")["value"]
    if isinstance(summary, str):
        summary = json.loads(summary)
    assert summary["rows"] == SAMPLE_ROWS and summary["ok"] == SAMPLE_ROWS and summary["errors"] == 0
    stats = mock_llm.stats()
    assert summary["requests_sent"] == stats["chat_requests"], (summary, stats)

    # 3a. the query task's log: llmq's progress lines
    page.goto(run_url + "/tasks/query_llm")
    page.get_by_role("link", name="Logs").first.wait_for()

    def progress_shown() -> list[tuple[str, int, int]]:
        return progress_lines(task_log_lines(page))

    found = wait_for("llmq progress lines in the task log", progress_shown, timeout=60, interval=1)
    log_text = page.content()
    assert BROWSER_KEY not in log_text, "the key is in the task log page"
    last_line, done, total = found[-1]
    assert total == summary["requests_answered"] and done == total, (last_line, found, summary)
    assert all(0 < d <= t == total for _, d, t in found), found
    print(f"\nprogress lines in the UI log ({len(found)}):\n  " + "\n  ".join(line for line, _, _ in found))
    shot(page, artifacts, "06-task-log.png")

    # 3b. the XCom tab: the summary
    page.goto(run_url + "/tasks/query_llm/xcom")
    row = page.get_by_role("row").filter(has_text="return_value")
    row.wait_for()
    page.get_by_role("button", name="Expand all extra JSON").click()
    value = row.get_by_test_id("xcom-value").locator(".view-lines")

    def summary_shown() -> str | None:
        # Monaco renders spaces as no-break spaces and wraps long lines: one space per gap
        text = " ".join(value.inner_text().replace("\xa0", " ").split())
        return text if f'"rows": {SAMPLE_ROWS},' in text else None

    shown = wait_for("the summary in the XCom tab", summary_shown, timeout=30, interval=0.5)
    for key in SUMMARY_KEYS:
        match = re.search(rf'"{key}": (\d+)', shown)
        assert match, f"{key} missing from the XCom tab: {shown}"
        assert int(match.group(1)) == summary[key], (key, match.group(1), summary[key])
    assert BROWSER_KEY not in page.content()
    shot(page, artifacts, "07-xcom.png")
    run_stats.mark("checks done")

    if _update_docs():
        docs = REPO / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        for source, target in DOCS_SCREENSHOTS.items():
            shutil.copyfile(artifacts / source, docs / target)
    print(f"screenshots: {artifacts}")


def _update_docs() -> bool:
    return os.environ.get("LLMQ_BROWSER_UPDATE_DOCS", "") not in ("", "0")
