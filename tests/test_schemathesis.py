"""Schemathesis against a live broker: generated requests to every operation, valid and invalid,
and every answer must be documented, match its schema, and never be a server error.

The broker runs on the embedded store with a healthy dev provider, so no 5xx is expected at all
(the documented 503s need Redis or the provider to fail). Generation is derandomized (the same
requests on every run) and bounded: a few dozen examples per operation and mode.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Broker, BrokerFactory

POSITIVE_EXAMPLES = 40
NEGATIVE_EXAMPLES = 25
REQUEST_TIMEOUT = 10.0
KNOWN_USER = "u-1"  # imported first, so some requests find a grant


def problem_json(ctx: Any, response: schemathesis.Response, case: schemathesis.Case[Any]) -> None:
    """Every error of the JSON API is RFC 9457 problem JSON with a stable code (the browser's
    callback answers HTML pages, as documented)."""
    if response.status_code < 400 or case.operation.path.startswith("/oauth/"):
        return
    media = response.headers.get("content-type", [""])[0].partition(";")[0]
    if media != "application/problem+json":
        raise AssertionError(f"{response.status_code} answered as {media!r}, not problem JSON")
    body = json.loads(response.content)
    if not body.get("code") or body.get("status") != response.status_code:
        raise AssertionError(f"a problem without a code or with another status: {body}")


CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    problem_json,
]


@pytest.fixture
def hypothesis_home(tmp_path: Path) -> Iterator[None]:
    """Hypothesis keeps its files (unicode tables) here, not in the checkout."""
    hypothesis.configuration.set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    hypothesis.configuration.set_hypothesis_home_dir(None)


@pytest.mark.timeout(120)
async def test_generated_requests_get_documented_answers(
    make_broker: BrokerFactory, hypothesis_home: None
) -> None:
    broker = await make_broker()
    status, _ = await broker.import_grant(
        KNOWN_USER, refresh_token="rt-known", access_token="at-known", expires_in=3600
    )
    assert status == 201
    status, document, _ = await broker.call("GET", "/openapi.json")
    assert status == 200
    failures = await asyncio.to_thread(fuzz, broker, document)
    assert not failures, "\n\n".join(failures)


def fuzz(broker: Broker, document: dict[str, Any]) -> list[str]:
    """Run every operation's strategies against the live broker; the failures, described."""
    schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config())
    schema.validate()
    base_url = str(broker.client.make_url("")).rstrip("/")
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            if isinstance(result, Err):
                failures.append(f"an operation schemathesis cannot use: {result.err()}")
                continue
            operation = result.ok()
            for mode, examples in (
                (GenerationMode.POSITIVE, POSITIVE_EXAMPLES),
                (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES),
            ):
                strategy = _strategy(operation, mode)
                if strategy is None:
                    continue

                @hypothesis.settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                @hypothesis.given(case=strategy)
                def run(case: schemathesis.Case[Any]) -> None:
                    case.call_and_validate(
                        base_url=base_url,
                        session=session,
                        headers=broker.headers,
                        checks=CHECKS,
                        timeout=REQUEST_TIMEOUT,
                    )

                try:
                    run()
                except (FailureGroup, Exception) as err:  # every failure, with its request
                    failures.append(f"{operation.label} ({mode.value}): {err}")
    return failures


def _strategy(operation: Any, mode: GenerationMode) -> Any:
    """Random input, plus input aimed at the configured provider and at a user who has a
    grant, so requests get past "unknown provider" and "no grant" too."""
    names = {p.name for p in operation.path_parameters}
    if mode is GenerationMode.NEGATIVE and not (names or operation.query or operation.body):
        return None  # nothing to get wrong
    fixed: list[dict[str, str]] = [{}]
    if "provider" in names:
        fixed.append({"provider": "dev"})
        if "user_id" in names:
            fixed.append({"provider": "dev", "user_id": KNOWN_USER})
    return st.one_of(
        [operation.as_strategy(generation_mode=mode, path_parameters=p or None) for p in fixed]
    )
