"""Standard Webhooks signatures (https://www.standardwebhooks.com), by its reference library."""

from __future__ import annotations

from datetime import UTC, datetime

from standardwebhooks import Webhook


def webhook_id(entry_id: str) -> str:
    """The ``webhook-id`` of a stream entry: the same for every attempt, by every replica."""
    return f"msg_{entry_id}"


def signed_headers(key: bytes, msg_id: str, body: bytes, now: float) -> dict[str, str]:
    """The headers of one attempt: ``webhook-timestamp`` is the attempt's time (receivers
    refuse stale ones against replays), so the signature is made again for each attempt."""
    timestamp = datetime.fromtimestamp(int(now), UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": Webhook(key).sign(msg_id, timestamp, body.decode("utf-8")),
        "content-type": "application/json",
    }
