"""The notifications example (examples/notifications) end to end: served by `python server.py` with
WSAPP_APP over a real redis-server, logged in over HTTP with a cookie jar, notified from a view and
from job.py in a process of its own, and the page in headless Chromium."""

from __future__ import annotations

import http.cookiejar
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websocket
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By

from tests.clients import connect, recv_json, recv_type, send_json
from tests.harness import ROOT, ServerProcess
from tests.rawws import RawClient
from tests.redis_fixture import RedisServer
from tests.test_browser import browser, install_page_hooks, page_texts, status_of  # noqa: F401 - fixture
from tests.test_browser import wait_for as wait_in_page

APP = "examples.notifications.app:create_app"
# Fresh passwords every run: the example has no built-in users or secrets.
PASSWORDS = {name: secrets.token_urlsafe(12) for name in ("alice", "bob", "carol")}
HOSTILE_TEXT = "<img src=x onerror=alert(1)>report <b>ready</b>"

RawFactory = Callable[..., RawClient]


@pytest.fixture(scope="module")
def notify_env(redis_server: RedisServer) -> dict[str, str]:
    return {
        "WSAPP_APP": APP,
        "REDIS_URL": redis_server.url,
        "NOTIFY_SECRET_KEY": secrets.token_hex(32),
        "NOTIFY_USERS": ",".join(f"{name}:{pw}" for name, pw in PASSWORDS.items()),
        "NOTIFY_ADMINS": "alice",
    }


@pytest.fixture(scope="module")
def notify_server(notify_env: dict[str, str]) -> Iterator[ServerProcess]:
    proc = ServerProcess(notify_env)
    yield proc
    proc.stop()


class Session:
    """One user's HTTP client with a cookie jar, as a browser keeps it."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
                ) -> tuple[int, str, dict[str, str], bytes]:
        """(status, final URL after redirects, headers, body); 4xx and 5xx are answers, not errors."""
        req = urllib.request.Request(self.server.http(path), data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=5) as resp:
                return resp.status, resp.url, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.url, dict(err.headers), err.read()

    def log_in(self, user: str, password: str | None = None) -> int:
        form = urllib.parse.urlencode({"user": user, "password": password or PASSWORDS[user]}).encode()
        return self.request("/login", form)[0]

    def send(self, to: str, body: Any) -> tuple[int, dict[str, Any]]:
        status, _, _, raw = self.request(f"/send/{to}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return status, json.loads(raw)

    @property
    def cookie(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


def logged_in(server: ServerProcess, user: str) -> Session:
    session = Session(server)
    assert session.log_in(user) == 200
    return session


def member(server: ServerProcess, session: Session, *rooms: str) -> tuple[websocket.WebSocket, dict[str, int]]:
    """A /ws connection with the session's cookie that joined `rooms`; their seqs at the join."""
    ws = connect(server.ws("/ws"), cookie=session.cookie)
    recv_type(ws, "welcome")
    seqs = {}
    for room in rooms:
        send_json(ws, type="join", room=room)
        seqs[room] = recv_type(ws, "joined")["seq"]
    return ws, seqs


