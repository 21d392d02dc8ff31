"""Errors of the wire contract, shared by servers and clients.

Every rejected request maps to one ``ProtocolError``: an HTTP status, a stable ``code`` for programs, a
``message`` for people and the ``field`` (dotted path such as ``images.3.data``) that caused it, if any.
"""

from __future__ import annotations

from typing import Any

MASK = "*" * 10  # written in place of a secret (a URL's password; older config.json files: the token)


def redact_url(url: str) -> str:
    """``url`` with its userinfo's secret masked (``http://user:**********@host``; a user part alone, which may
    be a token, ``http://**********@host``): what any message, log or written config shows; requests still go
    to the real URL. Works on URLs that do not parse too, since the messages that reject those quote them."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    # The userinfo ends at the last @ of the whole URL, not of the authority: a password may hold an unencoded
    # /, ? or #, which a URL parser takes as the end of the authority (the password would then show as a path).
    # An @ in a path or query masks more than the userinfo: too much for a message, never too little.
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{f'{user}:{MASK}' if colon else MASK}@{host}"


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries a userinfo (``user@``, ``user:password@``), which httpx sends as Basic auth."""
    scheme, sep, rest = url.partition("://")
    return bool(sep) and "@" in rest


class ProtocolError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field

    def to_wire(self) -> dict[str, Any]:
        from protocol.schema import VERSION

        return {"version": VERSION, "error": {"code": self.code, "message": self.message, "field": self.field}}

    @classmethod
    def from_validation(cls, exc: Any, prefix: str = "") -> "ProtocolError":
        """The first problem of a pydantic ValidationError, with its location as a dotted field path."""
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(part) for part in first["loc"] if part != "__root__")
        message = first["msg"].removeprefix("Value error, ")
        field = ".".join(p for p in (prefix, loc) if p) or None
        # A model-level check reports its own field at the start of its message ("images.2: ...").
        if first["type"] == "value_error" and ": " in message and " " not in message.split(": ", 1)[0]:
            inner, message = message.split(": ", 1)
            field = ".".join(p for p in (field, inner) if p)
        return cls(422, "invalid_request", message, field)


class RewardServerError(RuntimeError):
    """A reward server refused a request or failed; carries what the server said."""

    def __init__(
        self, url: str, status: int, code: str, message: str, field: str | None = None, retry_after: float | None = None
    ):
        where = f" (field {field})" if field else ""
        super().__init__(f"reward server {redact_url(url)} answered {status} {code}: {message}{where}")
        self.url, self.status, self.code, self.message, self.field = url, status, code, message, field
        self.retry_after = retry_after  # seconds the server asked us to wait (429/503)

    @property
    def retryable(self) -> bool:
        """Only "busy" is worth another try: 429 and 503 (overloaded, loading, draining). Anything else the
        server said, a scorer error included, would be said again: the run must hear it at once."""
        return self.status in (429, 503)


class Unreachable(ConnectionError):
    """Nothing answered at a reward server's URL (refused, timed out, reset, a reply that is not HTTP):
    ``reason`` says which, as "ConnectError: [Errno 111] Connection refused"."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"reward server {redact_url(url)} unreachable ({reason})")
        self.url, self.reason = url, reason


def cli_message(exc: Any, kebab: bool = False) -> str:
    """A pydantic ValidationError of command-line settings as '--flag: problem' lines."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        flag = "--" + (field.replace("_", "-") if kebab else field)
        lines.append(f"{flag}: {message}" if field else message)
    return "\n".join(lines)
