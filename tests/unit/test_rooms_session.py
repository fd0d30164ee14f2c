"""The rooms session's publishes in flight: the reader does not wait for the broker, and the client's
replies still come in the order of its messages, whatever order the broker answers in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gevent
import pytest

from wsapp.backends import BrokerUnavailable, Published
from wsapp.backends.memory import MemoryBackend
from wsapp.config import Settings
from wsapp.hub import Hub
from wsapp.metrics import Stats
from wsapp.policy import Policy
from wsapp.rooms import MAX_PUBLISHES_IN_FLIGHT, RoomsSession


class SlowBroker(MemoryBackend):
    """Numbers publishes when the test says so, in any order (as shards of a Cluster may answer)."""

    inline = False  # publish_nowait answers later, as a shared broker does

    def __init__(self) -> None:
        super().__init__(history=10)
        self.waiting: list[tuple[bytes, bytes, Published]] = []

    def publish_nowait(self, room: str, head: bytes, tail: bytes, origin: str | None, done: Published) -> None:
        self.waiting.append((head, tail, done))

    def answer(self, n: int, failure: BaseException | None = None) -> None:
        head, tail, done = self.waiting[n]
        done(None, failure) if failure is not None else done(self.publish("r", head, tail, None), None)


class Client:
    """The session's side of a connection: what it was sent."""

    def __init__(self) -> None:
        self.id = "c1"
        self.name = "alice"
        self.sent: list[dict[str, Any]] = []

    def send(self, frame: bytes) -> bool:
        return True

    def send_text(self, payload: bytes) -> bool:
        self.sent.append(json.loads(payload))
        return True


@dataclass
class Services:
    settings: Settings
    stats: Stats
    hub: Hub


def session() -> tuple[RoomsSession, Client, SlowBroker, Stats]:
    broker = SlowBroker()
    stats = Stats()
    hub = Hub(broker, lambda payload: payload, stats, 4)
    client = Client()
    hub.join(client, "r")
    services = Services(Settings.from_env({"WSAPP_RATE_LIMIT": "0"}), stats, hub)
    return RoomsSession(client, services, Policy()), client, broker, stats  # type: ignore[arg-type]


def publish(s: RoomsSession, data: object, msg_id: object = None) -> None:
    message = {"type": "publish", "room": "r", "data": data}
    if msg_id is not None:
        message["id"] = msg_id
    s.on_message(1, json.dumps(message).encode())


def test_publishes_answered_out_of_order_are_acked_in_the_order_they_were_sent() -> None:
    s, client, broker, stats = session()
    publish(s, "one", 1)
    publish(s, "two")  # no id: no ack, but it still holds back the replies after it
    publish(s, "three", 3)
    publish(s, "four", 4)
    assert client.sent == []  # nothing answered yet: the reader went on without waiting
    broker.answer(2)  # "three" is numbered first (seq 1)
    broker.answer(3, BrokerUnavailable("the broker is unreachable"))
    assert client.sent == []  # "one" is still unanswered
    broker.answer(0)  # seq 2
    epoch = broker.join("r", "m", "x", None, None, None).epoch
    assert client.sent == [{"type": "ack", "id": 1, "room": "r", "seq": 2, "epoch": epoch}]
    broker.answer(1)  # seq 3: releases "three" and "four"'s replies too
    assert client.sent[1:] == [
        {"type": "ack", "id": 3, "room": "r", "seq": 1, "epoch": epoch},
        {"type": "error", "code": "unavailable", "message": "the broker is unreachable; retry later", "id": 4},
    ]
    assert stats.ws_errors[("unavailable",)] == 1


def test_a_reply_to_anything_else_waits_for_the_publishes_before_it() -> None:
    s, client, broker, _ = session()
    publish(s, "one", 1)
    # Not a member of "elsewhere": refused without the broker, but the reader waits to say so.
    reader = gevent.spawn(s.on_message, 1, b'{"type":"publish","room":"elsewhere","data":2,"id":2}')
    gevent.idle()  # the reader has run as far as it can
    assert not reader.dead and client.sent == []
    broker.answer(0)
    reader.join(5)
    assert reader.dead and [(m["type"], m["id"]) for m in client.sent] == [("ack", 1), ("error", 2)]
    assert client.sent[1]["code"] == "not_in_room"
    reader = gevent.spawn(s.on_message, 1, b'{"type":"ping","id":3}')
    reader.join(5)  # nothing in flight: no wait
    assert reader.dead and client.sent[-1] == {"type": "pong", "id": 3}


def test_past_the_limit_in_flight_the_reader_waits_for_the_oldest() -> None:
    s, client, broker, _ = session()
    reader = gevent.spawn(lambda: [publish(s, n, n) for n in range(MAX_PUBLISHES_IN_FLIGHT + 2)])
    gevent.idle()
    assert not reader.dead and len(broker.waiting) == MAX_PUBLISHES_IN_FLIGHT + 1
    broker.answer(0)
    gevent.idle()
    assert len(broker.waiting) == MAX_PUBLISHES_IN_FLIGHT + 2  # one answered: the next was read
    for n in range(1, MAX_PUBLISHES_IN_FLIGHT + 2):
        broker.answer(n)
    reader.join(5)
    assert reader.dead and [m["id"] for m in client.sent] == list(range(MAX_PUBLISHES_IN_FLIGHT + 2))


@pytest.mark.parametrize("answered", [0, MAX_PUBLISHES_IN_FLIGHT])
def test_an_in_process_broker_answers_inline(answered: int) -> None:
    stats = Stats()
    hub = Hub(MemoryBackend(10), lambda payload: payload, stats, 4)
    client = Client()
    hub.join(client, "r")
    s = RoomsSession(client, Services(Settings.from_env({"WSAPP_RATE_LIMIT": "0"}), stats, hub),  # type: ignore[arg-type]
                     Policy())
    for n in range(answered + 3):
        publish(s, n, n)
    assert [m["seq"] for m in client.sent if m["type"] == "ack"] == list(range(1, answered + 4))
