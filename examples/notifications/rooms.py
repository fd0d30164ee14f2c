"""Room names and notification texts: what the web app and the jobs publishing into it agree on."""

from __future__ import annotations

import re

# User names make room names (`user:<name>`), so they keep to the rooms protocol's characters.
USER_RE = re.compile(r"[a-z0-9_.-]{1,32}")
ANNOUNCEMENTS = "announcements"
MAX_TEXT = 500


def user_room(user: str) -> str:
    """The private room of `user`: only they may join it, only the server publishes to it."""
    if not USER_RE.fullmatch(user):
        raise ValueError(f"user names are 1-32 characters of a-z 0-9 _ . -, not {user!r}")
    return f"user:{user}"


def clean_text(text: object) -> str | None:
    """A notification's text without surrounding blanks, or None unless that is 1-500 characters."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text if 0 < len(text) <= MAX_TEXT else None
