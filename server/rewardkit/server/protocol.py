"""Request and response pieces every endpoint family shares: the error shape, chat messages, usage, status, the
item-count check that runs before per-item validation, and the errors table of the OpenAPI schema. Each family's
own models are in its package (``native/``, ``openrlhf/``, ``vllm/``, ``r2m/``, ``ops/``).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

# The server's max_items_per_request for the request being parsed (set by the app's middleware). The list validators
# below check a list's length *before* pydantic validates its elements: 300k tiny items used to stall the event loop
# for seconds of per-item validation before the 413.
MAX_ITEMS: ContextVar[int | None] = ContextVar("rewardkit_max_items", default=None)


def check_count(v: Any, field: str) -> Any:
    """Refuse a list longer than ``max_items_per_request`` with 413, before its items are validated."""
    limit = MAX_ITEMS.get()
    if limit is not None and isinstance(v, list) and len(v) > limit:
        from rewardkit.server.errors import PayloadTooLarge

        raise PayloadTooLarge(f"{field}: {len(v)} items exceeds max_items_per_request={limit}", field=field)
    return v


def count_validator(*fields: str) -> Any:
    """A ``mode="before"`` validator for list fields: 413 past ``max_items_per_request``, before the items are
    validated. Use as ``_count = count_validator("items")`` in a request model."""

    def _check(cls: Any, v: Any, info: Any) -> Any:
        return check_count(v, info.field_name)

    return field_validator(*fields, mode="before")(classmethod(_check))


class ErrorInfo(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` table for these status codes (every error has the ErrorResponse shape)."""
    return {code: {"model": ErrorResponse} for code in codes}


ERRORS: dict[int | str, dict[str, Any]] = error_responses(401, 413, 422, 429, 503)  # a scoring route besides 200


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Usage(BaseModel):
    total_tokens: int


class Status(BaseModel):
    status: str
