//! A fake LLM API that enforces token budgets as providers describe them, per minute and
//! refilled continuously:
//! - OpenAI-shaped: one budget of tokens; a request needs its prompt plus its `max_tokens`
//!   when it arrives, and what it did not use of `max_tokens` comes back when it ends.
//!   Headers `x-ratelimit-{limit,remaining,reset}-tokens` (reset as a Go duration).
//! - Anthropic-shaped: an input budget (the prompt) and an output budget (`max_tokens` at the
//!   start, adjusted to what was used at the end). Headers
//!   `anthropic-ratelimit-{input,output}-tokens-{limit,remaining,reset}` (RFC 3339).
//!
//! The prompt counts as its messages' characters / 4; the answer uses two thirds of
//! `max_tokens`. It answers `usage` in JSON, or streams (`"stream": true`) five pieces 100 ms
//! apart and then its usage event. Over a budget it answers 429, and counts it.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    OpenAi,
    Anthropic,
}

/// Per minute, 0 for none: tokens (OpenAI), input and output (Anthropic).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub tokens: u64,
    pub input: u64,
    pub output: u64,
}

/// What the fake accepted: when, the prompt's tokens and the answer's.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub at: Instant,
    pub input: u64,
    pub output: u64,
}

struct Bucket {
    limit: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: u64, now: Instant) -> Bucket {
        Bucket {
            limit: limit as f64,
            level: limit as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * self.limit / 60.0).min(self.limit);
        self.at = now;
    }

    /// Time until full.
    fn reset(&self) -> Duration {
        if self.limit <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(((self.limit - self.level) * 60.0 / self.limit).max(0.0))
    }
}

struct State {
    shape: Shape,
    /// tokens, input, output (a limit of 0: none).
    buckets: Mutex<[Bucket; 3]>,
    accepted: Mutex<Vec<Accepted>>,
    refused: AtomicUsize,
    latency: Duration,
}

pub struct LlmUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LlmUpstream {
    pub fn start(shape: Shape, limits: Limits, latency: Duration) -> LlmUpstream {
        let now = Instant::now();
        let state = Arc::new(State {
            shape,
            buckets: Mutex::new([
                Bucket::new(limits.tokens, now),
                Bucket::new(limits.input, now),
                Bucket::new(limits.output, now),
            ]),
            accepted: Mutex::new(Vec::new()),
            refused: AtomicUsize::new(0),
            latency,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let (tcp, _) = tokio::select! {
                        r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                        _ = &mut stop_rx => return,
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                        let io = hyper_util::rt::TokioIo::new(tcp);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    });
                }
            });
        });
        LlmUpstream {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.state.accepted.lock().expect("lock").clone()
    }

    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for LlmUpstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// The characters of a request's messages (string contents, or text parts), and of its
/// `system` prompt.
fn prompt_chars(v: &serde_json::Value) -> u64 {
    let text = |c: &serde_json::Value| -> u64 {
        match c {
            serde_json::Value::String(s) => s.chars().count() as u64,
            serde_json::Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .map(|t| t.chars().count() as u64)
                .sum(),
            _ => 0,
        }
    };
    let messages: u64 = v.get("messages").and_then(|m| m.as_array()).map_or(0, |m| {
        m.iter().filter_map(|m| m.get("content")).map(text).sum()
    });
    messages + v.get("system").map_or(0, text)
}

