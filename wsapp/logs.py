"""Log output: text lines (default) or, with LOG_FORMAT=json, one JSON object per line.

Every line has `time` (UTC, ISO 8601), `level`, `logger`, `message` and `pid`; structured lines (the
access line of each HTTP request, the open and close lines of each WebSocket) add their fields,
passed as `extra={"fields": {...}}` and shown as `key=value` after the message in text mode. In JSON
mode everything the process writes goes through here: gevent's WSGI server errors, errors in
greenlets (gevent's hub prints them to stderr otherwise), warnings, uncaught exceptions and, under
gunicorn, its own loggers (`GunicornLogger`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson
from gunicorn.glogging import Logger as _GunicornBaseLogger

FORMATS = ("text", "json")
_CORE = ("time", "level", "logger", "message", "pid")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, pid, the record's fields, and the
    traceback as `exc_info` (a string) if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                out[f"field_{key}" if key in _CORE else key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """The usual text line, with the record's fields after the message as key=value."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={_text(value)}" for key, value in fields.items() if key != "event")
        return line


def _text(value: Any) -> str:
    text = str(value)
    return repr(text) if (not text or " " in text or "=" in text) else text


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def formatter(log_format: str, workers: int = 1) -> logging.Formatter:
    """The formatter for LOG_FORMAT (`text` shows the pid when there are several workers)."""
    if log_format == "json":
        return JsonFormatter()
    if workers > 1:
        return TextFormatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(level: str, log_format: str = "text", workers: int = 1) -> None:
    """The root logger writes to stderr in `log_format`; in JSON mode warnings, uncaught exceptions
    and errors of gevent's hub are logged too, so nothing else reaches stdout or stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, workers))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if log_format == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught


def route_gevent_errors() -> None:
    """Errors gevent's hub reports (a greenlet that died, an error in a loop callback) as log records
    instead of text on stderr. Call it in the serving process, after monkey-patching."""
    import gevent

    hub = gevent.get_hub()
    hub_log = logging.getLogger("gevent.hub")

    def print_exception(context: Any, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            where = context if isinstance(context, str) else hub.format_context(context)
        except Exception:
            where = repr(context)
        exc_info = (t, v, tb) if t is not None and v is not None else None
        hub_log.error("%s failed with %s", where, getattr(t, "__name__", "exception"), exc_info=exc_info)

    hub.print_exception = print_exception  # gevent: "set a property on the hub instance with this same signature"


def fatal(message: str) -> None:
    """A start-up error that stops the process (logging may not be set up yet): a JSON line if
    LOG_FORMAT=json, else `wsapp: <message>` as it always was."""
    if os.environ.get("LOG_FORMAT", "").lower() == "json":
        record = logging.LogRecord("wsapp.server", logging.CRITICAL, __file__, 0, message, None, None)
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(f"wsapp: {message}", file=sys.stderr)


def _log_uncaught(t: type[BaseException], v: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("wsapp").critical("uncaught exception", exc_info=(t, v, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    exc = args.exc_value or args.exc_type()
    logging.getLogger("wsapp").critical("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                                        exc_info=(args.exc_type, exc, args.exc_traceback))


class GunicornLogger(_GunicornBaseLogger):  # type: ignore[misc]
    """gunicorn's logger class with its records going to wsapp's handlers (LOG_FORMAT, LOG_LEVEL)
    instead of its own: `python server.py` with WEB_CONCURRENCY>1 uses it, and `gunicorn
    --logger-class wsapp.logs.GunicornLogger` does the same for the gunicorn command."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if not logging.getLogger().handlers:  # the gunicorn command: nobody set up logging yet
            level = os.environ.get("LOG_LEVEL", "INFO").upper()
            log_format = os.environ.get("LOG_FORMAT", "text").lower()
            setup_logging(level if isinstance(logging.getLevelName(level), int) else "INFO",
                          log_format if log_format in FORMATS else "text", int(cfg.workers or 1))
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True
