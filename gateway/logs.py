"""Logging: one JSON object per line, and the one line every API request gets.

Request lines carry ids, owner, model, status, tokens and latencies. Prompts appear
only when `server.log_prompts` is true; credentials never (keys are hashed before
anything sees them, and provider keys never leave their provider object).

Whoever logs a line, it passes through one redaction step (gateway.redact) in the
handler `setup_logging` installs: ours, aiohttp's, asyncio's, any library's. aiohttp's
server logger, for one, puts a malformed request's header line, key and all, into the
traceback of its "Error handling request" line. Python's own reports (warnings,
uncaught and unraisable exceptions) are routed through the same handler.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from gateway import jsonlines
from gateway.redact import redact

REQUEST_LOGGER = "gateway.request"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# A record's message, exception and stack are redacted up to this length each and cut
# past it: a long traceback fits, and the largest text costs some 10 ms to redact.
LOG_LIMIT_CHARS = 64 * 1024
# Set on a record once redacted, so a second handler does not redact it again.
_REDACTED = "gateway_redacted"

# Request-line fields whose values the gateway made itself: its ids, names from its own
# configuration, figures and codes from fixed sets. They skip redaction: a regular
# expression over every value would cost more than writing the line.
_OWN_FIELDS = frozenset(
    {
        "request_id", "route", "status", "latency_ms", "key_id", "user", "team", "model",
        "provider", "upstream_model", "upstream_status", "attempts", "stream",
        "prompt_tokens_estimated", "prompt_estimate_exact", "prompt_tokens",
        "completion_tokens", "usage_source", "upstream_latency_ms", "error_code", "error_detail",
    }
)  # fmt: skip
# The request line's fields the caller chose: redacted, as is any field in neither set.
_CALLER_FIELDS = frozenset({"method", "client_request_id", "client_address", "prompt"})
_KNOWN_FIELDS = _OWN_FIELDS | _CALLER_FIELDS
# No secret redact() knows is shorter than "key=x": "GET" and "POST" need no scan.
_SHORTEST_SECRET = 5


def redact_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with every value not in _OWN_FIELDS redacted (the same dict if none changed).

    A request line's usual fields cost 0.6 µs here (7,600 instructions: 0.4 % of the
    2.05 million a chat request costs), as only the method may need a scan; a scan of
    every value would cost 10 µs, of the encoded line 70 µs (on a machine where the line
    itself took 8.5).
    """
    names = _CALLER_FIELDS if fields.keys() <= _KNOWN_FIELDS else fields.keys() - _OWN_FIELDS
    redacted = fields
    for name in names:
        value = fields.get(name)
        if value is None or (type(value) is str and len(value) < _SHORTEST_SECRET):
            continue
        clean = _redact_value(value)
        if clean is not value:
            if redacted is fields:
                redacted = dict(fields)
            redacted[name] = clean
    return redacted


def _redact_value(value: Any) -> Any:
    """The value itself if nothing in it changed; strings inside containers are redacted too."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) < _SHORTEST_SECRET:
            return value
        clean = redact(value, LOG_LIMIT_CHARS)
        return value if clean == value else clean
    if isinstance(value, dict):
        items = {key: _redact_value(item) for key, item in value.items()}
        return value if all(items[key] is value[key] for key in value) else items
    if isinstance(value, (list, tuple)):
        cleaned = [_redact_value(item) for item in value]
        return value if all(a is b for a, b in zip(cleaned, value, strict=True)) else cleaned
    return _redact_value(str(value))


def redact_record(record: logging.LogRecord, formatter: logging.Formatter) -> None:
    """Secrets out of everything a formatter writes of `record`, in place and once.

    The message is merged with its arguments first (a key usually arrives as one), and
    the exception and stack texts are made here: formatters reuse `exc_text` once set.
    """
    if getattr(record, _REDACTED, False):
        return
    try:
        message = record.getMessage()
    except Exception as exc:  # a format and arguments that do not fit: keep both, redacted
        message = f"{record.msg} % {record.args!r} (the arguments do not fit: {exc})"
    record.msg = redact(message, LOG_LIMIT_CHARS)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text, LOG_LIMIT_CHARS)
    if record.stack_info:
        record.stack_info = redact(record.stack_info, LOG_LIMIT_CHARS)
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        record.fields = redact_fields(fields)
    setattr(record, _REDACTED, True)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return encode_line(line)


def encode_line(line: dict[str, Any]) -> str:
    """One log line's JSON text (see gateway.jsonlines for what it makes of odd values)."""
    return jsonlines.dumps(line).decode()


class RedactingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes records to stderr, each redacted before its formatter sees it."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(formatter)

    def format(self, record: logging.LogRecord) -> str:
        redact_record(record, self.formatter or logging.Formatter())
        return super().format(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # logging's report of a failed write repeats the message and its arguments.
        if not getattr(record, _REDACTED, False):
            record.msg, record.args = "(a log record that could not be written)", None
        super().handleError(record)


class TextHandler(RedactingHandler):
    """Plain lines: time, level, logger, message (and the traceback, if any)."""

    def __init__(self) -> None:
        super().__init__(logging.Formatter(TEXT_FORMAT))


class JsonLinesHandler(RedactingHandler):
    """The JSON handler, which can also write a request line without a LogRecord.

    Every API request logs one line; through the logging machinery (a LogRecord, the
    caller's frame looked up, a datetime formatted) that cost three times the JSON
    encoding itself. `write_line` writes the very same line directly.
    """

    def __init__(self) -> None:
        super().__init__(JsonFormatter())
        self._second = -1
        self._second_text = ""
        self._fd = _file_descriptor(self.stream)

    def setStream(self, stream: Any) -> Any:
        with self.lock or contextlib.nullcontext():
            self._fd = _file_descriptor(stream)
        return super().setStream(stream)

    def write_line(self, level: str, logger: str, message: str, fields: dict[str, Any]) -> None:
        """`level`, `logger` and `message` are the gateway's own words; `fields` are redacted."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        stamp = f"{self._second_text}.{int((now - second) * 1000):03d}+00:00"
        line = {"time": stamp, "level": level, "logger": logger, "message": message, **redact_fields(fields)}
        data = jsonlines.dumps(line)
        self.acquire()
        try:
            if self._fd is None:
                self.stream.write(data.decode() + self.terminator)
                self.flush()
            else:
                # The bytes straight to the file (half the time of the text layer's write and
                # flush), after whatever went through the text layer.
                self.stream.flush()
                _write_all(self._fd, data + self.terminator.encode())
        finally:
            self.release()


def _file_descriptor(stream: Any) -> int | None:
    """The descriptor under a text stream of a real file or pipe (stderr), else None."""
    if not isinstance(stream, io.TextIOWrapper):
        return None
    try:
        return stream.fileno()
    except (OSError, ValueError):
        return None


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a pipe may take a long line in parts)."""
    written = os.write(fd, data)
    while written < len(data):
        data = data[written:]
        written = os.write(fd, data)


def setup_logging(level: str, json_lines: bool) -> None:
    """One redacting handler on the root logger, and Python's own reports routed to it."""
    handler = JsonLinesHandler() if json_lines else TextHandler()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


# Python writes these three to stderr itself, past any handler, unless told otherwise.
_uncaught_log = logging.getLogger("gateway.uncaught")


def _log_uncaught(kind: type[BaseException], exc: BaseException, traceback: TracebackType | None) -> None:
    _uncaught_log.critical("uncaught exception", exc_info=(kind, exc, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # as threading's own hook: a thread's way to end
        return
    name = args.thread.name if args.thread is not None else "?"
    _uncaught_log.error("uncaught exception in thread %s", name, exc_info=args.exc_value)


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    # The object may be being finalized: described now, not kept on the record.
    described = unraisable.err_msg or "Exception ignored in"
    if unraisable.object is not None:
        try:
            described = f"{described}: {unraisable.object!r}"
        except Exception:
            described = f"{described}: <{type(unraisable.object).__name__} object>"
    _uncaught_log.error("%s", described, exc_info=unraisable.exc_value)


def log_request(fields: dict[str, Any]) -> None:
    logger = _REQUEST_LOG
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _direct_handler(logger)
    if handler is None:
        logger.info("request", extra={"fields": fields})
        return
    try:
        handler.write_line("info", REQUEST_LOGGER, "request", fields)
    except Exception:
        logger.info("request", extra={"fields": fields})  # logging reports what went wrong


# Looked up once: getLogger takes logging's lock on every call.
_REQUEST_LOG = logging.getLogger(REQUEST_LOGGER)


def _direct_handler(logger: logging.Logger) -> JsonLinesHandler | None:
    """The JSON handler, if it alone would handle the request line, unfiltered."""
    root = logging.root
    if logger.handlers or logger.filters or not logger.propagate or root.filters or len(root.handlers) != 1:
        return None
    handler = root.handlers[0]
    if type(handler) is not JsonLinesHandler or handler.filters or handler.level > logging.INFO:
        return None
    return handler
