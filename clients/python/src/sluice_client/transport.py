"""httpx transports that send calls through sluice and straight to the API when sluice is
away (``SluiceTransport``, ``AsyncSluiceTransport``)."""

from __future__ import annotations

from typing import Optional, Sequence

import httpx

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

#: Failures that mean the request never left: another way may be tried whatever it is.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)


def _options(
    sluice_url: str,
    mode: str,
    fallback_on: Sequence[int],
    sluice_key: Optional[str],
    sluice_mode: Optional[str],
    regions: Optional[Sequence[str]],
    sluice_timeout: Optional[str],
) -> Options:
    return Options(
        sluice_url=sluice_url,
        mode=mode,
        fallback_on=tuple(fallback_on),
        sluice_key=sluice_key,
        sluice_mode=sluice_mode,
        regions=tuple(regions) if regions else None,
        sluice_timeout=sluice_timeout,
    )


def _to_sluice(options: Options, request: httpx.Request) -> httpx.Request:
    url, headers = through_sluice(options, str(request.url), request.headers.multi_items())
    return httpx.Request(
        request.method,
        url,
        headers=headers,
        content=request.content,
        extensions=request.extensions,
    )


class SluiceTransport(httpx.BaseTransport):
    """Send each call through sluice (``mode="performance"``) or straight to the API first
    (``mode="frugal"``), falling back either way:

    - PERFORMANCE: through sluice as an explicit-target request (HTTPS APIs get every
      feature); sluice unreachable, or its own ``503``: the call goes direct.
    - FRUGAL: direct; on a status in ``fallback_on`` or a connect error, through sluice, which
      waits out the API's pause. After a 429 any method goes again (the API refused it);
      after a 5xx or a failure once sent, only an idempotent method or one with
      ``Idempotency-Key``.

    ``sluice_mode``, ``regions`` and ``sluice_timeout`` become ``Sluice-Mode``,
    ``Sluice-Regions`` and ``Sluice-Timeout``; ``sluice_key`` is ``Sluice-Key``. What happened
    is counted in ``stats``. A request body is read into memory first, so it can be sent again.
    """

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
        direct: Optional[httpx.BaseTransport] = None,
        via: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self.options = _options(
            sluice_url, mode, fallback_on, sluice_key, sluice_mode, regions, sluice_timeout
        )
        self.stats = Stats()
        self._direct = direct or httpx.HTTPTransport()
        self._via = via or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        if self.options.mode == FRUGAL:
            return self._frugal(request)
        return self._performance(request)

    def _sluice(self, request: httpx.Request) -> Optional[httpx.Response]:
        """The answer through sluice, or ``None`` when sluice is away (nothing was sent)."""
        try:
            response = self._via.handle_request(_to_sluice(self.options, request))
        except NOT_SENT as e:
            log.warning("sluice at %s unreachable (%s): calling %s directly", self.options.sluice_url, e, request.url.host)
            self.stats.add("sluice_unavailable")
            return None
        except httpx.TransportError as e:
            # The connection to sluice broke after the request went in: sluice may have sent
            # it on, so only a call that is safe to send twice goes direct.
            if not replayable(request.method, request.headers.multi_items()):
                raise
            log.warning("sluice connection broke (%s): calling %s directly", e, request.url.host)
            self.stats.add("sluice_unavailable")
            return None
        if sluice_refused_itself(response.status_code, response.headers):
            log.warning("sluice answered its own 503 (%s): calling %s directly", response.headers.get("sluice-error"), request.url.host)
            response.read()
            response.close()
            self.stats.add("sluice_unavailable")
            return None
        self.stats.add("via_sluice")
        return response

    def _performance(self, request: httpx.Request) -> httpx.Response:
        response = self._sluice(request)
        if response is not None:
            return response
        self.stats.add("direct")
        return self._direct.handle_request(request)

    def _frugal(self, request: httpx.Request) -> httpx.Response:
        headers = request.headers.multi_items()
        try:
            response = self._direct.handle_request(request)
        except NOT_SENT:
            return self._fall_back(request, None)
        except httpx.TransportError:
            if not replayable(request.method, headers):
                raise
            return self._fall_back(request, None)
        if not frugal_retry(self.options, response.status_code, request.method, headers):
            self.stats.add("direct")
            return response
        # Kept whole, to be the answer if sluice is away.
        response.read()
        response.close()
        return self._fall_back(request, response)

    def _fall_back(self, request: httpx.Request, direct: Optional[httpx.Response]) -> httpx.Response:
        self.stats.add("fell_back_to_sluice")
        response = self._sluice(request)
        if response is not None:
            return response
        if direct is not None:
            self.stats.add("direct")
            return direct
        self.stats.add("direct")
        return self._direct.handle_request(request)

    def close(self) -> None:
        self._direct.close()
        self._via.close()


class AsyncSluiceTransport(httpx.AsyncBaseTransport):
    """``SluiceTransport`` for ``httpx.AsyncClient`` (same modes, fallbacks and options)."""

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
        direct: Optional[httpx.AsyncBaseTransport] = None,
        via: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self.options = _options(
            sluice_url, mode, fallback_on, sluice_key, sluice_mode, regions, sluice_timeout
        )
        self.stats = Stats()
        self._direct = direct or httpx.AsyncHTTPTransport()
        self._via = via or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        if self.options.mode == FRUGAL:
            return await self._frugal(request)
        response = await self._sluice(request)
        if response is not None:
            return response
        self.stats.add("direct")
        return await self._direct.handle_async_request(request)

    async def _sluice(self, request: httpx.Request) -> Optional[httpx.Response]:
        try:
            response = await self._via.handle_async_request(_to_sluice(self.options, request))
        except NOT_SENT as e:
            log.warning("sluice at %s unreachable (%s): calling %s directly", self.options.sluice_url, e, request.url.host)
            self.stats.add("sluice_unavailable")
            return None
        except httpx.TransportError as e:
            # The connection to sluice broke after the request went in: sluice may have sent
            # it on, so only a call that is safe to send twice goes direct.
            if not replayable(request.method, request.headers.multi_items()):
                raise
            log.warning("sluice connection broke (%s): calling %s directly", e, request.url.host)
            self.stats.add("sluice_unavailable")
            return None
        if sluice_refused_itself(response.status_code, response.headers):
            log.warning("sluice answered its own 503 (%s): calling %s directly", response.headers.get("sluice-error"), request.url.host)
            await response.aread()
            await response.aclose()
            self.stats.add("sluice_unavailable")
            return None
        self.stats.add("via_sluice")
        return response

    async def _frugal(self, request: httpx.Request) -> httpx.Response:
        headers = request.headers.multi_items()
        try:
            response = await self._direct.handle_async_request(request)
        except NOT_SENT:
            return await self._fall_back(request, None)
        except httpx.TransportError:
            if not replayable(request.method, headers):
                raise
            return await self._fall_back(request, None)
        if not frugal_retry(self.options, response.status_code, request.method, headers):
            self.stats.add("direct")
            return response
        await response.aread()
        await response.aclose()
        return await self._fall_back(request, response)

    async def _fall_back(self, request: httpx.Request, direct: Optional[httpx.Response]) -> httpx.Response:
        self.stats.add("fell_back_to_sluice")
        response = await self._sluice(request)
        if response is not None:
            return response
        self.stats.add("direct")
        if direct is not None:
            return direct
        return await self._direct.handle_async_request(request)

    async def aclose(self) -> None:
        await self._direct.aclose()
        await self._via.aclose()
