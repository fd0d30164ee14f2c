"""redis_stream.ReplyReader against a real redis-server, with hiredis and with redis-py's own parser:
replies in order, several from one socket read, error replies as values, a timeout as NOTHING."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis._parsers import _RESP2Parser

from tests.redis_fixture import RedisServer
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
