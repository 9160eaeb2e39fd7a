"""The dashboard (GET /dashboard) in a real, headless Chromium driven by Selenium: a server with
two models (one segmented) fed known events, the page's numbers against the JSON API's, live
updates without reload, no console errors, no request leaving the origin, a path prefix, a phone
width, and a screenshot (tests/artifacts/; docs/dashboard.png with UPDATE_SCREENSHOT=1).

Debian's chromium and chromedriver (scripts/test.sh installs them); SE_OFFLINE keeps Selenium
Manager from downloading a browser or a driver of its own.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from adserver.catalogue import reasons
from tests.prometheus import require
from tests.support.events import ce_headers, feedback
from tests.support.http import Samples, scrape
from tests.support.processes import ROOT, ServerFactory, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "apt-get install chromium chromium-driver"
ARTIFACTS = ROOT / "tests" / "artifacts"
README_SCREENSHOT = ROOT / "docs" / "dashboard.png"
PNG = b"\x89PNG\r\n\x1a\n"
DESKTOP = (1280, 800)
PHONE = (390, 844)
INTERVAL = 1  # seconds between the page's polls (?interval=)
PREFIX = "/metrics-server"  # what an ingress strips before the server sees the path
REGRESSOR = "RegressionMetrics"

CONFIG = """\
models:
  - name: iris
    storage_uri: MultiClassNumeric
    match: {inferenceservicename: iris}
    segment_by: [endpoint]
  - name: wine
    storage_uri: MultiClassNumeric
    match: {inferenceservicename: wine}
"""
#: (model, segment, hours before now, truth, prediction): spread over the last hours.
EVENTS = [
    ("iris", "canary", 0.2, [0, 1, 2, 2], [0, 1, 2, 1]),
    ("iris", "canary", 1.5, [1, 1, 0], [1, 0, 0]),
    ("iris", "stable", 2.5, [2, 0, 0, 1, 1], [2, 0, 1, 1, 1]),
    ("iris", "stable", 4.2, [0, 2], [0, 2]),
    ("wine", "", 0.7, [3, 4, 4], [3, 4, 3]),
    ("wine", "", 3.1, [5, 3], [5, 5]),
]


def require_browser() -> None:
    """Skip (developer machine) or fail (CI) unless Debian's chromium and its driver are here."""
    for program in (CHROMIUM, CHROMEDRIVER):
        require(str(program), str(program) if program.exists() else None, INSTALL)


