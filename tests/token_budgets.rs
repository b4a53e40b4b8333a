//! Token budgets against fake LLM APIs that enforce them as OpenAI and Anthropic describe
//! theirs (`support/llm.rs`): ten callers for two minutes get no 429 from the API and use at
//! least 90% of its budget; a streamed completion still arrives piece by piece and its usage
//! settles its estimate; a request larger than the whole budget is refused; and a budget run
//! out holds only the requests that need tokens.

mod support;

use std::time::{Duration, Instant};
use support::llm::{Limits, LlmUpstream, Shape};
use support::*;

#[allow(unused_imports)]
use support::redis;

const WINDOW: Duration = Duration::from_secs(120);
const CALLERS: usize = 10;

/// A chat request of about 300 tokens: 600 characters of prompt (150 tokens) and
/// `max_tokens` 150.
fn chat(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "max_tokens": 150,
        "stream": stream,
        "messages": [{"role": "user", "content": "word ".repeat(120)}],
    })
}

/// `CALLERS` callers, each sending one request at a time through sluice for `WINDOW`; a
/// refusal by sluice is retried after its `Retry-After`. Returns the statuses the callers got
/// from the API (sluice's own refusals carry `Sluice-Error` and are not counted).
fn ten_callers(sluice: &Sluice, port: u16, model: &'static str) -> (usize, usize, usize) {
    callers_on(&[sluice], CALLERS, WINDOW, port, model)
}

/// `n` callers spread over `nodes`, for `window`: (answered, the API's 429s, sluice's refusals).
fn callers_on(
    nodes: &[&Sluice],
    n: usize,
    window: Duration,
    port: u16,
    model: &'static str,
) -> (usize, usize, usize) {
    let rt = runtime(2);
    let clients: Vec<reqwest::Client> = nodes.iter().map(|s| proxied_client(s, None)).collect();
    let end = Instant::now() + window;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..n {
            let client = clients[i % clients.len()].clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut upstream_429, mut refused) = (0, 0, 0);
                loop {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    let sent = client
                        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
                        .header("sluice-caller", format!("caller-{i}"))
                        .json(&chat(model, false))
                        .timeout(left)
                        .send()
                        .await;
                    let Ok(r) = sent else { break };
                    match (
                        r.status().as_u16(),
                        r.headers().get("sluice-error").is_some(),
                    ) {
                        (200, _) => ok += 1,
                        (429, false) => upstream_429 += 1,
                        (_, true) => {
                            refused += 1;
                            let wait: u64 = r
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok()?.parse().ok())
                                .unwrap_or(1);
                            let left = end.saturating_duration_since(Instant::now());
                            tokio::time::sleep(Duration::from_secs(wait.clamp(1, 30)).min(left))
                                .await;
                        }
                        (s, _) => panic!("caller {i}: unexpected {s}"),
                    }
                    let _ = r.bytes().await;
                }
                (ok, upstream_429, refused)
            }));
        }
        let mut sum = (0, 0, 0);
        for t in tasks {
            let (a, b, c) = t.await.expect("caller");
            sum = (sum.0 + a, sum.1 + b, sum.2 + c);
        }
        sum
    })
}

/// An OpenAI-shaped API with a budget of `tokens` a minute, answering after `latency`.
fn openai(tokens: u64, latency: Duration) -> LlmUpstream {
    let limits = Limits {
        tokens,
        input: 0,
        output: 0,
    };
    LlmUpstream::start(Shape::OpenAi, limits, latency)
}

