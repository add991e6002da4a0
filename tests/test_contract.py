"""The OpenAPI document is generated, committed, served with the running settings, and checked
against every answer the tests see; the request models refuse what the handlers always did."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import schemathesis
from jsonschema import Draft202012Validator
from multidict import CIMultiDict

import broker
from broker.auth import hash_key, new_api_key
from broker.cli import main
from broker.components import PROBLEM_RESPONSE_OF
from broker.errors import BrokerError, InvalidRequest
from broker.models import Grant
from broker.openapi import build, default_limits, openapi_path, render
from broker.routes import OPERATIONS, Limits
from broker.schemas import AuthorizationRequest, GrantImport, GrantStatus, ProblemCode
from tests.conftest import ALL_PERMISSIONS, SECRETS, Broker, BrokerFactory, path
from tests.contract import CONTRACTS, contract

COMMITTED = Path(broker.__file__).parent / "openapi.json"
REGENERATE = "broker openapi > broker/openapi.json"


def test_committed_document_is_what_the_generator_writes() -> None:
    if COMMITTED.read_text(encoding="utf-8") != render(default_limits()):
        pytest.fail(
            "broker/openapi.json differs from the document generated from the route table "
            f"(broker/routes.py) and the models (broker/schemas.py): run `{REGENERATE}` (or "
            "`python -m broker openapi > broker/openapi.json`) and commit the result"
        )


def test_broker_openapi_prints_the_document(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    main(["openapi"])
    assert capsysbinary.readouterr().out.decode("utf-8") == render(default_limits())


def test_broker_openapi_with_a_config_shows_its_settings(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("default_min_ttl = 60\nmax_min_ttl = 900\n", encoding="utf-8")
    main(["openapi", "--config", str(config)])
    document = json.loads(capsysbinary.readouterr().out)
    assert _min_ttl(document) == {"type": "integer", "minimum": 0, "maximum": 900, "default": 60}


def test_document_is_valid_openapi_3_1() -> None:
    document = build(default_limits())
    schemathesis.openapi.from_dict(document, config=schemathesis.Config()).validate()
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    refs = set(_refs(document))
    for ref in refs:
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # a KeyError names a dangling reference
    used = {ref.rsplit("/", 1)[-1] for ref in refs}
    for kind in ("schemas", "responses", "headers", "parameters"):
        assert set(document["components"][kind]) <= used, kind  # nothing defined for nothing


async def test_served_document_has_the_running_limits(make_broker: BrokerFactory) -> None:
    broker = await make_broker(default_min_ttl=10, max_min_ttl=600, max_body_bytes=4096)
    status, served, headers = await broker.call("GET", "/openapi.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert _min_ttl(served) == {"type": "integer", "minimum": 0, "maximum": 600, "default": 10}
    assert served == build(Limits(default_min_ttl=10, max_min_ttl=600, max_body_bytes=4096))
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert sorted(_differences(committed, served)) == [
        "components/responses/InvalidRequest/content/application/problem+json/examples/"
        "invalid_request/value/detail",
        "components/responses/PayloadTooLarge/content/application/problem+json/examples/"
        "payload_too_large/value/detail",
        "paths//v1/app-tokens/{provider}/get/parameters/0/schema/default",
        "paths//v1/app-tokens/{provider}/get/parameters/0/schema/maximum",
        "paths//v1/tokens/{provider}/{user_id}/get/parameters/0/schema/default",
        "paths//v1/tokens/{provider}/{user_id}/get/parameters/0/schema/maximum",
    ]
    # ... and the broker holds to what it serves
    status, problem, _ = await broker.call("GET", path("tokens", "u") + "?min_ttl=601")
    assert (status, problem["detail"]) == (400, "min_ttl must be an integer from 0 to 600")


async def test_every_route_is_an_operation_and_every_operation_a_route(broker: Broker) -> None:
    status, served, _ = await broker.call("GET", "/openapi.json")
    assert status == 200
    routes = {
        (route.method, route.resource.canonical)
        for route in broker.app.router.routes()
        if route.resource is not None
    }
    documented = {
        (method.upper(), doc_path)
        for doc_path, item in served["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == documented
    assert {(op.method, openapi_path(op.path)) for op in OPERATIONS} == documented


async def test_each_operation_requires_the_permission_its_row_names(
    make_broker: BrokerFactory,
) -> None:
    keys = {permission: new_api_key() for permission in ALL_PERMISSIONS}
    SECRETS.update(keys.values())
    broker = await make_broker(
        clients=[
            {
                "name": f"no-{permission}",
                "key_sha256": hash_key(key),
                "providers": ["*"],
                "permissions": [p for p in ALL_PERMISSIONS if p != permission],
            }
            for permission, key in keys.items()
        ]
    )
    for op in OPERATIONS:
        if op.permission is None:
            continue
        status, problem, _ = await broker.call(
            op.method,
            openapi_path(op.path).format(provider="dev", user_id="u"),
            headers={"Authorization": f"Bearer {keys[op.permission]}"},
            json={} if op.body else None,
        )
        assert (status, problem["code"]) == (403, "forbidden"), op.operation_id
        assert repr(op.permission) in problem["detail"], op.operation_id


def test_every_error_code_is_documented() -> None:
    codes = {error.code for error in _subclasses(BrokerError)}
    codes |= {"not_found", "method_not_allowed"}  # the router's, mapped by the middleware
    assert codes <= set(get_args(ProblemCode))
    for op in OPERATIONS:
        for code in op.codes():
            assert code in PROBLEM_RESPONSE_OF, (op.operation_id, code)


def test_grant_status_model_has_every_field_of_a_grants_status() -> None:
    grant = Grant(provider="dev", user_id="u", refresh_token="rt", created_at=1.0, updated_at=2.0)
    assert set(GrantStatus.model_fields) == set(grant.status())
    assert GrantStatus.model_validate(grant.status()).model_dump() == grant.status()


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"refresh_token": "", "bogus": 1, "other": 2}, "unknown field(s): bogus, other"),
        ({"refresh_token": 5, "access_token": 5}, "refresh_token is required: a non-empty string"),
        ({"refresh_token": "r", "access_token": ""}, "access_token must be a non-empty string"),
        (
            {"refresh_token": "r", "access_token": "a", "expires_in": 1.0},
            "expires_in must be an integer from 1 to 31622400",
        ),
        (
            {"refresh_token": "r", "expires_in": 10, "scope": 5},
            "expires_in describes an access_token; send both or neither",
        ),
        ({"refresh_token": "r", "scope": "s" * 4097}, "scope must be a string"),
    ],
)
def test_import_body_refusals_name_the_first_bad_field(body: dict[str, Any], detail: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        GrantImport.parse(body)
    assert refused.value.detail == detail


def test_import_body_takes_null_for_absent() -> None:
    body = GrantImport.parse(
        {"refresh_token": "r", "access_token": None, "expires_in": None, "scope": None}
    )
    assert (body.access_token, body.expires_in, body.scope) == (None, None, None)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"user_id": 1, "b": 2}, "unknown field(s): b"),
        ({"user_id": 1, "redirect_after": ""}, "user_id is required: a string"),
        ({"user_id": "", "redirect_after": 5}, "redirect_after is required: a URL in the"),
        ({"user_id": "u", "redirect_after": "x", "scope": 1}, "scope must be a string"),
    ],
)
def test_authorization_body_refusals_name_the_first_bad_field(
    body: dict[str, Any], detail: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        AuthorizationRequest.parse(body)
    assert refused.value.detail.startswith(detail)


async def test_every_answer_the_api_tests_see_is_checked(broker: Broker) -> None:
    checker = CONTRACTS[str(broker.client.make_url("").origin())]
    before = checker.answers
    await broker.call("GET", "/healthz")
    async with broker.client.get("/nowhere"):
        pass
    assert checker.answers == before + 2


TOKEN = {
    "access_token": "at",
    "token_type": "Bearer",
    "expires_at": "2026-11-25T02:00:00Z",
    "expires_in": 60,
    "scope": None,
}


def _headers(content_type: str = "application/json; charset=utf-8", **more: str) -> Any:
    return CIMultiDict({"X-Request-Id": "r-1", "Content-Type": content_type, **more})


def _problem(status: int, code: str) -> bytes:
    return json.dumps(
        {
            "type": f"urn:broker:problem:{code}",
            "title": "t",
            "status": status,
            "detail": "d",
            "code": code,
        }
    ).encode()


PROBLEM = "application/problem+json"


@pytest.mark.parametrize(
    ("method", "raw_path", "status", "headers", "body", "complaint"),
    [
        ("GET", "/v1/tokens/dev/u", 418, _headers(), b"", "status 418 is not documented"),
        ("GET", "/v1/tokens/dev/u", 200, _headers(), json.dumps(TOKEN).encode(), "Cache-Control"),
        (
            "GET",
            "/v1/tokens/dev/u",
            200,
            _headers(**{"Cache-Control": "no-store"}),
            json.dumps({**TOKEN, "expires_in": -1}).encode(),
            "expires_in",
        ),
        (
            "POST",
            "/v1/authorizations/dev",
            404,
            _headers(PROBLEM),
            _problem(404, "grant_not_found"),
            "'grant_not_found' not in",
        ),
        ("GET", "/v1/grants/dev/u", 404, _headers("text/plain"), b"404", "'text/plain'"),
        ("GET", "/nowhere", 404, _headers("text/plain"), b"404", "not problem JSON"),
        ("DELETE", "/v1/grants/dev/u", 204, _headers(), b"", "Broker-Revocation"),
        (
            "GET",
            "/readyz",
            503,
            _headers(),
            json.dumps({"status": "down", "checks": {}}).encode(),
            "'down'",
        ),
    ],
)
def test_the_checker_refuses_what_the_document_does_not_allow(
    method: str, raw_path: str, status: int, headers: Any, body: bytes, complaint: str
) -> None:
    with pytest.raises(AssertionError, match=complaint.replace("(", r"\(")):
        contract(default_limits()).check(method, raw_path, status, headers, body)


def _min_ttl(document: dict[str, Any]) -> Any:
    operation = document["paths"]["/v1/tokens/{provider}/{user_id}"]["get"]
    (param,) = (p for p in operation["parameters"] if p["name"] == "min_ttl")
    return param["schema"]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _differences(a: Any, b: Any, where: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            yield from _differences(a.get(key), b.get(key), f"{where}{key}/")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, f"{where}{index}/")
    elif a != b:
        yield where.rstrip("/")


def _subclasses(cls: type[BrokerError]) -> Iterator[type[BrokerError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)
