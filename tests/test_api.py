"""The HTTP API as services see it, against a real provider on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.devprovider import DevProvider
from broker.middlewares import INCOMING_REQUEST_ID
from tests.conftest import Broker, BrokerFactory, path


async def test_imported_grant_hands_out_its_access_token(broker: Broker) -> None:
    status, body = await broker.import_grant(
        "u-1",
        refresh_token="rt-import-1",
        access_token="at-import-1",
        expires_in=3600,
        scope="public_api",
    )
    assert status == 201
    assert body["state"] == "active"
    assert "refresh_token" not in body
    assert "rt-import-1" not in json.dumps(body)
    status, token = await broker.token("u-1")
    assert status == 200
    assert token["access_token"] == "at-import-1"
    assert token["token_type"] == "Bearer"
    assert 3590 <= token["expires_in"] <= 3600
    assert token["scope"] == "public_api"
    assert token["expires_at"].endswith("Z")


async def test_token_response_is_not_cacheable(broker: Broker) -> None:
    await broker.import_grant("u", refresh_token="rt-x", access_token="at-x", expires_in=600)
    async with broker.client.get(path("tokens", "u"), headers=broker.headers) as response:
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Request-Id"]


async def test_import_without_access_token_validates_at_the_provider(
    broker: Broker, provider: DevProvider
) -> None:
    refresh_token = provider.issue_refresh_token("alice")
    status, body = await broker.import_grant("alice", refresh_token=refresh_token)
    assert status == 201
    assert provider.refresh_requests == 1
    assert body["refresh_count"] == 1
    status, token = await broker.token("alice")
    assert status == 200
    assert provider.access_token_expires_at(token["access_token"]) is not None
    assert provider.refresh_requests == 1  # the token from the import is fresh


async def test_import_of_a_rejected_refresh_token_stores_nothing(
    broker: Broker, provider: DevProvider
) -> None:
    status, body = await broker.import_grant("bob", refresh_token="rt-never-issued")
    assert status == 422
    assert body["code"] == "invalid_refresh_token"
    status, body = await broker.grant("bob")
    assert status == 404
    assert body["code"] == "grant_not_found"


async def test_import_replaces_an_existing_grant(broker: Broker) -> None:
    await broker.import_grant("u", refresh_token="rt-a", access_token="at-a", expires_in=600)
    status, _ = await broker.import_grant(
        "u", refresh_token="rt-b", access_token="at-b", expires_in=600
    )
    assert status == 200
    assert (await broker.token("u"))[1]["access_token"] == "at-b"


async def test_token_is_refreshed_when_it_would_expire_within_min_ttl(
    broker: Broker, provider: DevProvider
) -> None:
    await broker.import_grant(
        "dave",
        refresh_token=provider.issue_refresh_token("dave"),
        access_token="at-imported",
        expires_in=60,
    )
    status, token = await broker.token("dave", min_ttl=50)
    assert token["access_token"] == "at-imported"
    assert provider.refresh_requests == 0
    provider.settings.access_token_ttl = 600
    status, token = await broker.token("dave", min_ttl=61)
    assert status == 200
    assert token["access_token"] != "at-imported"
    assert 599 <= token["expires_in"] <= 600
    assert provider.refresh_requests == 1


async def test_min_ttl_beyond_the_providers_lifetime_does_not_refresh_every_call(
    broker: Broker, provider: DevProvider
) -> None:
    provider.settings.access_token_ttl = 60
    await broker.import_grant("eve", refresh_token=provider.issue_refresh_token("eve"))
    assert provider.refresh_requests == 1
    for _ in range(5):
        status, token = await broker.token("eve", min_ttl=3600)
        assert status == 200
    assert provider.refresh_requests == 1  # 60 s tokens: min_ttl is capped at 30 s
    broker.clock.advance(31)
    status, token = await broker.token("eve", min_ttl=3600)
    assert provider.refresh_requests == 2
    assert token["expires_in"] >= 59


async def test_rotated_refresh_tokens_are_kept_across_refreshes(
    broker: Broker, provider: DevProvider
) -> None:
    await broker.import_grant("erin", refresh_token=provider.issue_refresh_token("erin"))
    tokens = set()
    for _ in range(3):
        broker.clock.advance(3600)  # the held token has expired
        status, token = await broker.token("erin")
        assert status == 200
        tokens.add(token["access_token"])
    assert provider.refresh_requests == 4
    assert provider.reused_refresh_tokens == 0
    assert len(tokens) == 3
    status, grant = await broker.grant("erin")
    assert grant["refresh_count"] == 4
    assert grant["state"] == "active"


async def test_provider_without_rotation_keeps_the_old_refresh_token(
    broker: Broker, provider: DevProvider
) -> None:
    provider.settings.rotate_refresh_tokens = False
    await broker.import_grant("frank", refresh_token=provider.issue_refresh_token("frank"))
    for _ in range(2):
        broker.clock.advance(3600)
        status, _ = await broker.token("frank")
        assert status == 200
    assert provider.refresh_requests == 3
    assert provider.reused_refresh_tokens == 0


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize("form_encoded", [False, True])
async def test_provider_dialects(
    make_broker: BrokerFactory, provider: DevProvider, auth: str, form_encoded: bool
) -> None:
    provider.settings.client_auth = auth  # type: ignore[assignment]
    provider.settings.form_encoded = form_encoded
    provider.settings.include_expires_in = False
    broker = await make_broker(provider={"default_expires_in": 1800})
    await broker.import_grant("gina", refresh_token=provider.issue_refresh_token("gina"))
    status, token = await broker.token("gina")
    assert status == 200
    assert token["token_type"] == "Bearer"
    assert 1790 <= token["expires_in"] <= 1800  # no expires_in: the provider's default
    assert provider.auth_methods_seen[-1] == auth


async def test_rejected_refresh_token_needs_reauth_and_keeps_the_grant(
    broker: Broker, provider: DevProvider
) -> None:
    await broker.import_grant("hank", refresh_token="rt-dead", access_token="at-1", expires_in=5)
    status, body = await broker.token("hank")  # 5 s left < min_ttl: refresh, rejected
    assert status == 409
    assert body["code"] == "reauth_required"
    status, grant = await broker.grant("hank")
    assert status == 200
    assert grant["state"] == "reauth_required"
    assert grant["last_error"] == "invalid_grant"
    assert grant["next_refresh_at"] is None
    before = provider.token_requests
    assert (await broker.token("hank"))[0] == 409
    assert provider.token_requests == before  # a dead grant is not retried at the provider


@pytest.mark.parametrize(
    "failure", ["server_error", "garbage", "no_access_token", "rate_limited", "invalid_client"]
)
async def test_provider_failure_never_destroys_the_grant(
    broker: Broker, provider: DevProvider, failure: Any
) -> None:
    await broker.import_grant("ivy", refresh_token=provider.issue_refresh_token("ivy"))
    broker.clock.advance(3600)
    provider.fail_next(failure, retry_after=7)
    status, body = await broker.token("ivy")
    assert status == 503
    assert body["code"] == "upstream_unavailable"
    status, grant = await broker.grant("ivy")
    assert grant["consecutive_failures"] == 1
    assert grant["last_error"]
    assert grant["state"] == "refresh_failing"  # its access token has expired: nothing to serve
    # the provider heals: the same stored refresh token still works
    status, token = await broker.token("ivy")
    assert status == 200
    assert provider.access_token_expires_at(token["access_token"]) is not None
    healed = (await broker.grant("ivy"))[1]
    assert (healed["state"], healed["consecutive_failures"]) == ("active", 0)
    assert provider.reused_refresh_tokens == 0


async def test_slow_provider_times_out_without_losing_the_grant(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker(provider_timeout=0.3)
    await broker.import_grant("sam", refresh_token=provider.issue_refresh_token("sam"))
    broker.clock.advance(3600)
    provider.fail_next("slow", delay=2.0)
    status, body = await broker.token("sam")
    assert status == 503
    assert "timeout" in body["detail"]
    status, _token = await broker.token("sam")
    assert status == 200


async def test_expired_token_and_provider_down_is_503_with_retry_after(
    broker: Broker, provider: DevProvider
) -> None:
    await broker.import_grant("jo", refresh_token=provider.issue_refresh_token("jo"))
    provider.fail_always("rate_limited", retry_after=42)
    broker.clock.advance(3600)
    status, body, headers = await broker.call("GET", path("tokens", "jo"))
    assert status == 503
    assert body["code"] == "upstream_unavailable"
    assert headers["Retry-After"] == "42"


async def test_valid_token_is_served_while_the_provider_is_down(
    broker: Broker, provider: DevProvider
) -> None:
    await broker.import_grant(
        "kim",
        refresh_token=provider.issue_refresh_token("kim"),
        access_token="at-still-good",
        expires_in=20,
    )
    provider.fail_always("server_error")
    for _ in range(3):
        status, token = await broker.token("kim")  # 20 s left < min_ttl 30 s, but valid
        assert status == 200
        assert token["access_token"] == "at-still-good"
    status, grant = await broker.grant("kim")
    assert grant["state"] == "refresh_failing"
    assert grant["consecutive_failures"] == 3


async def test_delete_revokes_at_the_provider_and_removes_the_grant(
    broker: Broker, provider: DevProvider
) -> None:
    refresh_token = provider.issue_refresh_token("lee")
    await broker.import_grant("lee", refresh_token=refresh_token)
    stored = provider.revocations
    status, _, headers = await broker.call("DELETE", path("grants", "lee"))
    assert status == 204
    assert headers["Broker-Revocation"] == "revoked"
    assert stored[-1].token_type_hint == "refresh_token"
    assert stored[-1].authenticated
    assert (await broker.grant("lee"))[0] == 404
    status, body, _ = await broker.call("DELETE", path("grants", "lee"))
    assert status == 404
    assert body["code"] == "grant_not_found"


async def test_delete_still_deletes_when_revocation_fails(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker(provider={"revocation_url": "http://127.0.0.1:9/revoke"})
    await broker.import_grant("max", refresh_token="rt-m", access_token="at-m", expires_in=600)
    status, _, headers = await broker.call("DELETE", path("grants", "max"))
    assert status == 204
    assert headers["Broker-Revocation"] == "failed"
    assert (await broker.grant("max"))[0] == 404


@pytest.mark.parametrize(
    "user_id",
    ["a/b", "user@example.com", "{tag}", "..", "naïve 用户", "a:b*c", " spaced ", "x" * 256],
)
async def test_any_valid_user_id_round_trips(broker: Broker, user_id: str) -> None:
    status, body = await broker.import_grant(
        user_id, refresh_token="rt", access_token="at-" + str(len(user_id)), expires_in=600
    )
    assert status == 201, body
    assert body["user_id"] == user_id
    status, grant = await broker.grant(user_id)
    assert grant["user_id"] == user_id


async def test_similar_user_ids_are_different_grants(broker: Broker) -> None:
    ids = ["a/b", "a%2Fb", "a_b", "A/b", "a/b "]
    for index, user_id in enumerate(ids):
        await broker.import_grant(
            user_id, refresh_token="rt", access_token=f"at-{index}", expires_in=600
        )
    for index, user_id in enumerate(ids):
        assert (await broker.token(user_id))[1]["access_token"] == f"at-{index}"


@pytest.mark.parametrize(
    "raw_segment", ["%FF", "%C3", "%00", "a%0Ab", "%7F", "%C2%85", "x" * 257, "%zz", ""]
)
async def test_invalid_user_ids_are_400(broker: Broker, raw_segment: str) -> None:
    from yarl import URL

    url = URL(f"/v1/tokens/dev/{raw_segment}", encoded=True)
    async with broker.client.get(url, headers=broker.headers) as response:
        assert response.status == 400
        assert response.content_type == "application/problem+json"
        assert (await response.json())["code"] == "invalid_request"


async def test_missing_and_unknown_keys_are_401(broker: Broker) -> None:
    for headers in ({}, {"Authorization": "Bearer brk_unknown"}, {"Authorization": "Basic x"}):
        async with broker.client.get(path("tokens", "u"), headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["code"] == "unauthenticated"


async def test_permissions_and_providers_are_enforced(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    from broker.auth import hash_key, new_api_key

    reader_key = new_api_key()
    broker = await make_broker(
        clients=[
            {
                "name": "reader",
                "key_sha256": hash_key(reader_key),
                "providers": ["dev"],
                "permissions": ["tokens:read"],
            },
        ]
    )
    broker.api_key = reader_key
    status, body = await broker.import_grant("u", refresh_token="rt")
    assert status == 403
    assert body["code"] == "forbidden"
    status, body, _ = await broker.call("GET", path("tokens", "u", provider="other"))
    assert status == 403
    status, body = await broker.token("nobody")
    assert status == 404
    assert body["code"] == "grant_not_found"


async def test_unknown_provider_is_404(broker: Broker) -> None:
    status, body, _ = await broker.call("GET", path("tokens", "u", provider="nope"))
    assert status == 404
    assert body["code"] == "provider_not_found"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "refresh_token"),
        ({"refresh_token": ""}, "refresh_token"),
        ({"refresh_token": "r", "expires_in": 10}, "expires_in"),
        ({"refresh_token": "r", "access_token": "a", "expires_in": "10"}, "expires_in"),
        ({"refresh_token": "r", "access_token": "a", "expires_in": True}, "expires_in"),
        ({"refresh_token": "r", "bogus": 1}, "bogus"),
        ([], "object"),
    ],
)
async def test_malformed_imports_are_400_and_store_nothing(
    broker: Broker, body: Any, fragment: str
) -> None:
    status, problem, _ = await broker.call("PUT", path("grants", "u"), json=body)
    assert status == 400
    assert problem["code"] == "invalid_request"
    assert fragment in problem["detail"]
    assert (await broker.grant("u"))[0] == 404


async def test_non_json_body_is_400(broker: Broker) -> None:
    status, problem, _ = await broker.call(
        "PUT", path("grants", "u"), data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert problem["code"] == "invalid_request"


async def test_oversized_body_is_413(broker: Broker) -> None:
    big = {"refresh_token": "r" * (broker.settings.max_body_bytes + 1)}
    status, problem, _ = await broker.call("PUT", path("grants", "u"), json=big)
    assert status == 413
    assert problem["code"] == "payload_too_large"


@pytest.mark.parametrize("value", ["-1", "3601", "abc", "1.5"])
async def test_min_ttl_out_of_range_is_400(broker: Broker, value: str) -> None:
    status, problem, _ = await broker.call("GET", path("tokens", "u") + f"?min_ttl={value}")
    assert status == 400
    assert "min_ttl" in problem["detail"]


async def test_unknown_route_is_problem_json(broker: Broker) -> None:
    status, problem, _ = await broker.call("GET", "/v2/nothing")
    assert status == 404
    assert problem["code"] == "not_found"
    status, problem, headers = await broker.call("POST", path("tokens", "u"))
    assert status == 405
    assert problem["code"] == "method_not_allowed"
    assert "GET" in headers["Allow"]


async def test_health_readiness_and_metrics(broker: Broker) -> None:
    await broker.import_grant("m", refresh_token="rt", access_token="at", expires_in=600)
    await broker.token("m")
    status, health, _ = await broker.call("GET", "/healthz")
    assert (status, health) == (200, {"status": "ok"})
    status, ready, _ = await broker.call("GET", "/readyz")
    assert status == 200
    assert ready["status"] == "ready"
    assert ready["checks"]["redis"]["ok"] is True
    assert ready["checks"]["redis"]["latency_ms"] >= 0
    async with broker.client.get("/metrics") as response:
        text = await response.text()
    assert 'broker_token_handouts_total{client="svc",provider="dev"} 1.0' in text
    assert 'route="/v1/tokens/{provider}/{user_id}"' in text
    assert "broker_refresh_duration_seconds" in text


async def test_openapi_describes_every_route(broker: Broker) -> None:
    status, spec, _ = await broker.call("GET", "/openapi.json")
    assert status == 200
    assert spec["openapi"].startswith("3.1")
    app = broker.app
    for route in app.router.routes():
        info = route.resource.canonical if route.resource else ""
        assert info in spec["paths"], info
        assert route.method.lower() in spec["paths"][info], (route.method, info)


async def test_request_ids_are_distinct_and_name_the_requests_one_line(
    broker: Broker, log_file: Path
) -> None:
    await broker.import_grant("u-ids", refresh_token="rt-ids", access_token="at-ids")
    before = log_file.stat().st_size
    ids = set()
    for _ in range(3):
        async with broker.client.get(path("tokens", "u-ids"), headers=broker.headers) as response:
            ids.add(response.headers["X-Request-Id"])
    assert len(ids) == 3
    assert all(INCOMING_REQUEST_ID.match(request_id) for request_id in ids)
    headers = {**broker.headers, "X-Request-Id": "caller-7"}
    async with broker.client.get(path("tokens", "u-ids"), headers=headers) as response:
        assert response.headers["X-Request-Id"] == "caller-7"
    with log_file.open(encoding="utf-8") as stream:
        stream.seek(before)
        lines = [json.loads(line) for line in stream.read().splitlines()]
    mine = [line for line in lines if line.get("request_id") == "caller-7"]
    # one line: the audit event, carrying the request's fields
    assert [(line["logger"], line["event"]) for line in mine] == [("broker.audit", "token.handout")]
    assert mine[0]["user_id"] == "u-ids"
    assert mine[0]["status"] == 200
    assert mine[0]["route"] == "/v1/tokens/{provider}/{user_id}"
