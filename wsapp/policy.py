"""Who may do what in which room, and what a publish becomes: the `authorize` and `on_publish` hooks.

No I/O, no Flask: the rooms session and `ws.join`/`ws.publish` ask a Policy; the `Realtime`
extension fills it from `@rt.authorize` and `@rt.on_publish`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wsapp import protocol
from wsapp.auth import Identity
from wsapp.exceptions import Reject

Authorize = Callable[[Any, str, str], bool]
OnPublish = Callable[[Any, str, Any], Any]

JOIN = "join"
PUBLISH = "publish"


class Policy:
    """The app's hooks; with none set, anyone may join and publish anywhere and data goes as sent."""

    def __init__(self) -> None:
        self.authorize: Authorize | None = None
        self.on_publish: OnPublish | None = None

    def check(self, identity: Any, action: str, room: str, msg_id: object = None) -> None:
        """Raise Reject(`forbidden`) unless `identity` may `action` ("join" or "publish") in `room`.

        A token's `rooms` claim (an Identity with rooms) limits joins before the app's hook is asked."""
        if action == JOIN and isinstance(identity, Identity) and identity.rooms is not None \
                and room not in identity.rooms:
            raise Reject(protocol.FORBIDDEN, f"your token does not allow room {room!r}", msg_id)
        if self.authorize is not None and not self.authorize(identity, action, room):
            raise Reject(protocol.FORBIDDEN, f"not allowed to {action} in room {room!r}", msg_id)

    def filter(self, identity: Any, room: str, data: Any, msg_id: object = None) -> Any:
        """What `data` becomes before it is numbered and sent (the `on_publish` hook may raise Reject)."""
        if self.on_publish is None:
            return data
        try:
            return self.on_publish(identity, room, data)
        except Reject as exc:
            if exc.msg_id is None:
                exc.msg_id = msg_id
            raise
