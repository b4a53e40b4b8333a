"""What the transports share: the two modes, how a call is addressed to sluice, when a call
may go another way, and the counters a caller can read."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

log = logging.getLogger("sluice_client")

PERFORMANCE = "performance"
FRUGAL = "frugal"
MODES = (PERFORMANCE, FRUGAL)

#: Statuses after which FRUGAL sends the call through sluice.
DEFAULT_FALLBACK_ON: Tuple[int, ...] = (429, 500, 502, 503, 504)

#: Methods that mean the same when sent twice.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})

#: Headers that belong to one connection, not to the call.
HOP_BY_HOP = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "content-length",
    }
)


@dataclass
class Stats:
    """What a transport did, for the caller to read (``transport.stats``)."""

    #: Calls answered through sluice.
    via_sluice: int = 0
    #: Calls answered by the API directly.
    direct: int = 0
    #: Calls that went direct because sluice was unreachable or answered its own 503.
    sluice_unavailable: int = 0
    #: FRUGAL calls sent through sluice after a direct 429, 5xx or connect error.
    fell_back_to_sluice: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


@dataclass(frozen=True)
class Options:
    """How calls are sent: the mode, where sluice is, and the control headers it reads."""

    sluice_url: str = "http://127.0.0.1:8080"
    mode: str = PERFORMANCE
    fallback_on: Tuple[int, ...] = DEFAULT_FALLBACK_ON
    sluice_key: Optional[str] = None
    sluice_mode: Optional[str] = None
    regions: Optional[Sequence[str]] = None
    sluice_timeout: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        parts = urlsplit(self.sluice_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"sluice_url must be http(s)://host:port, not {self.sluice_url!r}")

    def control_headers(self) -> dict:
        """``Sluice-*`` headers for a call sent through sluice."""
        h = {}
        if self.sluice_key:
            h["Sluice-Key"] = self.sluice_key
        if self.sluice_mode:
            h["Sluice-Mode"] = self.sluice_mode
        if self.regions:
            h["Sluice-Regions"] = ",".join(self.regions)
        if self.sluice_timeout:
            h["Sluice-Timeout"] = self.sluice_timeout
        return h


def through_sluice(options: Options, url: str, headers: Iterable[Tuple[str, str]]) -> Tuple[str, list]:
    """The URL and headers of a call sent to sluice as an explicit-target request: the path and
    query go to sluice, the scheme and authority in ``Sluice-Target``."""
    parts = urlsplit(url)
    target = f"{parts.scheme}://{parts.netloc}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    base = options.sluice_url.rstrip("/")
    out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    out.append(("Sluice-Target", target))
    out.extend(options.control_headers().items())
    return base + path, out


def sluice_refused_itself(status: int, headers: Mapping[str, str]) -> bool:
    """Is this sluice's own 503 (it is draining, its shared state or regions are away), as
    opposed to the API's? Then the call goes direct."""
    return status == 503 and "sluice-error" in {k.lower() for k in headers.keys()}


def replayable(method: str, headers: Iterable[Tuple[str, str]]) -> bool:
    """May the call be sent again after a failure once it was sent?"""
    if method.upper() in IDEMPOTENT:
        return True
    return any(k.lower() == "idempotency-key" for k, _ in headers)


def frugal_retry(options: Options, status: int, method: str, headers: Iterable[Tuple[str, str]]) -> bool:
    """After a direct answer, does FRUGAL send the call again through sluice? After a 429
    always (the API refused it without doing it); after another listed status only when
    sending it twice is safe."""
    if status not in options.fallback_on:
        return False
    return status == 429 or replayable(method, headers)
