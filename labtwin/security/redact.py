"""Secrets out of every line a person or a file will read: URLs, DSNs and free text that carries them.

One function for every printed, logged or audited string, so no command can forget: the password in
``scheme://user:password@host`` becomes ``***``; ``password=...`` in a libpq key/value DSN too.
"""

from __future__ import annotations

import re

# The password runs to the URL's last '@': a typed "p@ss" or "a/b" is often not percent-encoded, and hiding
# too much of a URL is the safe mistake.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*):(?P<secret>\S*)@(?=[^\s@]*(?:\s|$))")
# key=value (libpq DSNs, LABTWIN_BROKER_PASSWORD=..., PGPASSWORD=...), key: value (YAML), "key": "value" (JSON);
# not password_file: a path is no secret.
_KV_PASSWORD = re.compile(
    r"""(?P<head>(?:\b|_|(?<=PG))(?:password|passwd|pwd|sslpassword)["']?\s*[=:]\s*)(?P<secret>"[^"]*"|'[^']*'|[^\s&;,}]+)""",
    re.I,
)
MASK = "***"


def redact_url(url: str | object) -> str:
    """A URL or DSN with its password replaced by ***; everything else as it was."""
    return redact(str(url))


def redact(text: str) -> str:
    """Text with every URL password and every ``password=`` value replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}", text)
