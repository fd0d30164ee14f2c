"""A notifications app built on wsapp's public API, the way a Flask team would write one.

Users log in with a form (a Flask session cookie); the page opens `/ws` with that cookie, and the
`authenticate` hook reads the session before the 101. Each user has a private room `user:<name>`
that only they may join and only the server publishes to: from the `POST /send/<user>` view here,
or from any other process with `wsapp.Emitter` (job.py). Admins may also announce to everyone.

    REDIS_URL=redis://127.0.0.1:6379/0 NOTIFY_SECRET_KEY=... NOTIFY_USERS=alice:pw1,bob:pw2 \
        python -m wsapp examples.notifications.app:create_app
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Request, Response, current_app, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue

from examples.notifications.rooms import ANNOUNCEMENTS, USER_RE, clean_text, user_room
from wsapp import Realtime, Refuse, Reject

log = logging.getLogger(__name__)

MIN_SECRET_KEY = 32
# Only this app's own files and its own host; message text reaches the page as text, never markup.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The app, configured from NOTIFY_* in the environment (then `config`); refuses to start without
    a secret key or users."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=os.environ.get("NOTIFY_SECRET_KEY", ""),
        USERS=parse_users(os.environ.get("NOTIFY_USERS", "")),
        ADMINS=frozenset(filter(None, os.environ.get("NOTIFY_ADMINS", "").replace(" ", "").split(","))),
        # Not sent on cross-site subrequests or form posts; set SESSION_COOKIE_SECURE behind HTTPS.
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_HTTPONLY=True,
    )
    app.config.update(config or {})
    if len(app.config["SECRET_KEY"]) < MIN_SECRET_KEY:
        raise RuntimeError(f"NOTIFY_SECRET_KEY must be set to at least {MIN_SECRET_KEY} random characters "
                           "(python -c 'import secrets; print(secrets.token_hex(32))'): it signs the session cookie")
    if not app.config["USERS"]:
        raise RuntimeError("NOTIFY_USERS must list who may log in, as name:password,name:password")
    if not os.environ.get("REDIS_URL"):
        log.warning("REDIS_URL is not set: notifications published by job.py will not reach this server")

    rt = Realtime(app)  # serves the rooms protocol at /ws with the hooks below
    add_realtime(app, rt)
    add_pages(app)
    app.before_request(refuse_cross_site_posts)
    app.after_request(security_headers)
    return app


def parse_users(spec: str) -> dict[str, str]:
    """`alice:pw1,bob:pw2` -> {"alice": "pw1", "bob": "pw2"}: a stand-in for your user database."""
    users = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, _, password = entry.partition(":")
        if not USER_RE.fullmatch(name) or not password:
            raise RuntimeError(f"NOTIFY_USERS: {name!r} needs a name of a-z 0-9 _ . - and a password (name:password)")
        users[name] = password
    return users


def current_user() -> str | None:
    """Who this request's session belongs to, if they are (still) a user."""
    user = session.get("user")
    return user if isinstance(user, str) and user in current_app.config["USERS"] else None


def add_realtime(app: Flask, rt: Realtime) -> None:
    """Who may connect, join and announce; and the view that sends a user a notification."""
    users: dict[str, str] = app.config["USERS"]
    admins: frozenset[str] = app.config["ADMINS"]

    @rt.authenticate
    def from_session(req: Request) -> str:
        # Runs before the 101 in this upgrade request's context: the same session cookie as any view.
        user = current_user()
        if user is None:
            raise Refuse(401, "log in first")
        return user

    @rt.authorize
    def may(user: str, action: str, room: str) -> bool:
        if room == ANNOUNCEMENTS:
            return action == "join" or user in admins
        # A private room is read by its user and written only by the server (rt.publish, the Emitter).
        return action == "join" and room == user_room(user)

    @rt.on_publish
    def announcement(user: str, room: str, data: Any) -> dict[str, str]:
        text = clean_text(data.get("text")) if isinstance(data, dict) else None
        if text is None:
            raise Reject("bad_message", 'an announcement is {"text": "..."} of 1-500 characters')
        return {"text": text, "kind": "announcement"}

    @app.post("/send/<user>")
    def send(user: str) -> tuple[dict[str, Any], int]:
        me = current_user()
        if me is None:
            return {"error": "log in first"}, 401
        if user not in users:
            return {"error": f"there is no user {user!r}"}, 404
        # JSON only: a cross-site HTML form cannot send it, so this view needs no CSRF token.
        body = request.get_json(silent=True)
        text = clean_text(body.get("text")) if isinstance(body, dict) else None
        if text is None:
            return {"error": 'send JSON {"text": "..."} of 1-500 characters'}, 400
        room = user_room(user)
        return {"room": room, "seq": rt.publish(room, {"text": text, "kind": "direct"}, sender=me)}, 200


def add_pages(app: Flask) -> None:
    """The login form, logout, and the notifications page."""
    users: dict[str, str] = app.config["USERS"]

    @app.get("/")
    def index() -> ResponseReturnValue:
        me = current_user()
        if me is None:
            return redirect(url_for("login"), 303)
        return render_template("index.html", user=me, is_admin=me in app.config["ADMINS"])

    @app.get("/me")
    def me() -> tuple[dict[str, Any], int]:
        """What the page asks when it cannot connect: a 401 means the session is gone."""
        user = current_user()
        return ({"user": user}, 200) if user else ({"error": "log in first"}, 401)

    @app.route("/login", methods=["GET", "POST"])
    def login() -> ResponseReturnValue:
        if request.method == "GET":
            return render_template("login.html", error=None), 200
        name = request.form.get("user", "").strip()
        password = request.form.get("password", "")
        known = users.get(name)
        if known is None or not password or not hmac.compare_digest(password.encode(), known.encode()):
            return render_template("login.html", error="Unknown user or wrong password.", user=name), 401
        session.clear()  # a fresh session: nothing from before the login carries over
        session["user"] = name
        return redirect(url_for("index"), 303)

    @app.post("/logout")
    def logout() -> ResponseReturnValue:
        session.clear()
        return redirect(url_for("login"), 303)


def refuse_cross_site_posts() -> tuple[str, int] | None:
    """Browsers send Origin with every POST: one from another site is a forged form, refuse it."""
    origin = request.headers.get("Origin")
    if request.method == "POST" and origin and urlsplit(origin).netloc != request.host:
        return "cross-site request refused\n", 403
    return None


def security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response
