"""Logging: one line per event, `key=value` (default) or JSON; secrets never reach a log line.

Log calls use the convention `log.info("event=name key=%s", value)`; the `kv` formatter prefixes
time, level and logger, the `json` formatter turns the key=value pairs into fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


class Redactor(logging.Filter):
    """Replaces known secret strings (tokens, DSN passwords) with *** in every record.

    Every configured secret is hidden, however short: a short password is still a password (its
    occurrences in unrelated words are hidden too; that is the price of a short secret).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
            if record.exc_info and record.exc_info[1] is not None:
                text = logging.Formatter().formatException(record.exc_info)
                for secret in self.secrets:
                    text = text.replace(secret, "***")
                record.exc_text, record.exc_info = text, None
        return True


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} logger={record.name} "
        line += record.getMessage()
        if record.exc_info or record.exc_text:
            exc = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
            line += " exc=" + json.dumps(exc)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        for key, value in _PAIR.findall(message):
            fields[key] = json.loads(value) if value.startswith('"') else value
        if not _PAIR.search(message):
            fields["msg"] = message
        if record.exc_info or record.exc_text:
            fields["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(fields, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "kv", secrets: Iterable[str] = ()) -> None:
    """Configure the root logger for the daemon (stderr, which journald collects)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(Redactor(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log request URLs would print the bot token (it is part of the URL).
    for noisy in ("httpx", "httpcore", "hpack", "telegram", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quote(value: object) -> str:
    """Quote a value for a key=value line when it has spaces or quotes."""
    text = str(value)
    if text and not re.search(r'[\s"=]', text):
        return text
    return json.dumps(text, ensure_ascii=False)
