"""Credentials never leave in a printed or logged URI.

`mask_uri("http://user:pw@host/")` -> `"http://user:***@host/"`; `redact(text)` does the same to every URI in
a text (and to `?password=`-style query values); `RedactingFilter` applies it to every log record of the
handlers it is attached to (`install_log_redaction()` attaches it to the root logger's handlers).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

# scheme://user:password@  (the password is anything up to the last '@' before the host part)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):(?P<pw>[^\s/@]*)@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd|token|secret|access_token|api_key)=)[^&\s]*")


def has_credentials(uri: str | None) -> bool:
    """Whether a URI carries a password (`scheme://user:pw@host`) or a secret query parameter."""
    if not uri:
        return False
    try:
        return urlsplit(uri).password is not None or bool(_QUERY_SECRET.search(uri))
    except ValueError:
        return bool(_USERINFO.search(uri))


def redact(text: str) -> str:
    """`text` with every URI password and secret query value replaced by `***`."""
    if not text or ("://" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)


mask_uri = redact


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with `redact` (arguments are merged into the message first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach a RedactingFilter to every handler of `logger` (default: the root logger), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
