"""The OpenAPI 3.1 document, generated from the route table (``broker.routes``) and the body
models (``broker.schemas``); never written by hand.

``document(limits)`` is what ``GET /openapi.json`` serves, with the running settings' limits;
``broker/openapi.json`` is ``render(default_limits())``, committed so the contract can be read
and reviewed without running anything (``broker openapi > broker/openapi.json`` rewrites it, and
a test fails when it is stale).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from broker import schemas
from broker.components import (
    EXAMPLE_REQUEST_ID,
    HEADER_COMPONENT,
    HEADERS,
    INFO,
    PATH_PARAMETER,
    PROBLEM_RESPONSE_OF,
    PROBLEM_RESPONSES,
    SECURITY_SCHEMES,
    TAGS,
    ProblemResponse,
    path_parameters,
)
from broker.config import load_settings
from broker.middlewares import PROBLEM_TYPE
from broker.routes import OPERATIONS, Limits, Operation, Reply

__all__ = ["ContractJsonSchema", "build", "default_limits", "document", "openapi_path", "render"]

SCHEMAS = "#/components/schemas/"


def openapi_path(route_path: str) -> str:
    """An aiohttp route pattern as an OpenAPI path: ``{user_id:[^/]*}`` becomes ``{user_id}``."""
    return re.sub(r"\{(\w+)(?::[^{}]*)?\}", r"{\1}", route_path)


def default_limits() -> Limits:
    """The limits of default settings (no file, no environment): the committed document's."""
    return Limits.of(load_settings(None, {}))


@functools.cache
def document(limits: Limits) -> bytes:
    """The served document for these limits, as UTF-8 JSON (built once per limits)."""
    return render(limits).encode("utf-8")


def render(limits: Limits) -> str:
    """The document as the committed ``broker/openapi.json`` holds it."""
    return json.dumps(build(limits), indent=2, ensure_ascii=False) + "\n"


