"""Refresh timing, user ids, and how a grant changes with tokens and failures."""

from __future__ import annotations

import json
import random
import sys
import unicodedata
from dataclasses import replace
from typing import Any

import pytest

from broker.errors import InvalidRequest
from broker.models import Grant, TokenSet, refresh_due_at, validate_user_id

EXPIRES_AT = 1_800_000_000.0
SEEDS = range(200)


def lead_of(lifetime: float, seed: int, lead: float = 300.0, jitter_max: float = 60.0) -> float:
    due = refresh_due_at(
        EXPIRES_AT, lifetime, lead=lead, jitter_max=jitter_max, rng=random.Random(seed)
    )
    return EXPIRES_AT - due


def test_one_hour_tokens_refresh_five_to_six_minutes_before_expiry() -> None:
    leads = [lead_of(3600, seed) for seed in SEEDS]
    assert all(300 <= lead <= 360 for lead in leads)
    assert min(leads) < 310
    assert max(leads) > 350  # the jitter spreads refreshes over the whole minute


@pytest.mark.parametrize("lifetime", [5, 10, 59, 120, 599, 600, 601, 3600, 86400, 7 * 86400])
def test_short_and_long_tokens_are_never_refreshed_too_early(lifetime: int) -> None:
    for seed in SEEDS:
        lead = lead_of(lifetime, seed)
        assert 0 <= lead <= lifetime / 2 + lifetime / 10
        assert lead <= 300 + 60


VALID_USER_IDS = ["a/b", "user@example.com", "{x}", "..", "naïve 用户", "é" * 128, "a" * 256]
INVALID_USER_IDS = ["", "a" + "é" * 128, "a" * 257, "a\x00b", "\x7f", "x\u0085", "\ud800"]


@pytest.mark.parametrize("user_id", VALID_USER_IDS)
def test_valid_user_ids_are_accepted_unchanged(user_id: str) -> None:
    assert validate_user_id(user_id) == user_id


@pytest.mark.parametrize("user_id", INVALID_USER_IDS, ids=ascii)
def test_invalid_user_ids_are_an_invalid_request(user_id: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_user_id(user_id)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_request"


def grant(**changes: Any) -> Grant:
    base = Grant(
        provider="p",
        user_id="u",
        refresh_token="rt-old-secret",
        access_token="at-old-secret",
        access_expires_at=1100.0,
        refresh_token_issued_at=100.0,
        created_at=100.0,
        updated_at=100.0,
        version=3,
    )
    return replace(base, **changes)


def test_a_refresh_without_a_new_refresh_token_keeps_the_old_one() -> None:
    tokens = TokenSet(access_token="at-new", token_type="Bearer", expires_in=3600)
    new = grant().with_tokens(tokens, 1000.0, next_refresh_at=4300.0, refreshed=True)
    assert new.refresh_token == "rt-old-secret"
    assert new.refresh_token_issued_at == 100.0
    assert (new.access_token, new.access_expires_at, new.next_refresh_at) == (
        "at-new",
        4600.0,
        4300.0,
    )
    assert (new.refresh_count, new.last_refreshed_at, new.version) == (1, 1000.0, 4)


def test_a_rotated_refresh_token_replaces_the_old_one() -> None:
    tokens = TokenSet("at-new", "Bearer", 3600, refresh_token="rt-new-secret")
    new = grant().with_tokens(tokens, 1000.0, next_refresh_at=4300.0, refreshed=True)
    assert new.refresh_token == "rt-new-secret"
    assert new.refresh_token_issued_at == 1000.0
    assert new.version == 4


def test_new_tokens_clear_a_failing_state() -> None:
    failing = grant(state="refresh_failing", consecutive_failures=4, last_error="timeout")
    tokens = TokenSet("at-new", "Bearer", 3600)
    new = failing.with_tokens(tokens, 1000.0, next_refresh_at=4300.0, refreshed=True)
    assert (new.state, new.consecutive_failures, new.last_error) == ("active", 0, None)


def test_repeated_failures_mark_the_grant_refresh_failing() -> None:
    current = grant(access_expires_at=5000.0)  # still valid throughout
    states = []
    for attempt in range(3):
        current = current.with_failure(
            "timeout", 2000.0 + attempt, final=False, failing_after=3, retry_at=2100.0 + attempt
        )
        states.append(current.state)
    assert states == ["active", "active", "refresh_failing"]
    assert (current.consecutive_failures, current.last_error) == (3, "timeout")
    assert (current.next_refresh_at, current.updated_at, current.version) == (2102.0, 2002.0, 6)


def test_a_failure_that_leaves_the_access_token_expired_marks_refresh_failing_at_once() -> None:
    valid = grant(access_expires_at=2000.5).with_failure(
        "timeout", 2000.0, final=False, failing_after=3, retry_at=2000.5
    )
    assert valid.state == "active"
    expired = valid.with_failure("timeout", 2001.0, final=False, failing_after=3, retry_at=2010.0)
    assert (expired.state, expired.last_error, expired.consecutive_failures) == (
        "refresh_failing",
        "timeout",
        2,
    )


def test_a_final_failure_requires_reauthorization() -> None:
    dead = grant().with_failure(
        "invalid_grant", 2000.0, final=True, failing_after=3, retry_at=2100.0
    )
    assert (dead.state, dead.next_refresh_at, dead.last_error) == (
        "reauth_required",
        None,
        "invalid_grant",
    )
    assert dead.refresh_token == "rt-old-secret"  # kept for inspection


def test_status_and_repr_never_show_a_token() -> None:
    g = grant(scope="public_api", refresh_count=2)
    status = g.status()
    text = json.dumps(status) + repr(g)
    assert "rt-old-secret" not in text
    assert "at-old-secret" not in text
    contract = {"provider", "user_id", "state", "scope", "access_expires_at", "next_refresh_at"}
    contract |= {"last_refreshed_at", "refresh_count", "consecutive_failures", "last_error"}
    assert contract | {"created_at", "updated_at"} <= status.keys()
    assert status["access_expires_at"] == "1970-01-01T00:18:20Z"


def test_control_characters_are_exactly_unicode_categories_cc_and_cs() -> None:
    """The user id check scans with one regex; it must agree with Unicode's own categories."""
    for point in range(sys.maxunicode + 1):
        ch = chr(point)
        control = unicodedata.category(ch) in ("Cc", "Cs")
        if control:
            with pytest.raises(InvalidRequest):
                validate_user_id(f"a{ch}b")
        elif point % 97 == 0 or point < 0x200:  # a sample of the rest, every range touched
            assert validate_user_id(f"a{ch}b") == f"a{ch}b"
