"""redis_stream against a real redis-server. ReplyReader, with hiredis and with redis-py's own parser:
replies in order, several from one socket read, error replies as values, a timeout as NOTHING.
CommandStream: calls Redis refuses for a while are sent again, in order, within a bounded window."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import redis
from redis._parsers import _RESP2Parser

from tests.harness import ROOT
from tests.redis_fixture import RedisServer
from wsapp.backends import redis_stream
from wsapp.backends.redis_stream import NOTHING, ReplyReader, pack_command

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("parser", ["hiredis", "redis-py"])
def test_replies_come_in_order_with_errors_as_values(redis_server: RedisServer, parser: str) -> None:
    kwargs: dict[str, Any] = {} if parser == "hiredis" else {"parser_class": _RESP2Parser}
    conn = redis.Connection(port=redis_server.port, socket_timeout=2, **kwargs)
    try:
        conn.connect()
        reader = ReplyReader(conn)
        assert (reader._parser is not None) == (parser == "hiredis")
        commands = [(b"PING",), (b"EVALSHA", b"0" * 40, b"0"), (b"ECHO", b"two"), (b"INCRBY", b"k", b"x")]
        conn.send_packed_command([b"".join(pack_command(c) for c in commands)], check_health=False)
        replies = [reader.read() for _ in commands]
        assert replies[0] == b"PONG" and replies[2] == b"two"
        assert isinstance(replies[1], redis.exceptions.NoScriptError)
        assert isinstance(replies[3], redis.ResponseError)
        assert reader.read(0.05) is NOTHING  # nothing more was asked
        conn.send_packed_command([pack_command((b"ECHO", b"late"))], check_health=False)
        assert reader.read(2.0) == b"late"
    finally:
        conn.disconnect()


# Runs in a fresh interpreter, monkey-patched as the server is: the stream's greenlets on real sockets.
# `flaky` answers TRYAGAIN (as a settling Cluster does) while the `gate` counter is not used up, else
# records its name; `record` records at once: the list shows the order the calls ran in.
RETRY_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, sys, time, redis
from wsapp.backends.redis_stream import CommandStream, pack_command

FLAKY = "if redis.call('DECR', 'gate') >= 0 then return redis.error_reply('TRYAGAIN settling') end " \
        "return redis.call('RPUSH', 'ran', ARGV[1])"
client = redis.Redis(port=int(sys.argv[1]), socket_timeout=2)
pool = client.connection_pool
repairs = []

def repair():  # as the Cluster shard's: a short pause
    repairs.append(1)
    time.sleep(0.05)

stream = CommandStream(pool.get_connection, pool.release, lambda exc: None, lambda: True,
                       lambda error: isinstance(error, redis.exceptions.TryAgainError), repair,
                       retry_window=float(sys.argv[2]))
stream.open()
stream.start()

def flaky(name):
    return pack_command((b"EVAL", FLAKY, 0, name))

def record(name):
    return pack_command((b"RPUSH", b"ran", name))

def run(*commands):
    calls = [stream.submit(command) for command in commands]  # all in one write
    return [call.get() for call in calls]

def outcome(reply):
    return [type(reply).__name__, str(reply)] if isinstance(reply, Exception) else reply

out = {}
client.set("gate", 3)  # the three flaky calls are refused once, all together: sent again, in order
out["together"] = run(record("a"), flaky("b"), flaky("c"), flaky("d"))
out["repairs"] = len(repairs)
client.set("gate", 1)  # only x is refused, and y behind it runs: x must not run after y
out["overtaken"] = [outcome(reply) for reply in run(flaky("x"), record("y"))]
client.set("gate", 1000)
began = time.monotonic()
out["refused"] = outcome(run(flaky("never"))[0])
out["waited"] = time.monotonic() - began
out["after"] = run(record("z"))
out["ran"] = [name.decode() for name in client.lrange("ran", 0, -1)]
# A call written and not answered when the connection breaks may have run: its failure says so.
own_id = run(pack_command((b"CLIENT", b"ID")))[0]
blocked = stream.submit(pack_command((b"BLPOP", b"nothing", b"5")))
deadline = time.monotonic() + 5
while not any(c["id"] == str(own_id) and c["cmd"] == "blpop" for c in client.client_list()):
    assert time.monotonic() < deadline, "the BLPOP never reached Redis"
client.client_kill_filter(_id=own_id)
try:
    out["cut"] = outcome(blocked.get())
except Exception as exc:
    out["cut"] = [type(exc).__name__, str(exc)]
stream.close(1.0)  # as a shard dropped after a topology change: a call that comes late is refused, not lost
began = time.monotonic()
try:
    stream.submit(record("late")).get()
    out["after_close"] = "answered"
except Exception as exc:
    out["after_close"] = type(exc).__name__
out["after_close_waited"] = time.monotonic() - began
print(json.dumps(out))
"""


