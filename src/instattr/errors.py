"""Errors a user can cause; the CLI prints their one-line message and exits with code 2."""


class InstattrError(ValueError):
    """Base of every user-facing error (bad data, bad run, bad option)."""


class DataError(InstattrError):
    """Bad input data; the message is one line naming the file and line."""


class RunError(InstattrError):
    """A run directory is missing, incomplete or inconsistent; one-line message."""
