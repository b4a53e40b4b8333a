"""A ``requests`` transport adapter with the behaviour of ``SluiceTransport``::

    session = requests.Session()
    adapter = SluiceAdapter("http://127.0.0.1:8080", mode="frugal")
    session.mount("http://", adapter)
    session.mount("https://", adapter)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

try:
    import requests
    from requests.adapters import HTTPAdapter
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("SluiceAdapter needs requests: pip install 'sluice-client[requests]'") from e

from ._core import (
    DEFAULT_FALLBACK_ON,
    FRUGAL,
    PERFORMANCE,
    Options,
    Stats,
    frugal_retry,
    log,
    replayable,
    sluice_refused_itself,
    through_sluice,
)

NOT_SENT = (requests.exceptions.ConnectionError, requests.exceptions.ConnectTimeout)


class SluiceAdapter(HTTPAdapter):
    """Send each call through sluice or direct first, falling back as ``SluiceTransport``."""

    def __init__(
        self,
        sluice_url: str = "http://127.0.0.1:8080",
        mode: str = PERFORMANCE,
        *,
        fallback_on: Sequence[int] = DEFAULT_FALLBACK_ON,
        sluice_key: Optional[str] = None,
        sluice_mode: Optional[str] = None,
        regions: Optional[Sequence[str]] = None,
        sluice_timeout: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.options = Options(
            sluice_url=sluice_url,
            mode=mode,
            fallback_on=tuple(fallback_on),
            sluice_key=sluice_key,
            sluice_mode=sluice_mode,
            regions=tuple(regions) if regions else None,
            sluice_timeout=sluice_timeout,
        )
        self.stats = Stats()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self.options.mode == FRUGAL:
            return self._frugal(request, **kwargs)
        response = self._sluice(request, **kwargs)
        if response is not None:
            return response
        self.stats.add("direct")
        return super().send(request, **kwargs)

    def _sluice(self, request: requests.PreparedRequest, **kwargs: Any) -> Optional[requests.Response]:
        via = request.copy()
        url, headers = through_sluice(self.options, request.url or "", request.headers.items())
        via.url = url
        via.headers = requests.structures.CaseInsensitiveDict(headers)
        if request.body is not None:
            via.prepare_content_length(request.body)
        try:
            response = super().send(via, **kwargs)
        except NOT_SENT as e:
            log.warning("sluice at %s unreachable (%s): calling directly", self.options.sluice_url, e)
            self.stats.add("sluice_unavailable")
            return None
        if sluice_refused_itself(response.status_code, response.headers):
            log.warning("sluice answered its own 503 (%s): calling directly", response.headers.get("sluice-error"))
            response.close()
            self.stats.add("sluice_unavailable")
            return None
        response.request = request
        self.stats.add("via_sluice")
        return response

    def _frugal(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        method = request.method or "GET"
        headers = list(request.headers.items())
        try:
            response = super().send(request, **kwargs)
        except NOT_SENT:
            return self._fall_back(request, None, **kwargs)
        except requests.exceptions.RequestException:
            if not replayable(method, headers):
                raise
            return self._fall_back(request, None, **kwargs)
        if not frugal_retry(self.options, response.status_code, method, headers):
            self.stats.add("direct")
            return response
        _ = response.content  # kept whole, to be the answer if sluice is away
        return self._fall_back(request, response, **kwargs)

    def _fall_back(
        self, request: requests.PreparedRequest, direct: Optional[requests.Response], **kwargs: Any
    ) -> requests.Response:
        self.stats.add("fell_back_to_sluice")
        response = self._sluice(request, **kwargs)
        if response is not None:
            return response
        self.stats.add("direct")
        if direct is not None:
            return direct
        return super().send(request, **kwargs)
