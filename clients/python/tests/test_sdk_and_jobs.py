"""The OpenAI SDK over the transport against a fake OpenAI server, and jobs: a job built with
``Step`` whose webhook, signed by sluice, verifies with ``verify_webhook``."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from conftest import SECRET, answer
from sluice_client import JobError, Sluice, SluiceTransport, Step, WebhookVerificationError, verify_webhook


def fake_openai(h, body):
    request = json.loads(body)
    assert request["model"] == "gpt-test"
    if request.get("stream"):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for word in ["Hello", " there"]:
            event = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-test",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            data = f"data: {json.dumps(event)}\n\n".encode()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()
        done = b"data: [DONE]\n\n"
        h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        return
    completion = {
        "id": "c0",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    answer(h, 200, json.dumps(completion).encode(), {"Content-Type": "application/json"})


def test_the_openai_sdk_completes_a_chat_call_streamed_and_not(start_sluice, upstream):
    up = upstream({"/v1/chat/completions": fake_openai})
    sluice = start_sluice()
    transport = SluiceTransport(sluice.url)
    client = openai.OpenAI(
        base_url=f"{up.url}/v1",
        api_key="sk-test",
        http_client=httpx.Client(transport=transport),
        max_retries=0,
    )
    messages = [{"role": "user", "content": "hi"}]
    done = client.chat.completions.create(model="gpt-test", messages=messages)
    assert done.choices[0].message.content == "Hello there"
    stream = client.chat.completions.create(model="gpt-test", messages=messages, stream=True)
    words = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(words) == "Hello there"
    assert transport.stats.via_sluice == 2
    assert all("sluice" in r["headers"].get("via", "") for r in up.requests)
    assert up.requests[0]["headers"]["authorization"] == "Bearer sk-test"


def test_a_job_webhook_signed_by_sluice_verifies(start_sluice, upstream):
    api = upstream({"/": lambda h, b: answer(h, 201, b'{"order": 7}', {"Content-Type": "application/json"})})
    hook = upstream({"/": lambda h, b: answer(h, 204, b"")})
    sluice = start_sluice()
    job = (
        Step(Sluice(sluice.url))
        .url(f"{api.url}/v1/orders")
        .method("post")
        .json({"item": 7})
        .execution_mode("single")
        .idempotency_key("order-7")
        .webhooks([{"url": f"{hook.url}/hook", "secret": "main"}])
        .metadata({"order": 7})
        .execute()
    )
    assert job["state"] == "queued"
    deadline = time.time() + 15
    while hook.count() == 0:
        assert time.time() < deadline, "no webhook within 15 s"
        time.sleep(0.05)
    delivery = hook.requests[0]
    payload = verify_webhook(delivery["headers"], delivery["body"], [SECRET])
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job["id"]
    assert payload["data"]["status"] == 201
    assert payload["data"]["metadata"] == {"order": 7}
    assert api.requests[0]["body"] == b'{"item": 7}'
    assert api.requests[0]["headers"]["idempotency-key"] == "order-7"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery["headers"], delivery["body"] + b" ", SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery["headers"], delivery["body"], SECRET, now=time.time() + 3600)
    other = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery["headers"], delivery["body"], other)
    # The job says what happened to its webhook.
    deadline = time.time() + 10
    while Sluice(sluice.url).job(job["id"])["state"] != "delivered":
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_bad_job_is_refused_naming_the_field(start_sluice):
    sluice = start_sluice()
    with pytest.raises(JobError) as e:
        Step(Sluice(sluice.url)).url("http://127.0.0.1:9/x").webhooks(
            [{"url": "http://169.254.169.254/latest", "secret": "main"}]
        ).execute()
    assert e.value.status == 400 and "webhooks[0].url" in str(e.value)
