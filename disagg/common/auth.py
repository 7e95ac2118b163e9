"""The ``--api-key`` check shared by instances and the proxy (vLLM's: every ``/v1/*`` request
needs ``Authorization: Bearer KEY``; /health, /metrics and the rest stay open)."""

from __future__ import annotations

import hmac

API_KEY_MESSAGE = "missing or wrong API key; send 'Authorization: Bearer KEY'"


def needs_api_key(path: str) -> bool:
    """True for the paths ``--api-key`` protects."""
    return path == "/v1" or path.startswith("/v1/")


def bearer_matches(authorization: str, key: str) -> bool:
    """True when an ``Authorization`` header value is ``Bearer <key>`` (constant-time)."""
    scheme, _, token = authorization.partition(" ")
    # Headers arrive decoded with surrogateescape: encoding back gives the bytes as sent.
    sent = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, key.encode())
