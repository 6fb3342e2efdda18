"""The contract's error envelope: ``{"message": "<Error> ...", "status": "failure"}``."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error reply: 4xx for the caller's mistakes, 5xx for the balancer's own trouble."""

    headers: tuple[tuple[str, str], ...] = ()  # header fields of the reply (Retry-After)

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return envelope(self.message)


def sentence(text: str) -> str:
    """``text`` with a capital first letter, to open an error message."""
    return text[:1].upper() + text[1:]


def envelope(message: str) -> dict[str, Any]:
    return {"message": f"<Error> {message}", "status": "failure"}


def success(message: Any) -> dict[str, Any]:
    return {"message": message, "status": "successful"}