def build(limits: Limits) -> dict[str, Any]:
    """The OpenAPI 3.1 document for these limits."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        path = openapi_path(op.path)
        item = paths.setdefault(path, {})
        names = re.findall(r"\{(\w+)\}", path)
        if names and "parameters" not in item:
            item["parameters"] = [_ref("parameters", PATH_PARAMETER[name]) for name in names]
        item[op.method.lower()] = _operation(op, limits)
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": INFO,
            "tags": TAGS,
            "paths": paths,
            "components": {
                "securitySchemes": SECURITY_SCHEMES,
                "parameters": path_parameters(),
                "headers": {HEADER_COMPONENT[name]: value for name, value in HEADERS.items()},
                "schemas": _schemas(),
                "responses": {r.name: _problem_response(r, limits) for r in PROBLEM_RESPONSES},
            },
        }
    )


def _operation(op: Operation, limits: Limits) -> dict[str, Any]:
    description = op.description
    if op.permission is not None:
        description = (
            f"Requires the `{op.permission}` permission for this provider.\n\n{description}"
        )
    result: dict[str, Any] = {
        "operationId": op.operation_id,
        "tags": [op.tag],
        "summary": op.summary,
        "description": description,
        "security": [] if op.permission is None else [{"apiKey": [op.permission]}],
    }
    if op.query:
        result["parameters"] = [
            {
                "name": param.name,
                "in": "query",
                "required": param.required,
                "description": param.description,
                "schema": dict(param.schema(limits) if callable(param.schema) else param.schema),
            }
            for param in op.query
        ]
    if op.body is not None:
        result["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema_ref(op.body)}},
        }
    responses: dict[int, dict[str, Any]] = {
        status: _reply(reply) for status, reply in op.replies.items()
    }
    for code in op.codes():
        problem = PROBLEM_RESPONSE_OF[code]
        if problem.status in op.replies:
            raise ValueError(f"{op.operation_id}: {problem.status} is a reply and a problem")
        responses[problem.status] = _ref("responses", problem.name)
    result["responses"] = {str(status): responses[status] for status in sorted(responses)}
    return result


def _reply(reply: Reply) -> dict[str, Any]:
    result: dict[str, Any] = {
        "description": reply.description,
        "headers": _headers(reply.headers),
    }
    if reply.model is not None:
        result["content"] = {reply.media: {"schema": _schema_ref(reply.model)}}
    elif reply.schema is not None:
        result["content"] = {reply.media: {"schema": dict(reply.schema)}}
    return result


def _problem_response(response: ProblemResponse, limits: Limits) -> dict[str, Any]:
    examples = {}
    for example in response.examples:
        error = example.error
        examples[error.code] = {
            "summary": example.summary,
            "value": {
                "type": PROBLEM_TYPE + error.code,
                "title": error.title,
                "status": error.status,
                "detail": example.detail.format(**asdict(limits)),
                "code": error.code,
                "request_id": EXAMPLE_REQUEST_ID,
            },
        }
    return {
        "description": response.description,
        "headers": _headers(response.headers),
        "content": {
            "application/problem+json": {
                "schema": _schema_ref(schemas.Problem),
                "examples": examples,
            }
        },
    }


def _headers(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: _ref("headers", HEADER_COMPONENT[name]) for name in ("X-Request-Id", *names)}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": SCHEMAS + model.__name__}


@functools.cache
def _schemas() -> dict[str, Any]:
    """Every body model's JSON Schema, in the order the route table first uses them."""
    models: list[type[BaseModel]] = []
    for op in OPERATIONS:
        for model in (op.body, *(reply.model for reply in op.replies.values())):
            if model is not None and model not in models:
                models.append(model)
    models.append(schemas.Problem)
    _, defs = models_json_schema(
        [
            (m, "validation" if issubclass(m, schemas.RequestBody) else "serialization")
            for m in models
        ],
        ref_template=SCHEMAS + "{model}",
        schema_generator=ContractJsonSchema,
    )
    found = defs["$defs"]
    order = [m.__name__ for m in models] + sorted(set(found) - {m.__name__ for m in models})
    return {name: found[name] for name in order}


# Keys of a schema object in the order the document shows them; others follow, sorted.
_KEY_ORDER = (
    "$ref",
    "type",
    "const",
    "enum",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "default",
    "description",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "example",
)


class ContractJsonSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema, shaped as the broker's document shows schemas: no generated
    titles, ``["string", "null"]`` for optional values, one-paragraph descriptions, and keys
    in reading order."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        json_schema = super().model_schema(schema)
        json_schema.pop("title", None)
        if "description" in json_schema:  # docstrings: lines of one paragraph are joined
            json_schema["description"] = re.sub(r"(?<!\n)\n(?!\n)", " ", json_schema["description"])
        return json_schema

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        if isinstance(inner.get("type"), str) and "$ref" not in inner:
            return {**inner, "type": [inner["type"], "null"]}
        return super().nullable_schema(schema)

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if "default" in json_schema and json_schema["default"] is None:
            del json_schema["default"]  # "absent or null": not a default worth stating
        return json_schema

    def sort(self, value: JsonSchemaValue, parent_key: str | None = None) -> JsonSchemaValue:
        ordered: JsonSchemaValue = _ordered(value, parent_key)
        return ordered


def _ordered(value: Any, parent_key: str | None = None) -> Any:
    if parent_key in ("example", "default", "const", "enum"):
        return value  # data, shown as written
    if isinstance(value, list):
        return [_ordered(item, parent_key) for item in value]
    if not isinstance(value, dict):
        return value
    keys = list(value)
    if parent_key not in ("properties", "$defs"):
        rank = {key: index for index, key in enumerate(_KEY_ORDER)}
        keys.sort(key=lambda key: (rank.get(key, len(rank)), key))
    return {key: _ordered(value[key], key) for key in keys}
