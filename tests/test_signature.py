"""Signature checking and the verify handshake, as plain function calls."""
import json

import pytest

from messenger.signature import is_valid_signature, is_verify_request, sign

# Known-answer vector, computed independently with
#   printf '%s' "$BODY" | openssl dgst -sha256 -hmac known-answer-secret
BODY = rb'{"object":"page","entry":[{"id":"1","messaging":[{"message":{"text":"caf\u00e9 \ud83d\ude00 1\/2"}}]}]}'
SECRET = "known-answer-secret"
SHA256 = "sha256=344b91f8213315cac7c5d467327e4f779c61737238a3c8c4046bb37eca5f43fe"
SHA1 = "sha1=e2235876e012fe010f9616a682b25c817bdac362"


def test_known_answer_vectors():
    assert sign(BODY, SECRET) == SHA256
    assert sign(BODY, SECRET, "sha1") == SHA1


def test_reserialised_json_does_not_match():
    """Meta escapes non-ASCII and '/': only the raw bytes carry the signature."""
    reserialised = json.dumps(json.loads(BODY), ensure_ascii=False, separators=(",", ":")).encode()
    assert reserialised != BODY
    assert not is_valid_signature(reserialised, {"X-Hub-Signature-256": SHA256}, SECRET)


@pytest.mark.parametrize("headers, valid", [
    ({"X-Hub-Signature-256": SHA256}, True),
    ({"X-Hub-Signature-256": SHA256.upper().replace("SHA256", "sha256")}, True),
    ({"X-Hub-Signature": SHA1}, True),
    ({"X-Hub-Signature-256": SHA256, "X-Hub-Signature": "sha1=" + "0" * 40}, True),
    # the legacy header only counts when the SHA-256 one is absent
    ({"X-Hub-Signature-256": "sha256=" + "0" * 64, "X-Hub-Signature": SHA1}, False),
    ({"X-Hub-Signature-256": ""}, False),
    ({"X-Hub-Signature-256": SHA256[:-1]}, False),
    ({"X-Hub-Signature-256": SHA1}, False),
    ({"X-Hub-Signature-256": "sha256=" + "é" * 64}, False),
    ({}, False),
], ids=["sha256", "uppercase-hex", "legacy-sha1", "sha256-wins", "bad-sha256-no-fallback",
        "empty", "truncated", "wrong-algorithm", "non-ascii", "missing"])
def test_signature_headers(headers, valid):
    assert is_valid_signature(BODY, headers, SECRET) is valid


def test_wrong_secret_fails():
    assert not is_valid_signature(BODY, {"X-Hub-Signature-256": SHA256}, "another-secret")


@pytest.mark.parametrize("args, ok", [
    ({"hub.mode": "subscribe", "hub.verify_token": "tok", "hub.challenge": "1"}, True),
    ({"hub.mode": "subscribe", "hub.verify_token": "tok2", "hub.challenge": "1"}, False),
    ({"hub.mode": "unsubscribe", "hub.verify_token": "tok", "hub.challenge": "1"}, False),
    ({"hub.verify_token": "tok"}, False),
    ({"hub.mode": "subscribe"}, False),
    ({"hub.mode": "subscribe", "hub.verify_token": "tök"}, False),
], ids=["match", "wrong-token", "wrong-mode", "no-mode", "no-token", "non-ascii-token"])
def test_verify_request(args, ok):
    assert is_verify_request(args, "tok") is ok
