"""The plaintext of a grant record (what ``KeyRing`` encrypts), in either of its two formats.

Format 1 is a JSON object with every field by its full name: what broker 0.1.0 wrote. Format 2
is the byte ``0x02`` and a MessagePack map from field numbers to values, fields at their
defaults left out, and a timestamp equal to ``updated_at`` written as ``true`` (a refresh sets
three of them to the same instant: 1 byte each instead of 9). With real timestamps it is under
a third of format 1's size, which takes a grant from about 1,300 to about 900 bytes of Redis
(docs/performance.md). Every version reads both; ``record_format`` chooses which one is
written, so a rolling upgrade from a version that reads only format 1 writes format 1 until no
such replica is left.

Both formats skip fields they do not know, so a record written by a newer version (one more
field) stays readable during a rolling upgrade. Field numbers are forever (a field that goes
away leaves its number unused), and so are the defaults format 2 leaves out: a changed default
would change what every stored record says (tests/test_grant_record.py pins them).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from typing import Any

import msgpack

from broker.errors import GrantUnreadable
from broker.models import Grant

__all__ = ["DEFAULTS", "FIELD_NUMBERS", "decode", "encode"]

COMPACT = b"\x02"  # never the first byte of a JSON text

FIELD_NUMBERS: dict[str, int] = {
    "refresh_token": 1,
    "access_token": 2,
    "token_type": 3,
    "access_expires_at": 4,
    "access_issued_at": 5,
    "scope": 6,
    "state": 7,
    "next_refresh_at": 8,
    "last_refreshed_at": 9,
    "refresh_count": 10,
    "consecutive_failures": 11,
    "last_error": 12,
    "refresh_token_issued_at": 13,
    "refresh_token_expires_at": 14,
    "created_at": 15,
    "updated_at": 16,
}
_NAMES = {number: name for name, number in FIELD_NUMBERS.items()}
# Identity and version live outside the record (the key and the hash field ``v``).
_PAYLOAD_FIELDS = tuple(f.name for f in fields(Grant) if f.name in FIELD_NUMBERS)
_RECORD_FIELDS = frozenset(_PAYLOAD_FIELDS)
# Left out of format 2 when at these values; a field without a default is always written.
DEFAULTS = {
    f.name: f.default for f in fields(Grant) if f.name in FIELD_NUMBERS and f.default is not MISSING
}
# Written as ``true`` when equal to ``updated_at`` (field 16, itself always a number).
_SAME_AS_UPDATED = frozenset(
    {"access_issued_at", "last_refreshed_at", "refresh_token_issued_at", "created_at"}
)
# Tokens pass through as the provider sent them, lone surrogates included (as JSON escapes them).
_UNICODE_ERRORS = "surrogatepass"


def encode(grant: Grant, record_format: int = 2) -> bytes:
    """``grant``'s record in ``record_format`` (1 or 2; the setting is checked at start)."""
    if record_format == 1:
        data = {name: getattr(grant, name) for name in _PAYLOAD_FIELDS}
        return json.dumps(data, separators=(",", ":")).encode()
    compact: dict[int, Any] = {}
    updated = grant.updated_at
    for name in _PAYLOAD_FIELDS:
        value = getattr(grant, name)
        # ``type`` too: 0.0 == 0 == False, and a float field must come back a float.
        default = DEFAULTS.get(name, MISSING)
        if default is MISSING or value != default or type(value) is not type(default):
            same = name in _SAME_AS_UPDATED and type(value) is float and value == updated
            compact[FIELD_NUMBERS[name]] = True if same else value
    return COMPACT + msgpack.packb(compact, unicode_errors=_UNICODE_ERRORS)


def decode(provider: str, user_id: str, version: int, payload: bytes) -> Grant:
    """The grant a record holds, whichever format; GrantUnreadable if it is not a record."""
    try:
        if payload[:1] == COMPACT:
            raw = msgpack.unpackb(payload[1:], strict_map_key=False, unicode_errors=_UNICODE_ERRORS)
            if not isinstance(raw, dict):
                raise TypeError("a grant record is a map")
            data = {_NAMES[k]: v for k, v in raw.items() if k in _NAMES}
            for name in _SAME_AS_UPDATED & data.keys():
                if data[name] is True:
                    data[name] = data.get("updated_at", DEFAULTS["updated_at"])
        else:
            data = json.loads(payload)
            if not isinstance(data, dict):
                raise TypeError("a grant record is a JSON object")
            if not data.keys() <= _RECORD_FIELDS:
                data = {k: v for k, v in data.items() if k in _RECORD_FIELDS}
        return Grant(provider=provider, user_id=user_id, version=version, **data)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise GrantUnreadable("stored grant record is malformed") from err
