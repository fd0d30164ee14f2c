"""Notifications: session-cookie login, a private room per user, a background job publishing with the Emitter."""
