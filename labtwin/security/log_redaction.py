"""Every log record of the process redacted before any handler sees it: a library that logs a URL cannot leak it.

labtwin's own lines print URLs without their passwords, but its libraries do not know what a secret is:
SQLAlchemy, psycopg, amqtt and Prefect may log a URL, an exception naming one, or a traceback. Prefect
also ships flow-run log records to its API, which stores them in its database. A filter on the handlers
that exist when the CLI sets logging up would miss those: Prefect configures its own handlers (its
console and API handlers) when it is imported, later. So the redaction sits in the log record factory,
which every logger of the process uses whatever handler it ends at; ``RedactingFilter`` does the same for
a handler someone adds themselves, and is put on the root logger's handlers.

A record's message is formatted once, at creation, and stored redacted with no arguments left; its
traceback text (``exc_text``) and stack are formatted and redacted then too, so a formatter only reuses them.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from labtwin.security.redact import redact

_MARK = "_labtwin_redacts"


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its message, traceback and stack redacted (in place); returned for chaining."""
    if getattr(record, _MARK, False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # arguments that do not fit the format: logging would print both; print both, redacted
        message = f"{record.msg} % {record.args!r}"
    record.msg, record.args = redact(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    setattr(record, _MARK, True)
    return record


class RedactingFilter(logging.Filter):
    """A handler filter that redacts what passes (and drops nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def install_log_redaction() -> None:
    """Redact every record this process makes from now on, and what the root logger's handlers pass.

    Idempotent: a second call (another command in the same process, a test) changes nothing."""
    previous = logging.getLogRecordFactory()
    if not getattr(previous, _MARK, False):

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return redact_record(previous(*args, **kwargs))

        setattr(factory, _MARK, True)
        logging.setLogRecordFactory(factory)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