def prediction_time(hours_ago: float) -> str:
    when = datetime.fromtimestamp(time.time() - hours_ago * 3600, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def send(
    url: str, model: str, segment: str, hours_ago: float, truth: list[int], pred: list[int]
) -> dict[str, str]:
    """One direct feedback event for ``model`` (its segment from ``ce-endpoint``)."""
    extensions = {"endpoint": segment} if segment else {}
    headers = ce_headers(time=prediction_time(hours_ago), **extensions)
    body = json.dumps(feedback([[t] for t in truth], [[p] for p in pred]))
    answer = requests.post(f"{url}/v1/models/{model}", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    return headers


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> str:
    require_browser()
    config = tmp_path_factory.mktemp("dashboard") / "models.yaml"
    config.write_text(CONFIG)
    url = module_servers("--models_config", str(config), "--state", "memory").url
    sent = [send(url, *event) for event in EVENTS]
    # a duplicate (the first event again) and a refusal, for the events' counts
    model, _, _, truth, pred = EVENTS[0]
    again = json.dumps(feedback([[t] for t in truth], [[p] for p in pred]))
    assert requests.post(f"{url}/v1/models/{model}", data=again, headers=sent[0], timeout=10).ok
    refused = requests.post(f"{url}/", data=b"{not json", headers=ce_headers(), timeout=10)
    assert refused.json()["reason"] == reasons.INVALID_JSON
    return url


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    require_browser()
    patch = pytest.MonkeyPatch()
    patch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI's container
        "--disable-dev-shm-usage",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        # Chromium's own traffic (updates, sync, safe browsing): none of the page's business.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield browser
    finally:
        browser.quit()
        patch.undo()


class Page:
    """The dashboard loaded in ``driver``: its status, its choices, its viewport."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    def wait(self, what: Callable[[], Any], timeout: float = 10.0, message: str = "") -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            lambda _: what(), message
        )

    def status(self) -> tuple[str | None, int]:
        """``#status``'s ``data-state`` and ``data-updated`` (0 before the first refresh)."""
        state, updated = self.driver.execute_script(
            "const s = document.querySelector('#status');"
            "return [s?.dataset.state ?? null, Number(s?.dataset.updated || 0)];"
        )
        return state, int(updated)

    def live(self, timeout: float = 15.0) -> int:
        """Wait for a successful refresh; its epoch ms (``#status[data-updated]``)."""
        return self.refreshed_after(0, timeout)

    def refreshed_after(self, updated: int, timeout: float = 15.0) -> int:
        """Wait for a refresh later than ``updated`` that left the page live; its epoch ms."""

        def later() -> int | None:
            state, stamp = self.status()
            return stamp if state == "live" and stamp > updated else None

        return int(self.wait(later, timeout, f"no live refresh after {updated}"))

    def choose(self, select: str, value: str) -> None:
        """Pick an option and wait for the page to redraw with it."""
        updated = self.live()
        Select(self.driver.find_element(By.CSS_SELECTOR, select)).select_by_value(value)
        self.refreshed_after(updated)

    def set_viewport(self, width: int, height: int) -> None:
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )


def open_dashboard(driver: WebDriver, url: str, query: str = f"?interval={INTERVAL}") -> Page:
    """Load the page on a clean slate (the logs drained) and wait until it is live."""
    driver.get_log("browser")
    driver.get_log("performance")
    page = Page(driver)
    page.set_viewport(*DESKTOP)
    driver.get(url + query)
    page.live()
    return page


def summary(url: str) -> dict[str, Any]:
    answer = requests.get(url + "/v1/metrics", params={"format": "json"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["models"])


def document(url: str, model: str, segment: str = "") -> dict[str, Any]:
    """The all-time summary the page must show for ``model`` (and ``segment``)."""
    doc = summary(url)[model]
    return dict(doc["segments"][segment]) if segment else dict(doc)


def four(number: float) -> str:
    return f"{number:.4f}"


#: What the page shows, read in one script (the page redraws between two WebDriver calls).
SNAPSHOT = """
const text = (css) => (document.querySelector(css) || {}).textContent?.trim() ?? null;
const cells = (row) => [...row.querySelectorAll("td")].map((c) => c.textContent.trim());
return {
  accuracy: text("#accuracy"),
  rows: text("#rows"),
  accepted: text("#events-accepted"),
  duplicate: text("#events-duplicate"),
  labelDelay: text("#label-delay"),
  replyHealth: text("#reply-health"),
  points: document.querySelector("#accuracy-chart")?.getAttribute("data-points") ?? null,
  steps: [...document.querySelectorAll("table#accuracy-table tbody tr")].map(cells),
  perClass: [...document.querySelectorAll("table#per-class tbody tr[data-class]")].map((r) => [
    r.dataset.class,
    ...["precision", "recall", "f1", "support"].map(
      (c) => r.querySelector("td." + c)?.textContent.trim()),
  ]),
  confusion: [...document.querySelectorAll("table#confusion tbody tr")].map((r) =>
    [...r.querySelectorAll("td[data-truth][data-prediction]")].map((c) =>
      [c.dataset.truth, c.dataset.prediction, c.textContent.trim()])),
  rejected: Object.fromEntries([...document.querySelectorAll("table#rejected tr[data-reason]")]
    .map((r) => [r.dataset.reason, r.querySelector("td:last-child")?.textContent.trim()])),
  segments: [...document.querySelectorAll("select#segment option")].map((o) => o.value),
};
"""


def shown(page: Page) -> dict[str, Any]:
    return dict(page.driver.execute_script(SNAPSHOT))


def eventually(check: Callable[[], None], timeout: float = 10.0) -> None:
    """``check`` passes before ``timeout``: a poll begun before a choice may still be drawn."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def assert_shows(page: Page, doc: Mapping[str, Any]) -> None:
    """The all-time numbers, the per-class table and the confusion matrix equal ``doc``'s."""
    seen = shown(page)
    assert (seen["accuracy"], seen["rows"]) == (four(doc["accuracy"]), str(doc["rows"]))
    classes = [str(c) for c in doc["classes"]]
    assert seen["perClass"] == [
        [name, *(four(doc["per_class"][name][c]) for c in ("precision", "recall", "f1")),
         str(doc["per_class"][name]["support"])]
        for name in classes
    ]  # fmt: skip
    # truth rows, prediction columns, in the model's class order; every count written
    assert seen["confusion"] == [
        [[truth, prediction, str(count)] for prediction, count in zip(classes, row, strict=True)]
        for truth, row in zip(classes, doc["confusion_matrix"], strict=True)
    ]


def requested(driver: WebDriver) -> list[str]:
    """Every URL the page asked for since the log was last read (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def prometheus(samples: Samples, name: str, **labels: str) -> int:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return int(
        sum(
            value
            for (sample, sample_labels), value in samples.items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        )
    )


def assert_no_console_errors(driver: WebDriver) -> None:
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def test_the_numbers_shown_are_the_json_apis(driver: WebDriver, server: str) -> None:
    page = open_dashboard(driver, server + "/dashboard")
    page.choose("select#model", "iris")
    page.choose("select#segment", "")
    eventually(lambda: assert_shows(page, document(server, "iris")))
    samples = scrape(server)
    seen = shown(page)
    # the events' counts of the model chosen; refusals by reason, of the whole server
    accepted = prometheus(samples, "feedback_events_accepted_total", model="iris")
    duplicate = prometheus(samples, "feedback_events_duplicate_total", model="iris")
    assert (seen["accepted"], seen["duplicate"]) == (str(accepted), str(duplicate)) == ("4", "1")
    assert seen["labelDelay"] and seen["replyHealth"]
    assert_no_console_errors(driver)


def test_refusals_are_shown_by_reason(driver: WebDriver, server: str) -> None:
    """Under the model that counted the refusal (one that names none: the default model)."""
    samples = scrape(server)
    counted = {
        (dict(labels)["model"], dict(labels)["reason"]): int(count)
        for (name, labels), count in samples.items()
        if name == "feedback_events_rejected_total" and count
    }
    [(model, reason)] = counted
    assert reason == reasons.INVALID_JSON
    page = open_dashboard(driver, server + "/dashboard")
    page.choose("select#model", model)

    def shows_the_refusal() -> None:
        rejected = shown(page)["rejected"]
        assert rejected.get(reason) == str(counted[model, reason])

    eventually(shows_the_refusal)
    assert_no_console_errors(driver)


def test_choosing_the_model_and_the_segment_updates_the_tables(
    driver: WebDriver, server: str
) -> None:
    page = open_dashboard(driver, server + "/dashboard")
    page.choose("select#model", "wine")
    eventually(lambda: assert_shows(page, document(server, "wine")))
    assert shown(page)["segments"] == [""]
    page.choose("select#model", "iris")
    assert shown(page)["segments"] == ["", "canary", "stable"]
    for segment in ("canary", "stable"):
        page.choose("select#segment", segment)
        eventually(lambda segment=segment: assert_shows(page, document(server, "iris", segment)))
    assert_no_console_errors(driver)


#: A custom range: the last ``arguments[0]`` hours to the next whole minute, typed into the
#: datetime-local inputs (local time, minutes) as a person would, then "change".
CUSTOM = """
const local = (ms) => new Date(ms - new Date(ms).getTimezoneOffset() * 60000)
  .toISOString().slice(0, 16);
const to = Math.ceil(Date.now() / 60000) * 60000;
for (const [id, ms] of [["from", to - arguments[0] * 3600000], ["to", to]]) {
  const input = document.querySelector("input#" + id);
  input.value = local(ms);
  input.dispatchEvent(new Event("change", {bubbles: true}));
}
"""


@pytest.mark.parametrize(
    ("chosen", "steps", "seconds", "hours"),
    [("1h", 60, 60, 1), ("24h", 24, 3600, 24), ("7d", 168, 3600, 168), ("custom", 360, 60, 6)],
)
def test_the_chart_draws_every_step_of_the_range(
    driver: WebDriver, server: str, chosen: str, steps: int, seconds: int, hours: int
) -> None:
    page = open_dashboard(driver, server + "/dashboard")
    page.choose("select#model", "iris")
    page.choose("select#segment", "")
    asked: list[str] = []
    requested(driver)
    page.choose("select#range", chosen)
    if chosen == "custom":
        driver.execute_script(CUSTOM, hours)
        page.refreshed_after(page.live())

    def draws_the_last_answer() -> None:
        asked.extend(u for u in requested(driver) if "/v1/models/iris/metrics?" in u)
        assert asked
        answer = requests.get(server + "/v1/models/iris/metrics?" + urlsplit(asked[-1]).query)
        assert answer.status_code == 200, answer.text
        expected = answer.json()
        assert (expected["step"], len(expected["steps"])) == (seconds, steps)
        seen = shown(page)
        assert seen["points"] == str(steps) and len(seen["steps"]) == steps
        for cells, step in zip(seen["steps"], expected["steps"], strict=True):
            assert int(cells[3]) == step["rows"]
            if step["rows"]:
                assert abs(float(cells[1]) - step["accuracy"]) < 5e-5
                assert abs(float(cells[2]) - step["label_coverage"]) < 5e-5
        in_range = sum(len(e[3]) for e in EVENTS if e[0] == "iris" and e[2] < hours)
        assert sum(int(cells[3]) for cells in seen["steps"]) == in_range

    eventually(draws_the_last_answer)
    assert_no_console_errors(driver)


def test_a_new_event_appears_without_reload(driver: WebDriver, server: str) -> None:
    page = open_dashboard(driver, server + "/dashboard")
    page.choose("select#model", "wine")
    eventually(lambda: assert_shows(page, document(server, "wine")))
    before = int(shown(page)["rows"])
    driver.execute_script("window.notReloaded = true")
    send(server, "wine", "", 0.1, [3, 4], [3, 4])
    page.wait(lambda: shown(page)["rows"] == str(before + 2), 2 * INTERVAL + 1, "no new rows")
    assert driver.execute_script("return window.notReloaded") is True
    eventually(lambda: assert_shows(page, document(server, "wine")))
    assert_no_console_errors(driver)


#: Tells the page its tab is hidden (or shown again), as the browser does on a tab switch.
VISIBILITY = """
Object.defineProperty(document, "hidden", {value: arguments[0], configurable: true});
Object.defineProperty(document, "visibilityState",
  {value: arguments[0] ? "hidden" : "visible", configurable: true});
document.dispatchEvent(new Event("visibilitychange"));
"""


def test_a_hidden_tab_pauses_and_a_shown_one_resumes(driver: WebDriver, server: str) -> None:
    page = open_dashboard(driver, server + "/dashboard")
    driver.execute_script(VISIBILITY, True)
    page.wait(lambda: page.status()[0] == "paused", 2 * INTERVAL + 1, "not paused")
    paused = page.status()[1]
    time.sleep(3 * INTERVAL)
    assert page.status() == ("paused", paused)  # no poll while hidden
    driver.execute_script(VISIBILITY, False)
    page.refreshed_after(paused, 2 * INTERVAL + 1)
    assert_no_console_errors(driver)


def test_no_request_leaves_the_origin(driver: WebDriver, server: str) -> None:
    page = open_dashboard(driver, server + "/dashboard")
    page.choose("select#model", "iris")
    page.choose("select#range", "24h")
    urls = requested(driver)
    assert any("/v1/metrics" in u for u in urls) and any("/dashboard" in u for u in urls)
    assert [u for u in urls if not u.startswith((server + "/", "data:"))] == []
    assert_no_console_errors(driver)  # a request the CSP refused is a console error


class PrefixProxy(BaseHTTPRequestHandler):
    """An ingress in miniature: ``PREFIX/...`` goes to the server as ``/...``, the rest is 404."""

    upstream = ""

    def do_GET(self) -> None:
        if not self.path.startswith(PREFIX + "/"):
            self.send_error(404)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        answer = requests.get(
            self.upstream + self.path[len(PREFIX) :],
            headers=headers,
            allow_redirects=False,
            timeout=10,
        )
        self.send_response(answer.status_code)
        for name in ("Content-Type", "Cache-Control", "Location"):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the browser's log, not the proxy's."""


@pytest.fixture
def proxy(server: str) -> Iterator[str]:
    handler = type("Proxy", (PrefixProxy,), {"upstream": server})
    running = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{running.server_port}"
    finally:
        running.shutdown()
        running.server_close()
        thread.join(5)


def test_behind_a_path_prefix_from_the_redirect_of_slash(driver: WebDriver, proxy: str) -> None:
    """A browser's GET PREFIX/ lands on PREFIX/dashboard, and every URL the page uses stays
    under the prefix (relative): the proxy answers 404 to anything else."""
    page = open_dashboard(driver, proxy + PREFIX + "/", query="")
    assert urlsplit(driver.current_url).path == PREFIX + "/dashboard"
    page.choose("select#model", "iris")
    urls = requested(driver)
    assert urls and [u for u in urls if not u.startswith((proxy + PREFIX + "/", "data:"))] == []
    assert_no_console_errors(driver)


def test_a_phone_width_has_no_horizontal_scroll(driver: WebDriver, server: str) -> None:
    page = open_dashboard(driver, server + "/dashboard")
    page.set_viewport(*PHONE)
    page.refreshed_after(page.live())
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert driver.execute_script("return window.innerWidth") == PHONE[0]
    assert width <= PHONE[0]
    save_screenshot(driver, "dashboard-390x844.png")


def save_screenshot(driver: WebDriver, name: str) -> bytes:
    """The viewport as PNG, kept in tests/artifacts/ (gitignored) and checked to be a picture."""
    picture = driver.get_screenshot_as_png()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_bytes(picture)
    assert picture.startswith(PNG) and len(picture) > 10_000
    return picture


def test_a_screenshot_is_saved(driver: WebDriver, server: str) -> None:
    page = open_dashboard(driver, server + "/dashboard")
    page.choose("select#model", "iris")
    page.choose("select#range", "24h")
    picture = save_screenshot(driver, "dashboard-1280x800.png")
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        README_SCREENSHOT.write_bytes(picture)


SECTIONS = """
return Object.fromEntries([...document.querySelectorAll("table#sections tbody tr[data-metric]")]
  .map((r) => [r.dataset.metric, r.querySelector("td").textContent.trim()]));
"""


def test_a_regressor_shows_its_metrics_and_no_classes(
    driver: WebDriver, servers: ServerFactory
) -> None:
    url = servers("--storage_uri", REGRESSOR, "--state", "memory").url
    answer = requests.post(
        f"{url}/", json=feedback([1.0, 2.0, 4.0], [1.5, 1.0, 4.0]), headers=ce_headers(), timeout=10
    )
    assert answer.status_code == 200, answer.text
    regression = summary(url)["model"]["regression"]
    page = open_dashboard(driver, url + "/dashboard")

    def shows_the_regression() -> None:
        seen = page.driver.execute_script(SECTIONS)
        assert seen["regression MAE"] == four(regression["mae"])
        assert seen["regression RMSE"] == four(regression["rmse"])

    eventually(shows_the_regression)
    seen = shown(page)
    assert seen["perClass"] == [] and seen["rows"] == "3" and seen["accuracy"] == "\u2014"
    assert "regressor" in page.driver.find_element(By.CSS_SELECTOR, "table#confusion").text
    assert_no_console_errors(driver)
