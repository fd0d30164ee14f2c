"""A user's app built only on wsapp's public API, served by tests/test_extension.py."""

from __future__ import annotations

import json

import gevent
from flask import Flask, request

from wsapp import Realtime, Refuse, Reject

app = Flask(__name__)
rt = Realtime()  # the init_app form


@app.get("/hello")
def hello() -> str:
    return "hi"


@rt.route("/shout")
def shout(ws):  # type: ignore[no-untyped-def]
    ws.join("shouts")
    for message in ws:
        ws.send(message.upper() if isinstance(message, str) else message[::-1])


@rt.route("/resume")
def resume(ws):  # type: ignore[no-untyped-def]
    """`<room> [since [epoch]]` joins with ws.join(room, since, epoch=...) and answers with what it returned
    (after the replay, which join sends first); the room's frames follow as they come."""
    room, *rest = ws.receive(timeout=5).split()
    since = int(rest[0]) if rest else None
    epoch = rest[1] if len(rest) > 1 else None
    joined = ws.join(room, since, epoch=epoch)
    ws.send(json.dumps({"api": "joined", "int": int(joined), "seq": joined.seq, "epoch": joined.epoch,
                        "history_gone": joined.history_gone, "members": joined.members}))
    for _ in ws:
        pass


@rt.route("/about/<tag>", subprotocols=["v2", "v1"])
def about(ws, tag):  # type: ignore[no-untyped-def]
    ws.send(f"{tag} {ws.subprotocol} {ws.identity} {ws.remote_addr} {ws.name}")
    first = ws.receive(timeout=0.2)  # the client says nothing yet: None after the timeout
    ws.send("timeout" if first is None else "early")
    for message in ws:
        ws.send(message)


@rt.route("/count")
def count(ws):  # type: ignore[no-untyped-def]
    """Slow consumer of its own input: every message must still arrive, in order."""
    n = 0
    for message in ws:
        gevent.sleep(0.0005)
        if message == "end":
            ws.send(str(n))
        else:
            assert message == str(n), (message, n)
            n += 1


@rt.route("/speak")
def speak(ws):  # type: ignore[no-untyped-def]
    """Publishes into rooms as this connection: through authorize and on_publish."""
    for message in ws:
        room, _, text = message.partition(" ")
        try:
            ws.send(str(ws.publish(room, {"text": text})))
        except Reject as exc:
            ws.send(f"error {exc.code}")


@rt.route("/fail")
def fail(ws):  # type: ignore[no-untyped-def]
    message = ws.receive(timeout=5)
    if message == "reject":
        raise Reject("policy", "rejected by the handler")
    raise RuntimeError("boom")


@rt.route("/open", authenticate=False)
def open_route(ws):  # type: ignore[no-untyped-def]
    # A handler route runs in the request context of its upgrade request.
    ws.send(f"anonymous {ws.identity} {request.args.get('via', '-')}")


@rt.authenticate
def who(req):  # type: ignore[no-untyped-def]
    user = req.cookies.get("user")
    if not user:
        raise Refuse(401, "log in first")
    if user == "banned":
        raise Refuse(403, "you are banned")
    return user


@rt.authorize
def may(identity, action, room):  # type: ignore[no-untyped-def]
    if room == "announcements":
        return action == "join" or identity == "admin"
    return room in ("lobby", "shouts") or room == f"user:{identity}"


@rt.on_publish
def check(identity, room, data):  # type: ignore[no-untyped-def]
    if not isinstance(data, dict):
        raise Reject("bad_message", "data must be an object")
    if data.get("text") == "spam":
        raise Reject("spam", "no spam here")
    return {**data, "checked_by": "ext_app"}


@app.post("/notify/<user>")
def notify(user: str) -> dict[str, object]:
    seq = rt.publish(f"user:{user}", request.get_json())
    return {"seq": seq, "epoch": seq.epoch}


@app.post("/later/<room>")
def later(room: str) -> tuple[str, int]:
    """Publishes from a background greenlet after the response has gone."""
    data = request.get_json()
    gevent.spawn(lambda: rt.publish(room, data, sender="job"))
    return "", 202


rt.init_app(app)
