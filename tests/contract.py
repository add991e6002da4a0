"""Every answer a test sees must be one the OpenAPI document allows.

``conftest`` puts :func:`check_answers` on the HTTP clients of the test brokers (and on the
browser); each broker registers the document it serves under its origin. An answer from a
registered origin is checked against its operation: a documented status, the documented media
type and body schema (jsonschema, Draft 2020-12), the required headers, and, for problem JSON,
a ``code`` the route table lists for that operation. A violation fails the test that made the
request, naming the operation and what is wrong.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from jsonschema import Draft202012Validator
from multidict import CIMultiDictProxy
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from broker.openapi import build, openapi_path
from broker.routes import OPERATIONS, Limits, Operation
from tests.exposure import EXPOSURE

DOCUMENT_URI = "urn:broker:openapi"
JSON_TYPES = ("application/json", "application/problem+json")
# Answers of the router itself, for a path or method no operation has.
ROUTER_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated"}


@dataclass(frozen=True)
class Route:
    operation: Operation
    pattern: re.Pattern[str]
    spec: Mapping[str, Any]


class Contract:
    """The document one broker serves, ready to check answers against."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        self.registry: Registry[Any] = Registry().with_resource(
            DOCUMENT_URI, DRAFT202012.create_resource(document)
        )
        self.validators: dict[str, Draft202012Validator] = {}
        self.answers = 0  # answers checked, for the test that proves the checking is on
        self.routes = [
            Route(
                op,
                _path_pattern(op.path),
                document["paths"][openapi_path(op.path)][op.method.lower()],
            )
            for op in OPERATIONS
        ]

    def check(self, method: str, raw_path: str, status: int, headers: Any, body: bytes) -> None:
        """Raise AssertionError unless the document allows this answer to this request."""
        self.answers += 1
        matching = [r for r in self.routes if r.pattern.fullmatch(raw_path)]
        route = next((r for r in matching if r.operation.method == method), None)
        where = f"{method} {raw_path} -> {status}"
        if route is None:  # the router's own answers: problem JSON all the same
            problem = self._problem(where, headers, body)
            expected = ROUTER_CODES.get(status)
            assert problem["code"] == expected, f"{where}: code {problem['code']!r}"
            return
        where = f"{route.operation.operation_id}: {where}"
        responses = route.spec["responses"]
        assert str(status) in responses, f"{where}: status {status} is not documented"
        response = self._resolve(responses[str(status)])
        self._check_headers(where, response.get("headers", {}), headers)
        content = response.get("content")
        if content is None:
            assert not body, f"{where}: a body where the document has none"
            return
        media = headers.get("Content-Type", "").partition(";")[0].strip()
        assert media in content, f"{where}: {media!r} is not one of {sorted(content)}"
        if media not in JSON_TYPES:
            return
        value = json.loads(body)
        self._validate(where, content[media]["schema"], value)
        if media == "application/problem+json":
            codes = route.operation.codes()
            assert value["code"] in codes, f"{where}: code {value['code']!r} not in {codes}"
            assert value["status"] == status, f"{where}: problem status {value['status']}"

    def _problem(self, where: str, headers: Any, body: bytes) -> Any:
        media = headers.get("Content-Type", "").partition(";")[0].strip()
        assert media == "application/problem+json", f"{where}: {media!r}, not problem JSON"
        value = json.loads(body)
        self._validate(where, {"$ref": "#/components/schemas/Problem"}, value)
        return value

    def _check_headers(self, where: str, documented: Mapping[str, Any], headers: Any) -> None:
        for name, header in documented.items():
            header = self._resolve(header)
            value = headers.get(name)
            if value is None:
                assert not header.get("required"), f"{where}: no {name} header"
                continue
            schema = header["schema"]
            if schema.get("type") == "integer":
                assert value.isdigit(), f"{where}: {name}: {value!r} is not an integer"
                self._validate(f"{where}: {name}", schema, int(value))
            else:
                self._validate(f"{where}: {name}", schema, value)

    def _resolve(self, node: Mapping[str, Any]) -> Mapping[str, Any]:
        while "$ref" in node:
            node = self.registry.resolver(DOCUMENT_URI).lookup(node["$ref"]).contents
        return node

    def _validate(self, where: str, schema: Mapping[str, Any], value: Any) -> None:
        key = json.dumps(schema, sort_keys=True)
        validator = self.validators.get(key)
        if validator is None:
            # A "#/components/..." reference is into the document; those inside the
            # components it leads to resolve against the document by themselves.
            ref = schema.get("$ref")
            root = {"$ref": DOCUMENT_URI + ref} if ref else dict(schema)
            validator = Draft202012Validator(
                root, registry=self.registry, format_checker=Draft202012Validator.FORMAT_CHECKER
            )
            self.validators[key] = validator
        error = next(iter(sorted(validator.iter_errors(value), key=str)), None)
        assert error is None, f"{where}: at {error.json_path}: {error.message}"


def _path_pattern(route_path: str) -> re.Pattern[str]:
    """The raw (percent-encoded) paths an aiohttp route pattern matches."""
    parts = re.split(r"(\{\w+(?::[^{}]*)?\})", route_path)
    regex = ""
    for part in parts:
        variable = re.fullmatch(r"\{\w+(?::([^{}]*))?\}", part)
        regex += (variable.group(1) or "[^/]+") if variable else re.escape(part)
    return re.compile(regex)


@functools.cache
def contract(limits: Limits) -> Contract:
    """The checker for a broker with these limits (built once per limits)."""
    return Contract(build(limits))


CONTRACTS: dict[str, Contract] = {}  # origin ("http://127.0.0.1:port") -> its contract


async def check_answers(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
    """An aiohttp client middleware: every answer from a registered broker is checked."""
    response = await handler(request)
    checker = CONTRACTS.get(str(request.url.origin()))
    if checker is not None:
        body = await response.read()
        headers: CIMultiDictProxy[str] = response.headers
        checker.check(request.method, request.url.raw_path, response.status, headers, body)
        EXPOSURE.record(request.method, request.url.raw_path, response.status, headers, body)
    return response
