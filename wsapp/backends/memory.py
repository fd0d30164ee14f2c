"""In-process broker: the default, for a single process (no Redis)."""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque

from wsapp.backends import Deliver, Published, RelayFrames, RoomView, Seq


class _RoomLog:
    __slots__ = ("epoch", "messages", "seq")

    def __init__(self, keep: int) -> None:
        self.seq = 0
        # A room forgotten and made again (idle eviction, a restart) numbers from 1 in a new epoch.
        self.epoch = secrets.token_hex(6)
        self.messages: deque[tuple[int, bytes]] = deque(maxlen=keep)


class MemoryBackend:
    """Sequence numbers, epochs and a capped history per room, in this process's memory.

    Rooms nobody is in keep their history so a reconnecting client can catch up, but only the
    `max_idle_rooms` most recently emptied ones: room names come from clients, memory must not.
    Delivery is synchronous: `publish` hands the message to the hub before it returns.
    """

    name = "memory"
    inline = True

    def __init__(self, history: int, max_idle_rooms: int = 10000) -> None:
        self._keep = history
        self._max_idle = max_idle_rooms
        self._rooms: dict[str, _RoomLog] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._deliver: Deliver | None = None

    @property
    def healthy(self) -> bool:
        return True

    @property
    def counters(self) -> dict[str, int]:
        return {}

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def attach_relay(self, deliver: RelayFrames) -> RelayFrames | None:
        return None

    def close(self) -> None:
        """Nothing runs in the background."""

    def publish(self, room: str, head: bytes, tail: bytes, origin: str | None) -> Seq:
        log = self._log(room)  # next_seq and append in one lookup: this runs for every message
        seq = log.seq = log.seq + 1
        payload = b"%s%d%s" % (head, seq, tail)
        if self._keep:
            log.messages.append((seq, payload))
        if self._deliver is not None:
            self._deliver(room, seq, origin, payload)
        return Seq(seq, log.epoch)

    def publish_nowait(self, room: str, head: bytes, tail: bytes, origin: str | None, done: Published) -> None:
        done(self.publish(room, head, tail, origin), None)

    def join(
        self, room: str, member_id: str, name: str, presence: bytes | None, since: int | None, epoch: str | None
    ) -> RoomView:
        log = self._log(room)
        view = RoomView(log.seq, epoch=log.epoch)
        if since is not None:
            if epoch is not None and epoch != log.epoch:
                view.history_gone = True  # numbers from another life of the room: nothing to replay
            else:
                view.replay, view.history_gone = self.since(room, since)
        if presence is not None and self._deliver is not None:
            self._deliver(room, 0, member_id, presence)
        return view

    def leave(self, room: str, member_id: str, presence: bytes) -> bool:
        if self._deliver is not None:
            self._deliver(room, 0, member_id, presence)
        return True

    def _log(self, room: str) -> _RoomLog:
        log = self._rooms.get(room)
        if log is None:
            log = self._rooms[room] = _RoomLog(self._keep)
        self._idle.pop(room, None)
        return log

    def next_seq(self, room: str) -> int:
        log = self._log(room)
        log.seq += 1
        return log.seq

    def current_seq(self, room: str) -> int:
        log = self._rooms.get(room)
        return log.seq if log else 0

    def append(self, room: str, seq: int, payload: bytes) -> None:
        if self._keep:
            self._log(room).messages.append((seq, payload))

    def since(self, room: str, seq: int) -> tuple[list[bytes], bool]:
        log = self._rooms.get(room)
        if log is None:
            return [], seq > 0
        if seq > log.seq:
            # The client saw numbers this room never reached: the room was forgotten and restarted.
            return [payload for _, payload in log.messages], True
        missed = [payload for s, payload in log.messages if s > seq]
        oldest_kept = log.messages[0][0] if log.messages else log.seq + 1
        gone = seq + 1 < oldest_kept and seq < log.seq
        return missed, gone

    def room_emptied(self, room: str) -> None:
        if room not in self._rooms:
            return
        self._idle[room] = None
        while len(self._idle) > self._max_idle:
            old, _ = self._idle.popitem(last=False)
            del self._rooms[old]
