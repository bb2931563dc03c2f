"""The serve package's errors, each with the HTTP status the app answers it with."""
from __future__ import annotations

from ..errors import InstattrError


class NotFound(InstattrError):
    """A method, split or row that the run does not have (HTTP 404)."""

    status = 404


class BadInput(InstattrError):
    """A filter, sort key, text or option that is malformed or out of range (HTTP 422)."""

    status = 422


class Unavailable(InstattrError):
    """Live explanation cannot run on this run, e.g. its model cannot be loaded here (HTTP 503)."""

    status = 503


class TooMany(InstattrError):
    """Too many live explanations are waiting already (HTTP 429): try again shortly."""

    status = 429
