"""Storage errors. Every message names the URI or file it is about and never contains a secret."""

from __future__ import annotations


class StorageError(RuntimeError):
    """A storage operation failed (bad URI, unreachable endpoint, denied access, conflicting publish...)."""


class NotFoundError(StorageError, FileNotFoundError):
    """The URI does not exist. Also a `FileNotFoundError`, so `except FileNotFoundError` catches it."""

    def __str__(self) -> str:  # FileNotFoundError would print its errno fields; keep the plain message
        return str(self.args[0]) if self.args else ""


class IntegrityError(StorageError):
    """A manifested file is missing or its size / SHA-256 differs from its manifest entry."""


class NotPublishedError(StorageError):
    """The URI has no manifest: nothing was published there, or its publish never finished."""
