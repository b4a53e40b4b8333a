"""sluice's Python client: route outbound API calls through sluice, and straight to the API
when sluice is away, so sluice never becomes the outage.

- ``SluiceTransport`` / ``AsyncSluiceTransport``: httpx transports (PERFORMANCE, FRUGAL).
- ``SluiceAdapter``: the same for ``requests`` (``pip install 'sluice-client[requests]'``).
- ``Sluice`` and ``Step``: jobs (a call made later, its result sent to webhooks).
- ``verify_webhook``: check a webhook sluice signed, in a receiver.
"""

from ._core import DEFAULT_FALLBACK_ON, FRUGAL, PERFORMANCE, Stats
from .jobs import JobError, Sluice, Step
from .transport import AsyncSluiceTransport, SluiceTransport
from .webhooks import WebhookVerificationError, verify_webhook


def __getattr__(name: str):  # the requests adapter only when asked for (optional extra)
    if name == "SluiceAdapter":
        from .adapter import SluiceAdapter

        return SluiceAdapter
    raise AttributeError(name)


__all__ = [
    "AsyncSluiceTransport",
    "DEFAULT_FALLBACK_ON",
    "FRUGAL",
    "JobError",
    "PERFORMANCE",
    "Sluice",
    "SluiceAdapter",
    "SluiceTransport",
    "Stats",
    "Step",
    "WebhookVerificationError",
    "verify_webhook",
]
