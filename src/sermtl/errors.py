"""Errors shared by every step, and the one place that strips credentials from what users see.

Exit codes of the CLI (README, "Exit codes"): 0 done, 1 refused by policy or validation failed,
2 bad input (parameters, corpus, output folder), 3 a concurrent change won, 4 a service could not be reached.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_CONFLICT = 3
EXIT_UNREACHABLE = 4

_URI_IN_TEXT = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)([^/\s@'\"]+)@")


def redact_uri(uri: str) -> str:
    """`uri` without user-info (`http://user:pw@host` -> `http://host`): credentials stay in the process."""
    if not isinstance(uri, str) or "@" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact_text(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def redact_text(text: str) -> str:
    """Every `scheme://user:pw@` inside free text (an error message, a log line) without its user-info."""
    return _URI_IN_TEXT.sub(r"\1", text)


class ServiceUnreachable(RuntimeError):
    """A service (MLflow, S3) gave no answer within its retry budget; the message names it, no secrets."""

    def __init__(self, service: str, target: str, detail: str = "") -> None:
        self.service = service
        self.target = redact_uri(target)
        message = f"could not reach {service} at {self.target}"
        if detail:
            message += f": {redact_text(detail)}"
        super().__init__(message)
