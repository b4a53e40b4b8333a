"""Verify a webhook sluice signed (Standard Webhooks 1.0), in a receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, Iterable, Mapping, Union


class WebhookVerificationError(Exception):
    """The webhook is not signed by any of the secrets, or is too old or too new."""


def _key(secret: str) -> bytes:
    text = secret[len("whsec_") :] if secret.startswith("whsec_") else secret
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise ValueError("a secret is whsec_ followed by base64") from e


def _header(headers: Mapping[str, str], name: str) -> str:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    raise WebhookVerificationError(f"missing {name} header")


def verify_webhook(
    headers: Mapping[str, str],
    body: Union[bytes, str],
    secrets: Union[str, Iterable[str]],
    *,
    tolerance: int = 300,
    now: float = None,  # type: ignore[assignment]
) -> Any:
    """Check ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` against the body
    and any of ``secrets`` (``whsec_...``; several while rotating), and that the timestamp is
    within ``tolerance`` seconds of now. Returns the parsed JSON payload; raises
    ``WebhookVerificationError`` otherwise. The same ``webhook-id`` on a later delivery is
    the same message sent again: deduplicate on it."""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    try:
        ts = int(stamp)
    except ValueError as e:
        raise WebhookVerificationError("webhook-timestamp is not a number") from e
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is too far from now")
    signed = f"{msg_id}.{ts}.".encode() + raw
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    given = [s.split(",", 1)[1] for s in signatures.split(" ") if s.startswith("v1,")]
    for secret in keys:
        expected = base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()
        if any(hmac.compare_digest(expected, g) for g in given):
            return json.loads(raw)
    raise WebhookVerificationError("no signature matches")
