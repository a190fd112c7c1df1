"""The web console (gateway/console.py, gateway/console/): its JSON endpoints
over real HTTP (with and without auth, and switched off), and the page itself in
a real headless browser: Debian's chromium driven by Playwright's Python API
(installed with apt-get when missing; never `playwright install`)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from playwright.sync_api import expect, sync_playwright

from e2e.apt import debian_binary
from gateway.openapi import OPENAPI_PATH
from tests.conftest import GatewayProcess, start_gateway

SECRET = "console-test-secret-" + "s" * 32
JSON = {"content-type": "application/json"}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing."""
    found = debian_binary("chromium", "chromium", ("/usr/bin/chromium",))
    if not found:
        raise RuntimeError("chromium could not be installed")
    return found


def token(ds: dict[str, list[str]]) -> str:
    now = time.time()
    return jwt.encode({"sub": "console-tester", "iat": int(now), "exp": now + 3600, "ds": ds}, SECRET)


def bearer(tok: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tok}"}


ALL = token({"read": ["**"], "append": ["**"], "manage": ["**"]})


@pytest.fixture(scope="module")
def auth_gateway(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(redis_server.url, tmp_path_factory.mktemp("gw-console"), DSGW_AUTH_JWT_SECRET=SECRET)
    yield gw
    gw.stop()


def api(gw: GatewayProcess, name: str = "") -> str:
    return f"{gw.url}/console/api/streams" + (f"/{name}" if name else "")


# --- the JSON endpoints ------------------------------------------------------------------


def test_listing_and_details_show_size_producers_and_sink_lag(
    gateway: GatewayProcess, http: httpx.Client, unique: str
) -> None:
    name = f"console/{unique}"
    assert http.put(gateway.stream_url(name), headers=JSON).status_code == 201
    producer = {"producer-id": "p1", "producer-epoch": "0", "producer-seq": "0", **JSON}
    assert (
        http.post(gateway.stream_url(name), headers=producer, content=b'[{"a":1},{"b":2}]').status_code == 200
    )

    listing = http.get(api(gateway))
    assert listing.status_code == 200
    body = listing.json()
    assert body["auth"] is False
    row = next(r for r in body["streams"] if r["name"] == name)
    assert row["content_type"] == "application/json"
    assert row["messages"] == 2
    assert row["bytes"] > 0
    assert row["producers"] == 1
    assert row["closed"] is False
    # Synced to Postgres (DSGW_SINK_STREAMS defaults to all); no sink runs here,
    # so the shard's backlog holds at least this append.
    assert row["synced_to_postgres"] is True
    assert row["sink"]["backlog"] >= 1

    info = http.get(api(gateway, name))
    assert info.status_code == 200
    detail = info.json()
    assert [(p["id"], p["epoch"], p["seq"]) for p in detail["producers"]] == [("p1", 0, 0)]
    assert re.fullmatch(r"[0-9]{16}_[0-9]{16}", detail["tail_offset"])
    assert detail["sink"]["backlog"] >= 1


def test_missing_stream_and_bad_limit_are_problems(gateway: GatewayProcess, http: httpx.Client) -> None:
    missing = http.get(api(gateway, f"no/such-{uuid.uuid4().hex}"))
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    for bad in ("0", "x", "10001", "-1"):
        response = http.get(api(gateway), params={"limit": bad})
        assert response.status_code == 400, bad
        assert response.json()["title"] == "Invalid limit"


def test_page_and_assets_are_served(gateway: GatewayProcess, http: httpx.Client) -> None:
    page = http.get(gateway.url + "/console")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:src|href)="(/console/[^"]+)"', page.text):
        response = http.get(gateway.url + asset)
        assert response.status_code == 200, asset
        assert response.content


def test_console_can_be_switched_off(
    redis_server, tmp_path_factory: pytest.TempPathFactory, http: httpx.Client
) -> None:
    gw = start_gateway(redis_server.url, tmp_path_factory.mktemp("gw-no-console"), DSGW_CONSOLE="false")
    try:
        for path in ("/console", "/console/console.js", "/console/api/streams"):
            assert http.get(gw.url + path).status_code == 404, path
        assert not any(p.startswith("/console") for p in http.get(gw.url + OPENAPI_PATH).json()["paths"])
    finally:
        gw.stop()


