"""Structured logs: every line about a drain, a VM or a migration carries them as fields.

``virtshift run --log-format json`` writes one JSON object per line (``time``, ``level``,
``logger``, ``message``, and ``drain``, ``policy``, ``vm``, ``migration``, ``node`` when the
line is about one); ``text`` (the default) appends them as ``key=value``. Fields come from
``extra={...}`` on the call, or from ``context(...)`` around a block (a reconcile pass), so
every line inside it says which drain it is about.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
from collections.abc import Iterator

FIELDS = ("drain", "policy", "vm", "migration", "node")
_context: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "virtshift_log_context", default=())


@contextlib.contextmanager
def context(**fields: str | None) -> Iterator[None]:
    """Fields for every log line written inside the block (this thread / task only)."""
    merged = {**dict(_context.get()), **{k: v for k, v in fields.items() if v}}
    token = _context.set(tuple(merged.items()))
    try:
        yield
    finally:
        _context.reset(token)


def fields_of(record: logging.LogRecord) -> dict[str, str]:
    out = dict(_context.get())
    for key in FIELDS:
        value = getattr(record, key, None)
        if value:
            out[key] = str(value)
    return out


class _WithContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.virtshift_fields = fields_of(record)
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "virtshift_fields", None) or fields_of(record))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = getattr(record, "virtshift_fields", None) or fields_of(record)
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return head + "".join(f" {k}={v}" for k, v in extra.items()) + sep + tail


def setup(fmt: str = "text", level: int = logging.INFO) -> None:
    """Configure the root logger (kopf's loggers included) for ``fmt``: json or text."""
    if fmt not in ("json", "text"):
        raise ValueError(f"--log-format must be json or text, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(_WithContext())
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
