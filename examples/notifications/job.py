"""Notify a user from outside the web server: a cron job, a Celery task, a script.

    REDIS_URL=redis://127.0.0.1:6379/0 python -m examples.notifications.job alice "Your report is ready"

`wsapp.Emitter` writes to the Redis the server uses, with the same numbering and history as a publish
inside the server: the user's page shows it at once, or when it next joins with `since`.
"""

from __future__ import annotations

import argparse
import os
import sys

from examples.notifications.rooms import clean_text, user_room
from wsapp import Emitter


def notify(emitter: Emitter, user: str, text: str) -> int:
    """Publish `text` to `user`'s private room; returns the seq it got there."""
    return int(emitter.publish(user_room(user), {"text": text, "kind": "job"}, sender="job"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send a user a notification through wsapp's Emitter.")
    parser.add_argument("user", help="who gets it (their page is in room user:<user>)")
    parser.add_argument("text", help="what it says (1-500 characters)")
    args = parser.parse_args(argv)
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        parser.error("REDIS_URL must point at the Redis the server uses")
    try:
        room = user_room(args.user)
    except ValueError as exc:
        parser.error(str(exc))
    text = clean_text(args.text)
    if text is None:
        parser.error("the text must be 1-500 characters")
    # The servers' WSAPP_HISTORY: every publish trims the room's history to this length.
    history = int(os.environ.get("WSAPP_HISTORY", "100"))
    with Emitter(redis_url, history=history) as emitter:
        seq = notify(emitter, args.user, text)
    print(f"notified {args.user}: seq {seq} in {room}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