fn headers(
    shape: Shape,
    b: &[Bucket; 3],
    mut r: hyper::http::response::Builder,
) -> hyper::http::response::Builder {
    match shape {
        Shape::OpenAi => {
            let t = &b[0];
            r = r
                .header("x-ratelimit-limit-tokens", (t.limit as u64).to_string())
                .header(
                    "x-ratelimit-remaining-tokens",
                    (t.level.max(0.0) as u64).to_string(),
                )
                .header(
                    "x-ratelimit-reset-tokens",
                    format!("{}ms", t.reset().as_millis()),
                );
        }
        Shape::Anthropic => {
            for (name, t) in [("input", &b[1]), ("output", &b[2])] {
                let at = SystemTime::now() + t.reset();
                r = r
                    .header(
                        format!("anthropic-ratelimit-{name}-tokens-limit"),
                        (t.limit as u64).to_string(),
                    )
                    .header(
                        format!("anthropic-ratelimit-{name}-tokens-remaining"),
                        (t.level.max(0.0) as u64).to_string(),
                    )
                    .header(
                        format!("anthropic-ratelimit-{name}-tokens-reset"),
                        humantime::format_rfc3339_seconds(at).to_string(),
                    );
            }
        }
    }
    r
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let input = prompt_chars(&v).div_ceil(4);
    let max = v.get("max_tokens").and_then(|m| m.as_u64()).unwrap_or(100);
    let output = max * 2 / 3;
    let stream = v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    let now = Instant::now();
    // What each budget needs at the start: tokens (prompt + bound), input, output (bound).
    let need = [input + max, input, max];
    let head = {
        let mut b = st.buckets.lock().expect("lock");
        for bucket in b.iter_mut() {
            bucket.refill(now);
        }
        let short = b
            .iter()
            .zip(need)
            .any(|(bucket, n)| bucket.limit > 0.0 && bucket.level < n as f64);
        if short {
            st.refused.fetch_add(1, Ordering::SeqCst);
            let r = headers(st.shape, &b, Response::builder().status(429));
            let body = Full::new(Bytes::from_static(
                b"{\"error\":{\"type\":\"rate_limit_error\"}}",
            ))
            .boxed();
            return Ok(r
                .header("content-type", "application/json")
                .body(body)
                .expect("429"));
        }
        for (bucket, n) in b.iter_mut().zip(need) {
            if bucket.limit > 0.0 {
                bucket.level -= n as f64;
            }
        }
        st.accepted.lock().expect("lock").push(Accepted {
            at: now,
            input,
            output,
        });
        headers(st.shape, &b, Response::builder().status(200))
    };
    // The unused part of the bound comes back when the answer ends.
    let give_back = {
        let st = st.clone();
        move || {
            let mut b = st.buckets.lock().expect("lock");
            let now = Instant::now();
            for k in [0, 2] {
                b[k].refill(now);
                if b[k].limit > 0.0 {
                    b[k].level = (b[k].level + (max - output) as f64).min(b[k].limit);
                }
            }
        }
    };
    let usage = match st.shape {
        Shape::OpenAi => {
            serde_json::json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output})
        }
        Shape::Anthropic => serde_json::json!({"input_tokens": input, "output_tokens": output}),
    };
    if !stream {
        tokio::time::sleep(st.latency).await;
        give_back();
        let body = serde_json::json!({"id": "x", "usage": usage}).to_string();
        let r = head.header("content-type", "application/json");
        return Ok(r.body(Full::new(Bytes::from(body)).boxed()).expect("200"));
    }
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(|u| u.as_bool())
        .unwrap_or(st.shape == Shape::Anthropic);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let shape = st.shape;
    tokio::spawn(async move {
        if shape == Shape::Anthropic {
            let start = serde_json::json!({"type": "message_start", "message": {"usage": {"input_tokens": input, "output_tokens": 1}}});
            let _ = tx
                .send(Bytes::from(format!(
                    "event: message_start\ndata: {start}\n\n"
                )))
                .await;
        }
        for i in 0..5 {
            let piece =
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"piece {i}\"}}}}]}}\n\n");
            if tx.send(Bytes::from(piece)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        give_back();
        if include_usage {
            let last = match shape {
                Shape::OpenAi => format!(
                    "data: {}\n\ndata: [DONE]\n\n",
                    serde_json::json!({"choices": [], "usage": usage})
                ),
                Shape::Anthropic => format!(
                    "event: message_delta\ndata: {}\n\n",
                    serde_json::json!({"type": "message_delta", "usage": {"output_tokens": output}})
                ),
            };
            let _ = tx.send(Bytes::from(last)).await;
        }
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let r = head.header("content-type", "text/event-stream");
    Ok(r.body(StreamBody::new(frames).boxed()).expect("stream"))
}