/// The upstream on `port` as `/status` shows it.
fn host_status(sluice: &Sluice, port: u16) -> serde_json::Value {
    let (_, status) = sluice.admin_get("/status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    status["hosts"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["host"] == format!("127.0.0.1:{port}")))
        .cloned()
        .expect("the host in /status")
}

fn sluice_for(port: u16, budgets: &str) -> Sluice {
    Sluice::start(
        "",
        &format!(
            "[hosts.\"127.0.0.1:{port}\"]\nrps = 50.0\nburst = 10\nmax_queue_wait = \"130s\"\n\
             {budgets}\n"
        ),
    )
}

#[test]
fn ten_callers_against_an_openai_shaped_budget_use_it_without_a_429() {
    let limit = 1_000;
    let api = openai(limit, Duration::from_millis(50));
    let sluice = sluice_for(api.port(), &format!("tokens_per_minute = {limit}"));
    let (ok, upstream_429, refused) = ten_callers(&sluice, api.port(), "gpt-test");
    let accepted = api.accepted();
    let tokens: u64 = accepted.iter().map(|a| a.input + a.output).sum();
    let per_minute = tokens as f64 / WINDOW.as_secs_f64() * 60.0;
    println!(
        "figure: openai-shaped, {limit} tokens/min, {CALLERS} callers, {}s: {} answered, \
         {tokens} tokens used = {per_minute:.0}/min ({:.2}x the budget; {:.2}x without the \
         first minute's full bucket), API 429s {}, sluice refusals {refused}",
        WINDOW.as_secs(),
        accepted.len(),
        per_minute / limit as f64,
        (tokens - limit) as f64 / WINDOW.as_secs_f64() * 60.0 / limit as f64,
        api.refused(),
    );
    assert_eq!(api.refused(), 0, "the API refused requests");
    assert_eq!(upstream_429, 0);
    assert_eq!(ok, accepted.len());
    assert!(
        per_minute >= 0.9 * limit as f64,
        "{per_minute:.0} tokens/min of {limit}"
    );
    // Estimates and usage are visible; the estimate is an upper bound here.
    let (estimated, used) = (
        sluice.metric("sluice_tokens_estimated_total"),
        sluice.metric("sluice_tokens_used_total"),
    );
    assert_eq!(used, tokens as f64);
    assert!(estimated >= used, "{estimated} < {used}");
    println!(
        "figure: openai-shaped estimate / usage: {:.3}",
        estimated / used
    );
}

#[test]
fn ten_callers_against_anthropic_shaped_input_and_output_budgets_use_them_without_a_429() {
    let (input_limit, output_limit) = (1_000, 400);
    let api = LlmUpstream::start(
        Shape::Anthropic,
        Limits {
            tokens: 0,
            input: input_limit,
            output: output_limit,
        },
        Duration::from_millis(50),
    );
    let sluice = sluice_for(
        api.port(),
        &format!(
            "input_tokens_per_minute = {input_limit}\noutput_tokens_per_minute = {output_limit}"
        ),
    );
    let (ok, upstream_429, refused) = ten_callers(&sluice, api.port(), "claude-test");
    let accepted = api.accepted();
    let output: u64 = accepted.iter().map(|a| a.output).sum();
    let input: u64 = accepted.iter().map(|a| a.input).sum();
    let minutes = WINDOW.as_secs_f64() / 60.0;
    // Output is the budget that binds: 100 used of every 150 asked.
    let per_minute = output as f64 / minutes;
    println!(
        "figure: anthropic-shaped, {input_limit} input + {output_limit} output tokens/min, \
         {CALLERS} callers, {}s: {} answered, output {output} = {per_minute:.0}/min ({:.2}x \
         the output budget; {:.2}x without the first minute's full bucket), input {:.0}/min, \
         API 429s {}, sluice refusals {refused}",
        WINDOW.as_secs(),
        accepted.len(),
        per_minute / output_limit as f64,
        (output - output_limit) as f64 / minutes / output_limit as f64,
        input as f64 / minutes,
        api.refused(),
    );
    assert_eq!(api.refused(), 0, "the API refused requests");
    assert_eq!(upstream_429, 0);
    assert_eq!(ok, accepted.len());
    assert!(
        per_minute >= 0.9 * output_limit as f64,
        "{per_minute:.0} output tokens/min of {output_limit}"
    );
}

#[test]
fn a_streamed_completion_arrives_piece_by_piece_and_its_usage_settles_its_estimate() {
    let api = openai(100_000, Duration::from_millis(20));
    let port = api.port();
    // No budget configured: it is learned from the first answer.
    let sluice = Sluice::start(
        "",
        &format!("[hosts.\"127.0.0.1:{port}\"]\nrps = 50.0\nburst = 10\n"),
    );
    let rt = rt();
    let proxied = proxied_client(&sluice, None);
    let direct = direct_client();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let first = rt.block_on(async {
        let r = proxied
            .post(&url)
            .json(&chat("gpt-test", false))
            .send()
            .await;
        r.expect("first").status().as_u16()
    });
    assert_eq!(first, 200);
    let host = host_status(&sluice, port);
    assert_eq!(host["tokens"][0]["budget"], "tokens");
    assert_eq!(host["tokens"][0]["limit_per_minute"], 100_000);
    assert_eq!(host["tokens"][0]["configured"], false);
    // Sent before the host had a budget, its body was not read: learned for no model in
    // particular (it stands in for every model until a model's own is learned).
    assert_eq!(host["tokens"][0]["model"], "(none)");
    let (estimated0, used0) = (
        sluice.metric("sluice_tokens_estimated_total"),
        sluice.metric("sluice_tokens_used_total"),
    );
    assert_eq!(
        (estimated0, used0),
        (0.0, 0.0),
        "sent before the budget was known: nothing charged"
    );

    // Streamed, with its usage at the end: the arrival of each piece, direct and through
    // sluice.
    let mut body = chat("gpt-test", true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let arrivals = |client: &reqwest::Client| {
        rt.block_on(async {
            let start = Instant::now();
            let mut r = client.post(&url).json(&body).send().await.expect("stream");
            assert_eq!(r.status().as_u16(), 200);
            let mut at = Vec::new();
            let mut text = Vec::new();
            while let Some(chunk) = r.chunk().await.expect("chunk") {
                at.push(start.elapsed());
                text.extend_from_slice(&chunk);
            }
            (at, String::from_utf8(text).expect("utf-8"))
        })
    };
    let (direct_at, _) = arrivals(&direct);
    let (via_at, text) = arrivals(&proxied);
    println!(
        "figure: streamed completion, time to first piece direct {:?}, through sluice {:?}; \
         pieces through sluice at {:?}",
        direct_at[0], via_at[0], via_at
    );
    assert!(
        text.contains("piece 4") && text.contains("\"usage\""),
        "{text}"
    );
    // Piece by piece: the first arrives before the API has written the rest (the pieces
    // are 100 ms apart, 400 ms from first to last), in at least five reads.
    let last = *via_at.last().expect("pieces");
    assert!(via_at.len() >= 5, "{via_at:?}");
    assert!(
        last.saturating_sub(via_at[0]) >= Duration::from_millis(350),
        "{via_at:?}"
    );
    let used = sluice.metric("sluice_tokens_used_total") - used0;
    let estimated = sluice.metric("sluice_tokens_estimated_total") - estimated0;
    assert_eq!(used, 250.0, "the stream's usage event settled it");
    assert!(estimated > used, "estimated {estimated}, used {used}");
    assert_eq!(api.accepted().len(), 3, "one direct, two through sluice");
    let (_, status) = sluice.admin_get("/status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    let learned = status["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|h| h["tokens"].as_array().cloned().unwrap_or_default())
        .any(|t| t["model"] == "gpt-test" && t["limit_per_minute"] == 100_000);
    assert!(learned, "learned for its model: {status}");

    // More than the whole budget: refused, never sent.
    let huge = serde_json::json!({"model": "gpt-test", "max_tokens": 200_000, "messages": []});
    let (status, error) = rt.block_on(async {
        let r = proxied.post(&url).json(&huge).send().await.expect("huge");
        let e = r
            .headers()
            .get("sluice-error")
            .map(|v| v.to_str().unwrap_or("").to_string());
        (r.status().as_u16(), e)
    });
    assert_eq!((status, error.as_deref()), (413, Some("over_token_budget")));
    assert_eq!(api.accepted().len(), 3);
}

/// A token budget run out holds the requests that need tokens until its reset; a request
/// that needs none (a GET) still goes.
#[test]
fn a_token_budget_run_out_holds_only_requests_that_need_tokens() {
    let up = FakeUpstream::builder()
        .route(
            "/",
            Reply::text(200, "{}")
                .header("content-type", "application/json")
                .header("x-ratelimit-limit-tokens", "1000")
                .header("x-ratelimit-remaining-tokens", "0")
                .header("x-ratelimit-reset-tokens", "3s")
                .header("x-ratelimit-remaining-requests", "99"),
        )
        .start();
    let port = up.port();
    let sluice = Sluice::start(
        "",
        &format!("[hosts.\"127.0.0.1:{port}\"]\nrps = 50.0\nburst = 10\n"),
    );
    let rt = rt();
    let client = proxied_client(&sluice, None);
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let send = |post: bool| {
        rt.block_on(async {
            let req = match post {
                true => client.post(&url).json(&chat("gpt-test", false)),
                false => client.get(&url),
            };
            let r = req
                .header("sluice-timeout", "1s")
                .send()
                .await
                .expect("send");
            let e = r
                .headers()
                .get("sluice-error")
                .map(|v| v.to_str().unwrap_or("").to_string());
            (r.status().as_u16(), e)
        })
    };
    assert_eq!(send(true), (200, None), "the first teaches the budget");
    assert_eq!(send(false), (200, None), "a GET needs no tokens");
    assert_eq!(send(true), (429, Some("rate_limited".into())));
    assert_eq!(up.count(), 2, "the held request was not sent");
    // What the upstream says of its request budget is shown.
    let host = host_status(&sluice, port);
    assert_eq!(host["upstream_requests"]["remaining"], 99);
    assert_eq!(host["tokens"][0]["upstream_remaining"], 0);
}

/// Two nodes sharing one Redis hold one budget together: the API, which allows the budget
/// once, refuses nothing, though each node alone would admit all of it.
#[test]
fn a_fleet_shares_one_token_budget() {
    let Some(redis) = redis::Redis::start() else {
        return;
    };
    let limit = 3_000;
    let api = openai(limit, Duration::from_millis(50));
    let port = api.port();
    let config = format!(
        "[shared]\nbackend = \"redis\"\nredis_url = \"{}\"\nheartbeat = \"250ms\"\n\
         [hosts.\"127.0.0.1:{port}\"]\nrps = 50.0\nburst = 10\nmax_queue_wait = \"60s\"\n\
         tokens_per_minute = {limit}\n",
        redis.url()
    );
    let nodes = [Sluice::start("", &config), Sluice::start("", &config)];
    let window = Duration::from_secs(40);
    let (ok, upstream_429, refused) =
        callers_on(&[&nodes[0], &nodes[1]], 8, window, port, "gpt-test");
    let accepted = api.accepted();
    let tokens: u64 = accepted.iter().map(|a| a.input + a.output).sum();
    let per_minute = tokens as f64 / window.as_secs_f64() * 60.0;
    let calls: f64 = nodes
        .iter()
        .map(|n| n.metric("sluice_shared_redis_calls_total{op=\"tokens\"}"))
        .sum();
    println!(
        "figure: fleet of 2 nodes, {limit} tokens/min, 8 callers, {}s: {ok} answered, {tokens} \
         tokens = {per_minute:.0}/min, API 429s {}, sluice refusals {refused}, {calls} token \
         calls to Redis ({:.1} per answer)",
        window.as_secs(),
        api.refused(),
        calls / ok.max(1) as f64,
    );
    assert_eq!(
        api.refused(),
        0,
        "the API refused requests: the budget was not shared"
    );
    assert_eq!(upstream_429, 0);
    assert!(
        per_minute >= 0.9 * limit as f64,
        "{per_minute:.0} tokens/min of {limit}"
    );
    assert!(calls > 0.0, "the budget was counted in Redis");
}
