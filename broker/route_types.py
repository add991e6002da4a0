"""What a row of the route table (``broker.routes``) is made of: an operation, its query
parameters and documented answers, and the settings (:class:`Limits`) the document shows.
Nothing here imports aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from broker.config import Settings
from broker.request_bodies import RequestBody
from broker.schemas import ProblemCode

__all__ = ["Limits", "Operation", "Param", "Permission", "Reply"]

Permission = Literal["tokens:read", "grants:write", "grants:read"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings the contract shows."""

    default_min_ttl: int
    max_min_ttl: int
    max_body_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.default_min_ttl, settings.max_min_ttl, settings.max_body_bytes)


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter; ``schema`` may depend on the running settings."""

    name: str
    description: str
    schema: Mapping[str, Any] | Callable[[Limits], Mapping[str, Any]]
    required: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """A documented answer other than a problem: a JSON ``model``, or another ``media`` type
    with its ``schema``, or no body; ``headers`` are names from the document's header
    components (``X-Request-Id`` is on every answer)."""

    description: str
    model: type[BaseModel] | None = None
    media: str = "application/json"
    schema: Mapping[str, Any] | None = None
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """One route. ``path`` is aiohttp's pattern (``{user_id:[^/]*}``); ``permission`` None
    means public, no API key. ``problems`` are the error codes it may answer besides those
    every protected operation may (``unauthenticated``, ``forbidden``) and every operation
    with a ``body`` may (``invalid_request``, ``payload_too_large``)."""

    operation_id: str
    method: str
    path: str
    tag: str
    summary: str
    description: str
    permission: Permission | None
    replies: Mapping[int, Reply]
    problems: tuple[ProblemCode, ...] = ()
    query: tuple[Param, ...] = ()
    body: type[RequestBody] | None = None

    def codes(self) -> tuple[ProblemCode, ...]:
        """Every problem code this operation may answer."""
        implied: list[ProblemCode] = []
        if self.permission is not None:
            implied += ["unauthenticated", "forbidden", "rate_limited"]
        if self.body is not None:
            implied += ["invalid_request", "payload_too_large"]
        return tuple(dict.fromkeys([*self.problems, *implied]))
