"""End to end: the chat page in headless Chromium talks to a Python WebSocket client through the server."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websocket
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.harness import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/wsapp-page.png")
HOSTILE_TEXT = "<img src=x onerror=alert(1)><b>bold</b>"
JWT_SECRET = "browser-test-secret-of-at-least-32-bytes"
WAIT_SECONDS = 10.0

pytestmark = pytest.mark.chromium

Frame = dict[str, Any]


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Debian's Chromium through Debian's chromedriver: explicit paths, so Selenium downloads nothing."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        message = f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with tempfile.TemporaryDirectory(prefix="wsapp-chromium-") as profile:
        options = Options()
        options.binary_location = str(CHROMIUM)
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1000,720",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=str(CHROMEDRIVER), log_output=subprocess.DEVNULL)
        driver = webdriver.Chrome(service=service, options=options)
        try:
            yield driver
        finally:
            driver.quit()


def recv_until(conn: websocket.WebSocket, wanted: Callable[[Frame], bool], timeout: float = WAIT_SECONDS) -> Frame:
    """Read JSON frames until one matches; fail with everything seen if none does in time."""
    deadline = time.monotonic() + timeout
    seen: list[Frame] = []
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            frame = json.loads(conn.recv())
        except websocket.WebSocketTimeoutException:
            break
        seen.append(frame)
        if wanted(frame):
            return frame
    raise AssertionError(f"no matching frame within {timeout} s; got {seen}")


def python_client(server: ServerProcess, name: str, room: str) -> tuple[websocket.WebSocket, Frame]:
    """A websocket-client connection that has joined `room`; returns it and the `joined` frame."""
    conn = websocket.create_connection(server.ws(f"/ws?name={name}"), timeout=WAIT_SECONDS)
    recv_until(conn, lambda f: f["type"] == "welcome")
    conn.send(json.dumps({"type": "join", "room": room}))
    return conn, recv_until(conn, lambda f: f["type"] == "joined" and f["room"] == room)


def wait_for(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], what: str) -> Any:
    return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.05).until(condition, f"timed out: {what}")


def page_texts(driver: webdriver.Chrome, selector: str) -> list[str]:
    """textContent of every match, read in one script so a re-render cannot leave stale elements."""
    script = "return [...document.querySelectorAll(arguments[0])].map((node) => node.textContent);"
    return driver.execute_script(script, selector)


def join_room(driver: webdriver.Chrome, name: str, room: str) -> None:
    """Fill in the join form of the loaded page and wait until the page is in the room."""
    submit_join(driver, room, name)
    wait_for(driver, lambda d: status_of(d) == "connected", "page joins its room")


def submit_join(driver: webdriver.Chrome, room: str, name: str | None = None) -> None:
    """Fill in the join form (the name too, unless a token names the page) and press Join."""
    for field, value in (("name", name), ("room", room)):
        if value is None:
            continue
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "join-btn").click()


def install_page_hooks(driver: webdriver.Chrome, timer_speedup: int = 1) -> None:
    """Before the page's own script runs: keep its sockets and sent frames reachable, let the test drop
    its pings, and run its setInterval timers `timer_speedup` times faster."""
    script = """
    window.__sockets = [];
    window.__sent = [];
    window.__dropPings = false;
    const realSetInterval = window.setInterval;
    window.setInterval = (fn, ms, ...args) => realSetInterval(fn, ms / SPEEDUP, ...args);
    window.WebSocket = class extends window.WebSocket {
      constructor(...args) { super(...args); window.__sockets.push(this); }
      send(data) {
        window.__sent.push(data);
        if (!(window.__dropPings && JSON.parse(data).type === "ping")) super.send(data);
      }
    };
    """.replace("SPEEDUP", str(timer_speedup))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})


def status_of(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.ID, "status").get_attribute("data-state") or ""


def test_page_chats_with_python_client(server: ServerProcess, browser: webdriver.Chrome) -> None:
    tag = uuid.uuid4().hex[:8]
    room, page_name, py_name = f"e2e-{tag}", f"page-{tag}", f"py-{tag}"

    browser.get(server.http("/"))
    assert browser.find_element(By.ID, "room").get_attribute("value") == "lobby"
    join_room(browser, page_name, room)

    conn, joined = python_client(server, py_name, room)
    try:
        assert page_name in joined["members"]

        wait_for(browser, lambda d: py_name in page_texts(d, "#members li"), "page lists the Python client")

        conn.send(json.dumps({"type": "publish", "room": room, "data": {"text": HOSTILE_TEXT}, "id": "p1"}))
        recv_until(conn, lambda f: f["type"] == "ack" and f["id"] == "p1")
        wait_for(browser, lambda d: HOSTILE_TEXT in page_texts(d, "#log .msg .text"), "page shows the message")
        # Shown as literal text: the markup in it made no elements and ran no script.
        assert browser.find_elements(By.CSS_SELECTOR, "#log img, #log b") == []
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - reading it is what raises when there is no alert
        assert py_name in page_texts(browser, "#log .msg .from")

        typed = f"hello from the page {tag} <i>é ✓</i>"
        text_box = browser.find_element(By.ID, "text")
        text_box.send_keys(typed)
        browser.find_element(By.ID, "send-btn").click()
        message = recv_until(conn, lambda f: f["type"] == "message" and f["from"] == page_name)
        assert message["room"] == room
        assert message["data"] == {"text": typed}
        wait_for(
            browser,
            lambda d: d.find_elements(By.CSS_SELECTOR, "#log .msg.own[data-state='delivered']"),
            "page marks its message delivered on ack",
        )
        # Own message shown once (rendered locally, not echoed back as well).
        assert page_texts(browser, "#log .msg .text").count(typed) == 1
        assert browser.find_element(By.ID, "text").get_attribute("value") == ""
        browser.save_screenshot(str(SCREENSHOT))
    finally:
        conn.close()

    wait_for(browser, lambda d: py_name not in page_texts(d, "#members li"), "page drops the client that left")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_page_replays_missed_messages_after_reconnect(server: ServerProcess, browser: webdriver.Chrome) -> None:
    tag = uuid.uuid4().hex[:8]
    room, page_name, py_name = f"e2e-{tag}", f"page-{tag}", f"py-{tag}"
    install_page_hooks(browser)
    browser.execute_cdp_cmd("Network.enable", {})

    conn, _ = python_client(server, py_name, room)
    try:
        browser.get(server.http("/"))
        join_room(browser, page_name, room)
        conn.send(json.dumps({"type": "publish", "room": room, "data": {"text": "before"}, "id": "b"}))
        wait_for(browser, lambda d: "before" in page_texts(d, "#log .msg .text"), "page shows the first message")

        # Offline, the page's reconnect attempts fail until the test lets them through.
        browser.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        browser.execute_script("window.__sockets.at(-1).close();")
        recv_until(conn, lambda f: f["type"] == "presence" and f["event"] == "leave" and f["who"] == page_name)
        missed = [f"missed {n}" for n in range(3)]
        for n, text in enumerate(missed):
            conn.send(json.dumps({"type": "publish", "room": room, "data": {"text": text}, "id": f"m{n}"}))
            recv_until(conn, lambda f, n=n: f["type"] == "ack" and f["id"] == f"m{n}")
        assert status_of(browser) != "connected"

        browser.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        recv_until(conn, lambda f: f["type"] == "presence" and f["event"] == "join" and f["who"] == page_name)
        wait_for(
            browser,
            lambda d: page_texts(d, "#log .msg .text") == ["before", *missed],
            "page replays the missed messages once each, in order",
        )
        assert status_of(browser) == "connected"
    finally:
        conn.close()


def test_page_rejoins_a_restarted_server(make_server: Callable[..., ServerProcess], browser: webdriver.Chrome) -> None:
    tag = uuid.uuid4().hex[:8]
    room, page_name, py_name = f"e2e-{tag}", f"page-{tag}", f"py-{tag}"
    first = make_server()
    browser.get(first.http("/"))
    join_room(browser, page_name, room)
    conn, _ = python_client(first, py_name, room)
    conn.send(json.dumps({"type": "publish", "room": room, "data": {"text": "one"}, "id": "1"}))
    wait_for(browser, lambda d: "one" in page_texts(d, "#log .msg .text"), "page shows the first message")
    conn.close()
    first.stop()
    wait_for(
        browser,
        lambda d: status_of(d) == "reconnecting",
        "page notices the server went away",
    )

    # Same port, empty memory: the room's seq starts again at 1, which the page had already seen.
    second = make_server(PORT=str(first.port))
    wait_for(
        browser,
        lambda d: status_of(d) == "connected",
        "page reconnects to the new server",
    )
    conn, joined = python_client(second, py_name, room)
    try:
        assert page_name in joined["members"]
        conn.send(json.dumps({"type": "publish", "room": room, "data": {"text": "two"}, "id": "2"}))
        wait_for(
            browser,
            lambda d: page_texts(d, "#log .msg .text") == ["one", "two"],
            "page shows the new server's first message",
        )
    finally:
        conn.close()


def test_page_heartbeat_pings_and_drops_a_silent_connection(server: ServerProcess, browser: webdriver.Chrome) -> None:
    install_page_hooks(browser, timer_speedup=100)  # a ping every 250 ms instead of 25 s
    browser.get(server.http("/"))
    join_room(browser, f"page-{uuid.uuid4().hex[:8]}", f"e2e-{uuid.uuid4().hex[:8]}")
    pings_sent = "return window.__sent.filter((f) => JSON.parse(f).type === 'ping').length;"
    wait_for(browser, lambda d: d.execute_script(pings_sent) >= 4, "page sends pings")
    # Answered pings keep the first connection.
    assert browser.execute_script("return window.__sockets.length;") == 1
    assert status_of(browser) == "connected"

    browser.execute_script("window.__dropPings = true;")
    wait_for(
        browser,
        lambda d: d.execute_script("return window.__sockets.length;") >= 2,
        "page gives up on a connection that stopped answering and opens another",
    )
    assert browser.execute_script("return window.__sockets[0].readyState;") in (2, 3)  # CLOSING, CLOSED



def test_page_signs_in_with_a_token_from_its_fragment(make_server: Callable[..., ServerProcess],
                                                     browser: webdriver.Chrome) -> None:
    tag = uuid.uuid4().hex[:8]
    room, page_sub, py_sub = f"e2e-{tag}", f"sub-{tag}", f"py-{tag}"
    srv = make_server(WSAPP_JWT_SECRET=JWT_SECRET)
    install_page_hooks(browser)

    # Without a token: the page offers no subprotocol, and the server refuses it before the 101.
    browser.get(srv.http("/"))
    submit_join(browser, room, f"anon-{tag}")
    wait_for(browser, lambda d: status_of(d) == "reconnecting", "page sees its connection refused")
    assert browser.execute_script("return window.__sockets[0].protocol;") == ""
    wait_for(browser, lambda d: "401 a token is required" in srv.log_text(), "server logs the 401")
    browser.get_log("browser")  # Chromium reports the refused handshake as an error: not this test's concern

    # With #token=: the token travels as a subprotocol entry, and the server names the page after `sub`.
    token = jwt.encode({"sub": page_sub, "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")
    browser.get("about:blank")  # a new document: from `/` itself, `/#token=` would only scroll
    browser.get(srv.http(f"/#token={token}"))
    assert token not in browser.current_url  # out of the address bar and history
    name_box = browser.find_element(By.ID, "name")
    assert not name_box.is_enabled()
    submit_join(browser, room)
    wait_for(browser, lambda d: status_of(d) == "connected", "page joins with its token")
    socket_info = "const ws = window.__sockets.at(-1); return [ws.protocol, ws.url];"
    protocol, url = browser.execute_script(socket_info)
    assert protocol == "wsapp"
    assert token not in url and "name=" not in url
    assert name_box.get_attribute("value") == page_sub
    assert page_sub in browser.find_element(By.ID, "status").text

    py_token = jwt.encode({"sub": py_sub, "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")
    conn = websocket.create_connection(srv.ws(f"/ws?token={py_token}"), timeout=WAIT_SECONDS)
    try:
        recv_until(conn, lambda f: f["type"] == "welcome" and f["name"] == py_sub)
        conn.send(json.dumps({"type": "join", "room": room}))
        joined = recv_until(conn, lambda f: f["type"] == "joined" and f["room"] == room)
        assert sorted(joined["members"]) == sorted([page_sub, py_sub])
        conn.send(json.dumps({"type": "publish", "room": room, "data": {"text": HOSTILE_TEXT}, "id": "t1"}))
        wait_for(browser, lambda d: HOSTILE_TEXT in page_texts(d, "#log .msg .text"), "page shows the message")
        assert browser.find_elements(By.CSS_SELECTOR, "#log img, #log b") == []
        browser.find_element(By.ID, "text").send_keys("hello with a token")
        browser.find_element(By.ID, "send-btn").click()
        message = recv_until(conn, lambda f: f["type"] == "message" and f["data"] == {"text": "hello with a token"})
        assert message["from"] == page_sub
    finally:
        conn.close()
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_page_stops_when_its_token_expires(make_server: Callable[..., ServerProcess],
                                           browser: webdriver.Chrome) -> None:
    srv = make_server(WSAPP_JWT_SECRET=JWT_SECRET)
    install_page_hooks(browser)
    token = jwt.encode({"sub": "brief", "exp": int(time.time()) + 3}, JWT_SECRET, algorithm="HS256")
    browser.get(srv.http(f"/#token={token}"))
    submit_join(browser, f"e2e-{uuid.uuid4().hex[:8]}")
    wait_for(browser, lambda d: status_of(d) == "connected", "page joins with its token")
    # The server closes the connection (1008) when the token expires; the page does not retry with it.
    wait_for(browser, lambda d: status_of(d) == "idle", "page stops at the expiry")
    assert "token expired" in browser.find_element(By.ID, "error").text
    assert browser.execute_script("return window.__sockets.length;") == 1
