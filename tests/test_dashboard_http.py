"""GET /dashboard over HTTP, through real servers: the page and its fixed files, the redirect of
a browser's GET /, --dashboard false and --auth_reads (what the page shows: in a real browser)."""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse

import pytest
import requests

from adserver.catalogue import reasons
from adserver.http.static import DASHBOARD_DIR, FILES, INDEX
from adserver.settings import load_settings
from tests.support.processes import ServerFactory

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture(scope="module")
def url(module_servers: ServerFactory) -> str:
    return module_servers("--state", "memory").url


def path_of(name: str) -> str:
    return "/dashboard" if name == INDEX else f"/dashboard/{name}"


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_file_is_served_from_the_package_with_its_type(url: str, name: str) -> None:
    answer = requests.get(url + path_of(name), timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == FILES[name]
    assert answer.headers["Cache-Control"] == "no-cache"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert "connect-src 'self'" in answer.headers["Content-Security-Policy"]
    assert answer.content == (DASHBOARD_DIR / name).read_bytes()


def test_an_unchanged_file_is_revalidated_with_a_304(url: str) -> None:
    first = requests.get(url + "/dashboard/dashboard.js", timeout=5)
    again = requests.get(
        url + "/dashboard/dashboard.js", headers={"If-None-Match": first.headers["Etag"]}, timeout=5
    )
    assert again.status_code == 304
    assert again.content == b""


def test_the_page_asks_only_for_its_own_files_by_relative_urls() -> None:
    """Relative URLs keep the page working below a path prefix; every file it loads is served."""
    html = (DASHBOARD_DIR / INDEX).read_text()
    script = (DASHBOARD_DIR / "dashboard.js").read_text()
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    fetched = re.findall(r'get\(\s*[`"]([^`"]+)[`"]', script)
    assert {"dashboard/dashboard.js", "dashboard/uPlot.iife.min.js"} <= set(urls)
    assert {"v1/metrics", "v1/metrics?format=json"} <= set(fetched)
    for link in urls + fetched:
        assert not link.startswith(("/", "http:", "https:", "//")), link
    assert {link.split("/", 1)[1] for link in urls if link.startswith("dashboard/")} <= set(FILES)


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/nope.js",
        "/dashboard/..%2Fstatic.py",
        "/dashboard/%2E%2E",
        "/dashboard/../http/static.py",
        "/dashboard/dashboard/index.html",
        "/dashboard/",
        "/dashboard/index.html/",
    ],
)
def test_anything_else_under_dashboard_is_a_json_404(url: str, path: str) -> None:
    # http.client sends the path as it is (requests would resolve its dot segments first)
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=5)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        assert answer.status == 404, path
        assert answer.getheader("Content-Type", "").startswith("application/json")
        assert json.loads(answer.read())["reason"] == reasons.NOT_FOUND
    finally:
        connection.close()


def test_a_browsers_get_of_root_is_redirected_relatively(url: str) -> None:
    answer = requests.get(url + "/", headers=BROWSER, timeout=5, allow_redirects=False)
    assert answer.status_code == 302
    assert answer.headers["Location"] == "dashboard"  # relative: <prefix>/ -> <prefix>/dashboard
    followed = requests.get(url + "/", headers=BROWSER, timeout=5)
    assert followed.url == url + "/dashboard"
    assert followed.headers["Content-Type"] == FILES[INDEX]


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "text/plain"])
def test_any_other_get_of_root_stays_a_405(url: str, accept: str | None) -> None:
    headers = {} if accept is None else {"Accept": accept}
    answer = requests.get(url + "/", headers=headers, timeout=5, allow_redirects=False)
    assert answer.status_code == 405
    assert answer.json()["reason"] == reasons.METHOD_NOT_ALLOWED


@pytest.mark.parametrize(
    ("args", "env"), [(("--dashboard", "false"), None), ((), {"DASHBOARD": "false"})]
)
def test_dashboard_false_serves_no_page(servers: ServerFactory, args, env) -> None:
    server = servers("--state", "memory", *args, env=env)
    for name in FILES:
        answer = requests.get(server.url + path_of(name), timeout=5)
        assert answer.status_code == 404
        assert answer.headers["Content-Type"].startswith("application/json")
    root = requests.get(server.url + "/", headers=BROWSER, timeout=5, allow_redirects=False)
    assert root.status_code == 405


def test_auth_reads_protects_the_page_and_its_files(servers: ServerFactory, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("reader-token\n")
    server = servers(
        "--auth", "token", "--auth_token_file", str(tokens), "--auth_reads", "--state", "memory"
    )
    bearer = {"Authorization": "Bearer reader-token"}
    for name in FILES:
        answer = requests.get(server.url + path_of(name), timeout=5)
        assert answer.status_code == 401, name
        assert answer.json()["reason"] == reasons.MISSING_TOKEN
        wrong = requests.get(
            server.url + path_of(name), headers={"Authorization": "Bearer nope"}, timeout=5
        )
        assert wrong.status_code == 401
        assert b"<html" not in wrong.content
        assert requests.get(server.url + path_of(name), headers=bearer, timeout=5).ok
    # the redirect itself shows nothing: the page it leads to asks for the token
    root = requests.get(server.url + "/", headers=BROWSER, timeout=5, allow_redirects=False)
    assert root.status_code == 302


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, True),
        (["--dashboard", "false"], {}, False),
        (["--dashboard", "off"], {"DASHBOARD": "true"}, False),
        (["--dashboard"], {"DASHBOARD": "false"}, True),
        ([], {"DASHBOARD": "0"}, False),
    ],
)
def test_dashboard_is_a_flag_that_takes_a_value(argv, environ, expected) -> None:
    assert load_settings(argv, environ).dashboard is expected


def test_a_switch_off_by_default_still_takes_no_value() -> None:
    """``--reset_state MetricsServer``: the subcommand is no value of the switch before it."""
    settings = load_settings(["--reset_state", "--dashboard", "false", "MetricsServer"], {})
    assert (settings.reset_state, settings.dashboard) == (True, False)
