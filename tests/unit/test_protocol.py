from __future__ import annotations

import random

import orjson
import pytest

from wsapp import protocol
from wsapp.exceptions import MessageError
from wsapp.protocol import Join, Leave, Ping, Publish, parse


def test_parses_each_command() -> None:
    assert parse(b'{"type":"join","room":"lobby"}') == Join("lobby", None, False)
    assert parse('{"type":"join","room":"a.b:c-d_1","since":4,"echo":true}') == Join("a.b:c-d_1", 4, True)
    assert parse(b'{"type":"leave","room":"lobby"}') == Leave("lobby")
    assert parse(b'{"type":"publish","room":"r","data":null,"id":"x"}') == Publish("r", None, "x")
    assert parse(b'{"type":"publish","room":"r","data":{"a":[1]},"id":3}') == Publish("r", {"a": [1]}, 3)
    assert parse(b'{"type":"ping"}') == Ping(None)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "bad_json"),
        (b"{", "bad_json"),
        (b'"just a string"', "bad_message"),
        (b'{"type":"publish","room":"r","data":1,"id":[1]}', "bad_message"),
        (b'{"type":"publish","room":"r","data":1,"id":"' + b"x" * 129 + b'"}', "bad_message"),
        (b'{"type":"join","room":"r","since":1.5}', "bad_message"),
        (b'{"type":"join","room":"r","since":true}', "bad_message"),
        (b'{"type":"join","room":7}', "bad_message"),
        (b'{"type":"join","room":"a/b"}', "bad_room"),
        (b'{"type":"join","room":"caf\xc3\xa9"}', "bad_room"),
        (b'{"type":"nope"}', "unknown_type"),
    ],
)
def test_errors_have_stable_codes(raw: bytes, code: str) -> None:
    with pytest.raises(MessageError) as info:
        parse(raw)
    assert info.value.code == code


def test_error_keeps_the_offending_id() -> None:
    with pytest.raises(MessageError) as info:
        parse(b'{"type":"publish","room":"r","id":"m9"}')
    assert info.value.msg_id == "m9"


def test_depth_limit() -> None:
    ok = b'{"type":"publish","room":"r","data":' + b"[" * 4 + b"]" * 4 + b"}"
    assert parse(ok, max_depth=4).data == [[[[]]]]
    deep = b'{"type":"publish","room":"r","data":' + b"[" * 5 + b"]" * 5 + b"}"
    with pytest.raises(MessageError):
        parse(deep, max_depth=4)


@pytest.mark.parametrize(
    "data",
    [
        "flat", 1, None, {"a": 1}, [1, 2], {"a": [1, {"b": [2]}]},  # few brackets: no walk needed
        "{[" * 20, {"text": "{{{{[[[[", "n": [1]},  # brackets inside strings: counted, then walked
        [[[[]]]], [[[[[]]]]], {"a": {"b": {"c": {"d": {}}}}}, [{"a": [{"b": []}]}, [[[[[]]]]]],
        [[]] * 10,  # many brackets, shallow
    ],
)
@pytest.mark.parametrize("as_text", [False, True])
@pytest.mark.parametrize("pad", [0, protocol.COUNT_BRACKETS_UP_TO])  # short: brackets counted; long: walked
def test_depth_limit_agrees_with_the_walk(data: object, as_text: bool, pad: int) -> None:
    raw = orjson.dumps({"type": "publish", "room": "r", "data": data, "pad": "x" * pad})
    message: bytes | str = raw.decode() if as_text else raw
    if protocol.json_depth(data) <= 4:
        assert parse(message, max_depth=4).data == data
    else:
        with pytest.raises(MessageError) as info:
            parse(message, max_depth=4)
        assert info.value.code == "bad_message"


def _nesting(value: object) -> int:
    """The definition json_depth implements, recursively."""
    if isinstance(value, dict):
        return 1 + max((_nesting(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_nesting(v) for v in value), default=0)
    return 0


def test_json_depth_is_the_nesting_depth() -> None:
    # Flat containers take a shortcut; anything holding a container takes the walk.
    rng = random.Random(7)

    def build(level: int) -> object:
        kind = rng.randrange(4 if level < 6 else 2)
        if kind == 0:
            return rng.choice([1, "s", None, 2.5, True])
        if kind == 1:
            return "{[" * rng.randrange(3)
        items = [build(level + 1) for _ in range(rng.randrange(5))]
        return items if kind == 2 else {str(i): item for i, item in enumerate(items)}

    for data in [{}, [], {"a": 1, "b": "x"}, [1, "a", None], {"a": 1, "b": []}, [1, 2, {"c": [3]}], *(
            build(0) for _ in range(3000))]:
        assert protocol.json_depth(data) == _nesting(data), data


def test_error_message_shape() -> None:
    assert orjson.loads(protocol.error("bad_room", "no", "i1")) == {
        "type": "error", "code": "bad_room", "message": "no", "id": "i1"}
    assert protocol.pong() == b'{"type":"pong"}'
    assert protocol.pong(7) == b'{"type":"pong","id":7}'


def test_message_parts_splice_to_the_whole_message() -> None:
    head, tail = protocol.message_parts("lobby", "alice", 1700000000000, {"text": "hé"})
    whole = head + b"42" + tail
    assert orjson.loads(whole) == {"type": "message", "room": "lobby", "seq": 42, "from": "alice",
                                   "ts": 1700000000000, "data": {"text": "hé"}}
    assert whole == orjson.dumps(orjson.loads(whole))