def run_job(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """examples/notifications/job.py in a process of its own, with this venv's Python, as cron would."""
    job_env = {k: v for k, v in os.environ.items() if not k.startswith(("WSAPP_", "NOTIFY_"))}
    job_env["REDIS_URL"] = env["REDIS_URL"]
    return subprocess.run([sys.executable, "-m", "examples.notifications.job", *args], cwd=ROOT, env=job_env,
                          capture_output=True, text=True, timeout=20, check=False)


def test_refuses_to_start_without_a_secret_key(notify_env: dict[str, str]) -> None:
    env = {k: v for k, v in notify_env.items() if k != "NOTIFY_SECRET_KEY"}
    proc = ServerProcess(env)  # returns once the process has ended its log, without a port
    try:
        assert proc.wait(15) != 0
    finally:
        proc.stop()
    assert proc.port == 0
    assert "NOTIFY_SECRET_KEY must be set" in proc.log_text()


def test_login_page_session_and_logout(notify_server: ServerProcess) -> None:
    session = Session(notify_server)
    status, url, headers, body = session.request("/")
    assert (status, url) == (200, notify_server.http("/login"))  # sent to the login form
    assert b'name="password"' in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]

    assert session.log_in("alice", "wrong") == 401
    assert session.log_in("mallory", "anything") == 401
    assert session.cookie == ""
    assert session.request("/me")[0] == 401

    assert session.log_in("alice") == 200
    status, url, headers, body = session.request("/")
    assert (status, url) == (200, notify_server.http("/"))
    assert b'data-user="alice"' in body and b'id="announce-form"' in body  # alice is an admin
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert json.loads(session.request("/me")[3]) == {"user": "alice"}
    assert b'id="announce-form"' not in logged_in(notify_server, "bob").request("/")[3]

    # A form posted from another site is refused, even with the user's cookie.
    forged = session.request("/send/bob", json.dumps({"text": "hi"}).encode(),
                             {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert forged[0] == 403

    status, url, _, _ = session.request("/logout", b"")
    assert (status, url) == (200, notify_server.http("/login"))
    assert session.request("/me")[0] == 401


def test_the_upgrade_needs_the_session_cookie(notify_server: ServerProcess, raw: RawFactory) -> None:
    anonymous = raw(notify_server.ws("/ws"))
    assert anonymous.status == 401 and anonymous.response_body == b"log in first\n"  # never a 101
    cookie = logged_in(notify_server, "alice").cookie
    name, _, value = cookie.partition("=")
    tampered = f"{name}={value[:-4]}{'AAAA' if not value.endswith('AAAA') else 'BBBB'}"
    assert raw(notify_server.ws("/ws"), {"Cookie": tampered}).status == 401
    assert raw(notify_server.ws("/ws"), {"Cookie": cookie}).status == 101


def test_notifications_from_a_view_and_from_the_job(notify_server: ServerProcess, notify_env: dict[str, str]) -> None:
    alice, bob = logged_in(notify_server, "alice"), logged_in(notify_server, "bob")
    ws, seqs = member(notify_server, alice, "user:alice")
    start = seqs["user:alice"]
    try:
        assert bob.send("alice", {"text": "lunch?"}) == (200, {"room": "user:alice", "seq": start + 1})
        got = recv_type(ws, "message")
        assert (got["room"], got["seq"], got["from"]) == ("user:alice", start + 1, "bob")
        assert got["data"] == {"text": "lunch?", "kind": "direct"}

        job = run_job(notify_env, "alice", "Your report is ready")
        assert job.returncode == 0, job.stderr
        assert f"seq {start + 2} in user:alice" in job.stdout
        got = recv_type(ws, "message")
        assert (got["seq"], got["from"], got["data"]) == (start + 2, "job", {"text": "Your report is ready",
                                                                           "kind": "job"})

        # Only your own room, and only the server writes to it.
        send_json(ws, type="join", room="user:bob")
        assert recv_type(ws, "error") == {"type": "error", "code": "forbidden",
                                          "message": "not allowed to join in room 'user:bob'"}
        send_json(ws, type="publish", room="user:alice", data={"text": "me"}, id="p")
        assert recv_type(ws, "error")["code"] == "forbidden"
    finally:
        ws.close()

    # Back after a drop: `since` replays what was missed, from the Redis history.
    again = connect(notify_server.ws("/ws"), cookie=alice.cookie)
    try:
        recv_type(again, "welcome")
        send_json(again, type="join", room="user:alice", since=start)
        assert recv_type(again, "joined")["seq"] == start + 2
        assert [recv_json(again)["data"]["kind"] for _ in range(2)] == ["direct", "job"]
    finally:
        again.close()


def test_the_job_checks_its_arguments(notify_env: dict[str, str]) -> None:
    bad_user = run_job(notify_env, "Not A User", "hi")
    assert bad_user.returncode == 2 and "user names are" in bad_user.stderr
    no_text = run_job(notify_env, "alice", "   ")
    assert no_text.returncode == 2 and "1-500 characters" in no_text.stderr


def test_send_checks_who_and_what(notify_server: ServerProcess) -> None:
    assert Session(notify_server).send("alice", {"text": "hi"}) == (401, {"error": "log in first"})
    bob = logged_in(notify_server, "bob")
    assert bob.send("nobody", {"text": "hi"})[0] == 404
    assert bob.send("alice", {"text": "  "})[0] == 400
    assert bob.send("alice", {"text": "x" * 501})[0] == 400
    assert bob.send("alice", ["not", "an", "object"])[0] == 400
    form = bob.request("/send/alice", b"text=hi", {"Content-Type": "application/x-www-form-urlencoded"})
    assert form[0] == 400  # JSON only: what a cross-site HTML form cannot send


def test_only_admins_announce(notify_server: ServerProcess) -> None:
    admin, _ = member(notify_server, logged_in(notify_server, "alice"), "announcements")
    listener, _ = member(notify_server, logged_in(notify_server, "bob"), "announcements")
    try:
        send_json(listener, type="publish", room="announcements", data={"text": "me too"}, id=1)
        assert recv_type(listener, "error")["code"] == "forbidden"
        send_json(admin, type="publish", room="announcements", data={"oops": 1}, id=2)
        assert recv_type(admin, "error")["code"] == "bad_message"
        send_json(admin, type="publish", room="announcements", data={"text": "  maintenance at 6  "}, id=3)
        ack = recv_type(admin, "ack")
        got = recv_type(listener, "message")
        assert (got["seq"], got["from"]) == (ack["seq"], "alice")
        assert got["data"] == {"text": "maintenance at 6", "kind": "announcement"}  # what on_publish made of it
    finally:
        admin.close()
        listener.close()


@pytest.mark.chromium
def test_page_logs_in_shows_job_notifications_and_catches_up_after_a_drop(
    notify_server: ServerProcess, notify_env: dict[str, str], browser: webdriver.Chrome  # noqa: F811
) -> None:
    install_page_hooks(browser)  # keeps the page's sockets and sent frames reachable
    browser.execute_cdp_cmd("Network.enable", {})
    browser.get(notify_server.http("/"))
    browser.find_element(By.ID, "user").send_keys("carol")
    browser.find_element(By.ID, "password").send_keys(PASSWORDS["carol"])
    browser.find_element(By.ID, "login-btn").click()
    wait_in_page(browser, lambda d: status_of(d) == "connected", "the page logs in and connects")

    job = run_job(notify_env, "carol", HOSTILE_TEXT)
    assert job.returncode == 0, job.stderr
    wait_in_page(browser, lambda d: HOSTILE_TEXT in page_texts(d, "#notifications .text"),
                 "the page shows the job's notification")
    # As literal text: the markup in it made no elements and ran no script.
    assert browser.find_elements(By.CSS_SELECTOR, "#notifications img, #notifications b") == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is what raises when there is no alert
    assert "from job" in page_texts(browser, "#notifications .from")

    # Offline, the page's reconnects fail; what is sent meanwhile comes back with `since` afterwards.
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
    browser.execute_script("window.__sockets.at(-1).close();")
    wait_in_page(browser, lambda d: status_of(d) == "reconnecting", "the page notices the drop")
    assert logged_in(notify_server, "bob").send("carol", {"text": "missed while away"})[0] == 200
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {**offline, "offline": False})
    wait_in_page(browser, lambda d: "missed while away" in page_texts(d, "#notifications .text"),
                 "the page catches up after reconnecting")
    assert status_of(browser) == "connected"
    texts = page_texts(browser, "#notifications .text")
    assert texts.count("missed while away") == 1 and texts.count(HOSTILE_TEXT) == 1
    joins = browser.execute_script(
        "return window.__sent.map((f) => JSON.parse(f)).filter((f) => f.type === 'join' && f.room === 'user:carol');")
    assert joins[0]["since"] == 0 and joins[-1]["since"] > 0  # the first asks for everything kept, later ones catch up
    csp_errors = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert csp_errors == []