def test_json_endpoints_need_a_token_and_show_only_readable_streams(
    auth_gateway: GatewayProcess, http: httpx.Client, unique: str
) -> None:
    mine, other = f"mine/{unique}", f"other/{unique}"
    for name in (mine, other):
        assert http.put(auth_gateway.stream_url(name), headers={**JSON, **bearer(ALL)}).status_code == 201

    refused = http.get(api(auth_gateway))
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert http.get(api(auth_gateway), headers=bearer("not-a-token")).status_code == 401

    reader = bearer(token({"read": ["mine/*"]}))
    listing = http.get(api(auth_gateway), headers=reader)
    assert listing.status_code == 200
    names = {r["name"] for r in listing.json()["streams"]}
    assert mine in names and other not in names
    assert listing.json()["auth"] is True
    assert http.get(api(auth_gateway, mine), headers=reader).status_code == 200
    assert http.get(api(auth_gateway, other), headers=reader).status_code == 403
    # The page is a shell with no data: a browser cannot send a token when it navigates.
    assert http.get(auth_gateway.url + "/console").status_code == 200


# --- the page in a real browser ------------------------------------------------------------


def sse_readers(gw: GatewayProcess, http: httpx.Client) -> float:
    text = http.get(gw.url + "/metrics").text
    match = re.search(r'^dsgw_live_readers\{mode="sse"\} ([0-9.e+]+)$', text, re.M)
    assert match, "no dsgw_live_readers{mode=sse} in /metrics"
    return float(match[1])


def wait_for(predicate: Any, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_console_in_a_real_browser(
    auth_gateway: GatewayProcess, http: httpx.Client, unique: str, tmp_path: Path
) -> None:
    chromium = ensure_chromium()
    gw = auth_gateway
    auth = bearer(ALL)
    name = f"console-test/{unique}"
    created = f"console-test/ui-{unique}"
    assert http.put(gw.stream_url(name), headers={**JSON, **auth}).status_code == 201

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(gw.url + "/console")

            # Auth is on: the page says a token is needed, then lists streams with one.
            expect(page.locator("#status")).to_contain_text("401")
            page.fill("#token", ALL)
            page.click("#token-form button[type=submit]")
            expect(page.locator("#token-state")).to_have_text("token set for this tab")
            row = page.locator("#streams tbody tr", has_text=name)
            expect(row).to_have_count(1)

            # Live tail: a message appended over HTTP shows up.
            row.click()
            expect(page.locator("#stream-name")).to_have_text(name)
            page.click("#tail-start")
            expect(page.locator("#tail-state")).to_have_text("live")
            first = http.post(gw.stream_url(name), headers={**JSON, **auth}, content=b'{"n":1}')
            assert first.status_code == 204
            log = page.locator("#tail-log .msg")
            expect(log).to_have_text(['{"n":1}'])
            assert sse_readers(gw, http) == 1  # this page's tail, the only reader of this gateway

            # Pause: the connection goes away and the resume offset is the last one seen.
            page.click("#tail-pause")
            offset = first.headers["stream-next-offset"]
            expect(page.locator("#tail-state")).to_have_text(f"paused at {offset}")
            expect(page.locator("#tail-offset")).to_have_value(offset)
            assert wait_for(lambda: sse_readers(gw, http) == 0), "the paused tail kept its SSE connection"
            second = http.post(gw.stream_url(name), headers={**JSON, **auth}, content=b'{"n":2}')
            assert second.status_code == 204
            expect(log).to_have_text(['{"n":1}'])  # paused: nothing new on the page

            # Resume from that offset: the message appended meanwhile, once.
            expect(page.locator("#tail-start")).to_have_text("Resume")
            page.click("#tail-start")
            expect(log).to_have_text(['{"n":1}', '{"n":2}'])
            expect(page.locator("#tail-log .offset").last).to_have_text(second.headers["stream-next-offset"])
            page.click("#refresh")
            expect(page.locator("#stream-info")).to_contain_text(second.headers["stream-next-offset"])
            # For a person to look at (the path is printed with -s).
            page.screenshot(path=str(tmp_path / "console.png"), full_page=True)
            print(f"screenshot: {tmp_path / 'console.png'}")

            # Create, append and delete from the page.
            page.fill("#create-name", created)
            page.fill("#create-type", "application/json")
            page.click("#create")
            expect(page.locator("#status")).to_have_text(f"created {created}")
            assert http.head(gw.stream_url(created), headers=auth).status_code == 200
            expect(page.locator("#streams tbody tr", has_text=created)).to_have_count(1)
            expect(page.locator("#stream-name")).to_have_text(created)
            page.fill("#append-body", '{"from":"the console"}')
            page.click("#append")
            expect(page.locator("#status")).to_contain_text(f"appended to {created}")
            read = http.get(gw.stream_url(created), params={"offset": "-1"}, headers=auth)
            assert read.json() == [{"from": "the console"}]

            page.locator("#streams tbody tr", has_text=created).click()
            expect(page.locator("#stream-name")).to_have_text(created)
            page.click("#delete")
            expect(page.locator("#status")).to_have_text(f"deleted {created}")
            assert http.head(gw.stream_url(created), headers=auth).status_code == 404
            expect(page.locator("#streams tbody tr", has_text=created)).to_have_count(0)
            assert not errors, errors
        finally:
            browser.close()
