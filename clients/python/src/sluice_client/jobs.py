"""Jobs on sluice's API (``/_sluice/v1/jobs``): a call made later, its result delivered to
webhooks. ``Step`` builds one in the familiar chained shape::

    job = (Step(Sluice("http://127.0.0.1:8080"))
           .url("https://api.example.com/v1/orders").method("POST").json({"item": 7})
           .regions(["us", "eu"]).execution_mode("race")
           .webhooks([{"url": "https://hooks.example.com/a", "secret": "main"}])
           .idempotency_key("order-7")
           .execute())
    job["id"], job["status_url"]
"""

from __future__ import annotations

import base64
import json as _json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import httpx


class JobError(Exception):
    """sluice refused the job (the message names the field) or could not be reached."""

    def __init__(self, status: int, code: Optional[str], message: str) -> None:
        super().__init__(f"{status} {code or ''}: {message}".strip())
        self.status = status
        self.code = code


class Sluice:
    """sluice's jobs API at ``url`` (with ``sluice_key`` when clients are configured)."""

    def __init__(self, url: str = "http://127.0.0.1:8080", sluice_key: Optional[str] = None, *, http: Optional[httpx.Client] = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Sluice-Key": sluice_key} if sluice_key else {}
        self._http = http or httpx.Client(headers=headers, timeout=30.0)

    def _answer(self, r: httpx.Response) -> Dict[str, Any]:
        body = r.json() if r.content else {}
        if r.status_code >= 400:
            raise JobError(r.status_code, r.headers.get("sluice-error"), body.get("message", r.text))
        return body

    def submit(self, spec: Mapping[str, Any]) -> Dict[str, Any]:
        """``POST /_sluice/v1/jobs``: ``{id, status_url, state, existing}``."""
        return self._answer(self._http.post(f"{self.url}/_sluice/v1/jobs", json=dict(spec)))

    def job(self, job_id: str) -> Dict[str, Any]:
        """The job now: state, attempts, result, webhooks."""
        return self._answer(self._http.get(f"{self.url}/_sluice/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Dict[str, Any]:
        """Cancel a job still queued (``JobError`` 409 ``job_started`` once its call went)."""
        return self._answer(self._http.delete(f"{self.url}/_sluice/v1/jobs/{job_id}"))


class Step:
    """A job, built field by field, submitted by ``execute()``."""

    def __init__(self, client: Sluice) -> None:
        self._client = client
        self._spec: Dict[str, Any] = {}

    def _set(self, key: str, value: Any) -> "Step":
        self._spec[key] = value
        return self

    def url(self, url: str) -> "Step":
        return self._set("url", url)

    def method(self, method: str) -> "Step":
        return self._set("method", method.upper())

    def headers(self, headers: Mapping[str, str]) -> "Step":
        return self._set("headers", dict(headers))

    def body(self, body: bytes | str) -> "Step":
        if isinstance(body, bytes):
            self._spec.pop("body", None)
            return self._set("body_base64", base64.b64encode(body).decode())
        self._spec.pop("body_base64", None)
        return self._set("body", body)

    def json(self, value: Any) -> "Step":
        headers = dict(self._spec.get("headers", {}))
        headers.setdefault("Content-Type", "application/json")
        self._spec["headers"] = headers
        return self.body(_json.dumps(value))

    def regions(self, regions: Sequence[str]) -> "Step":
        return self._set("regions", list(regions))

    def execution_mode(self, mode: str) -> "Step":
        """``single``, ``hedge`` or ``race``."""
        return self._set("mode", mode)

    def retry_on(self, classes: Sequence[str]) -> "Step":
        return self._set("retry_on", ",".join(classes))

    def timeout(self, duration: str) -> "Step":
        """The job's whole life, e.g. ``"10m"``."""
        return self._set("timeout", duration)

    def idempotency_key(self, key: str) -> "Step":
        return self._set("idempotency_key", key)

    def webhooks(self, hooks: List[Mapping[str, str]]) -> "Step":
        """Receivers: ``{"url": ..., "secret": <name in [webhooks.secrets]>}``."""
        return self._set("webhooks", [dict(h) for h in hooks])

    def quorum(self, n: int) -> "Step":
        return self._set("quorum", n)

    def metadata(self, value: Mapping[str, Any]) -> "Step":
        return self._set("metadata", dict(value))

    def spec(self) -> Dict[str, Any]:
        return dict(self._spec)

    def execute(self) -> Dict[str, Any]:
        return self._client.submit(self._spec)