def test_calls_a_settling_redis_refuses_run_again_in_order_and_are_refused_rather_than_overtaken(
        redis_server: RedisServer) -> None:
    """Error replies the owner calls retryable (CLUSTERDOWN, TRYAGAIN: a Cluster settling) are sent
    again after `repair`, before anything newer and in their order. A refused call that a later one
    overtook (Redis stopped refusing in between) gets its refusal instead of running after it, and so
    does a call still refused when the retry window is over. After `close`, a call is refused at once."""
    window = 0.4
    done = subprocess.run([sys.executable, "-c", RETRY_SCRIPT, str(redis_server.port), str(window)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["together"] == [1, 2, 3, 4]  # each call's own reply (RPUSH: the list's length)
    assert out["repairs"] == 1  # once per round of refusals, not once per refused reply
    assert out["overtaken"] == [["TryAgainError", "settling"], 5]
    assert out["refused"] == ["TryAgainError", "settling"]
    assert window <= out["waited"] < window + 1.0
    assert out["after"] == [6]  # the stream goes on after a refusal
    assert out["ran"] == ["a", "b", "c", "d", "y", "z"]
    assert out["cut"] == ["BrokerUnavailable", redis_stream.CUT]  # written, unanswered: it may have run
    # Closed: nobody reads or writes any more, so a late call is refused at once (it used to wait forever).
    assert out["after_close"] == "BrokerUnavailable" and out["after_close_waited"] < 0.5


# A process's relay frames on its stream, with an echo window of 8 frames' bytes (RELAY_ECHO_WINDOW is
# 64 KiB): Redis holds every write while paused (CLIENT PAUSE WRITE: PUBLISH is a write), so no copy
# comes back on the process's own subscription.
RELAY_PACING_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, sys, time, gevent, redis
import wsapp.backends.redis as rb
from wsapp.backends import redis_wire as wire
from wsapp.config import Settings

rb.RELAY_ECHO_WINDOW = 8 * len(b"frame 0")
backend = rb.RedisBackend(Settings.from_env({"REDIS_URL": f"redis://127.0.0.1:{sys.argv[1]}/0"}))
backend.attach(lambda *event, **how: True)
share = backend.attach_relay(lambda frame: None)
admin = redis.Redis(port=int(sys.argv[1]), socket_timeout=2)
watcher = admin.pubsub()
watcher.subscribe(wire.RELAY_CHANNEL)
assert watcher.get_message(timeout=2)["type"] == "subscribe"
out = {"healthy": backend.healthy}
admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
for n in range(8):
    share(b"frame %d" % n)  # none of these waits: 8 frames' bytes not back yet
out["waits_before"] = backend.counters["broker_relay_waits"]
ninth = gevent.spawn(share, b"frame 8")
gevent.sleep(0)  # it runs until it waits for the earlier frames to come back
out["ninth_waiting"] = not ninth.dead
out["waits_during"] = backend.counters["broker_relay_waits"]
admin.execute_command("CLIENT", "UNPAUSE")
ninth.join(0.5)  # the copies come back within milliseconds of the pause ending
out["ninth_done"] = ninth.dead
got = []
deadline = time.monotonic() + 5
while len(got) < 9 and time.monotonic() < deadline:
    message = watcher.get_message(timeout=1)
    if message and message["type"] == "message":
        got.append(wire.parse_envelope(message["data"]).payload.decode())
out["published"] = got
out["still_healthy"] = backend.healthy
out["reconnects"] = backend.counters["broker_reconnects"]
backend.close()
print(json.dumps(out))
"""


def test_a_relay_sender_waits_while_its_frames_have_not_come_back_then_every_frame_goes_in_order(
        redis_server: RedisServer) -> None:
    """The relay's pacing: past RELAY_ECHO_WINDOW bytes of the process's frames not back on its own
    subscription (Redis buffers those for it) the sender waits, counted, until half are back; then its
    frame goes. Nothing is dropped or reordered, and the subscription is never lost to it."""
    done = subprocess.run([sys.executable, "-c", RELAY_PACING_SCRIPT, str(redis_server.port)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["healthy"] and out["still_healthy"] and out["reconnects"] == 0
    assert (out["waits_before"], out["ninth_waiting"], out["waits_during"]) == (0, True, 1)
    assert out["ninth_done"]
    assert out["published"] == [f"frame {n}" for n in range(9)]
