"""Log formats of the coordinator: ``text`` (one readable line) or ``json`` (one object per
line), chosen by ``Settings.log_format`` (``FEDGE_LOG_FORMAT``). Standard library only.

A record's fields are whatever the caller passed as ``extra=`` (``event``, ``task``,
``round``, ``device``, ...). The JSON line holds ``time`` (UTC, ISO 8601), ``level``,
``logger``, ``message``, those fields and, for an exception, ``exc_info`` (the traceback as
text). The text line is uvicorn's console layout (``INFO:     message``) followed by
``key=value`` for each field. uvicorn's
access lines are records of ``uvicorn.access`` and get the same treatment.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

#: Attributes every ``LogRecord`` has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "color_message", "taskName"}
)

FORMATS = ("text", "json")


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields passed with ``extra=`` (in the order given)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            out.setdefault(key, _plain(value))
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``LEVEL:    message key=value ...``: uvicorn's console layout, plus the fields."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname + ':':<9} {record.getMessage()}"
        fields = " ".join(f"{k}={_text(v)}" for k, v in record_fields(record).items())
        return f"{line} {fields}" if fields else line


def _text(value: Any) -> str:
    plain = _plain(value)
    if isinstance(plain, str) and plain and not any(c in plain for c in ' "='):
        return plain
    return json.dumps(plain, ensure_ascii=False)


def console_line(fmt: str, message: str, *, level: str = "info") -> str:
    """A line ``fedge coordinator serve`` prints itself (its URL, warnings before logging
    is set up), in format ``fmt``: the plain message, or a JSON object like a log record's."""
    if fmt != "json":
        return message
    record = logging.LogRecord(
        "fedge.coordinator.server", logging.getLevelName(level.upper()), "", 0, message, (), None
    )
    return JsonFormatter().format(record)


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` configuration: uvicorn's loggers and the
    coordinator's on one stderr handler in format ``fmt`` (``text`` or ``json``)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    handler = {"class": "logging.StreamHandler", "formatter": "fedge", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"fedge": {"()": formatter}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "fedge.coordinator": logger,
        },
    }
