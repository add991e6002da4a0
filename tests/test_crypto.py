"""Encryption at rest: records bound to their grant, tamper-evident, readable across rotation."""

from __future__ import annotations

import base64

import pytest

from broker.config import parse_encryption_keys
from broker.crypto import KeyRing, grant_aad, new_key
from broker.errors import GrantUnreadable

K1 = ("k1", bytes(range(32)))
K2 = ("k2", bytes(range(50, 82)))
PLAINTEXT = b'{"refresh_token":"rt-secret"}'
AAD = grant_aad("p", "alice")


def test_a_record_decrypts_to_what_was_encrypted() -> None:
    ring = KeyRing([K1])
    assert ring.decrypt(ring.encrypt(PLAINTEXT, AAD), AAD) == PLAINTEXT


def test_the_same_plaintext_encrypts_differently_each_time() -> None:
    ring = KeyRing([K1])
    first, second = ring.encrypt(PLAINTEXT, AAD), ring.encrypt(PLAINTEXT, AAD)
    assert first != second
    assert PLAINTEXT not in first


@pytest.mark.parametrize(("provider", "user_id"), [("p", "bob"), ("q", "alice")])
def test_a_record_is_unreadable_as_another_grant(provider: str, user_id: str) -> None:
    ring = KeyRing([K1])
    blob = ring.encrypt(PLAINTEXT, AAD)
    with pytest.raises(GrantUnreadable):
        ring.decrypt(blob, grant_aad(provider, user_id))


def test_any_changed_byte_makes_the_record_unreadable() -> None:
    ring = KeyRing([K1])
    blob = ring.encrypt(PLAINTEXT, AAD)
    for index in range(len(blob)):
        for mask in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[index] ^= mask
            with pytest.raises(GrantUnreadable):
                ring.decrypt(bytes(tampered), AAD)


@pytest.mark.parametrize("cut", [0, 1, 4, 20])
def test_a_truncated_record_is_unreadable(cut: int) -> None:
    ring = KeyRing([K1])
    blob = ring.encrypt(PLAINTEXT, AAD)
    with pytest.raises(GrantUnreadable):
        ring.decrypt(blob[:cut], AAD)


def test_records_written_before_a_rotation_stay_readable() -> None:
    old = KeyRing([K1]).encrypt(PLAINTEXT, AAD)
    rotated = KeyRing([K2, K1])
    assert rotated.decrypt(old, AAD) == PLAINTEXT
    assert rotated.key_id_of(old) == "k1"
    assert rotated.key_id_of(rotated.encrypt(PLAINTEXT, AAD)) == "k2"


def test_a_removed_key_is_named_but_never_shown() -> None:
    old = KeyRing([K1]).encrypt(PLAINTEXT, AAD)
    with pytest.raises(GrantUnreadable) as caught:
        KeyRing([K2]).decrypt(old, AAD)
    message = str(caught.value)
    assert "'k1'" in message
    for _, material in (K1, K2):
        assert base64.b64encode(material).decode() not in message
        assert material.hex() not in message
        assert repr(material)[2:-1] not in message


def test_new_key_is_a_valid_encryption_key_setting() -> None:
    text = new_key()
    [(kid, material)] = parse_encryption_keys(text)
    assert len(material) == 32
    ring = KeyRing([(kid, material)])
    assert ring.decrypt(ring.encrypt(PLAINTEXT, AAD), AAD) == PLAINTEXT
    assert new_key() != text
