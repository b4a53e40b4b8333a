//! The request body on its way up: read from the client only after admission, streamed to the
//! first attempt through a small channel (so a slow upstream slows the client, and memory stays
//! bounded), while a bounded replay buffer keeps what a retry or a duplicate must send again.
//! A body that outgrows the buffer keeps streaming to its one attempt and is never replayed.
//!
//! The streamed attempt is told where the body ends ([`Piece::End`]), never left to infer it:
//! pingora-core hands back empty pieces (a size line or a CRLF alone in a read, the trailer
//! section), and an empty write upstream is a chunked body's last chunk. Empty pieces are
//! dropped here; a stream that stops without `End` is a body cut short, and its upstream
//! connection is never pooled.
//!
//! For a host with token budgets the body is read before admission instead ([`read_early`]),
//! so that its tokens can be estimated; every attempt then sends it whole.

use crate::error::{self, Code};
use bytes::{Bytes, BytesMut};
use pingora_error::Result;
use pingora_proxy::Session;
use tokio::sync::mpsc;

/// Chunks in flight between the client and the first attempt.
const CHANNEL_CHUNKS: usize = 2;

/// One piece of a streamed body.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes of the body, never empty.
    Data(Bytes),
    /// The client sent the whole body: the upstream body may end now.
    End,
}

/// What one attempt sends as its body.
pub enum Source {
    /// The pieces as they arrive from the client (the first attempt).
    Stream(mpsc::Receiver<Piece>),
    /// The whole body, kept (every later attempt, or a body already complete).
    Whole(Bytes),
}

/// The state of the client's body for one request.
pub struct Upload {
    /// Kept for replay; `None` once the body outgrew `cap`.
    replay: Option<BytesMut>,
    /// The kept body once complete.
    whole: Option<Bytes>,
    cap: u64,
    /// `max_body_bytes`.
    max: u64,
    /// Bytes read so far.
    pub read: u64,
    /// The client sent the whole body.
    pub done: bool,
    /// Toward the streamed attempt, while it listens.
    tx: Option<mpsc::Sender<Piece>>,
    /// The floor on the body's pace, for a body still to read under one: (when reading
    /// began, bytes/s, grace).
    pace: Option<(std::time::Instant, u64, std::time::Duration)>,
}

/// The slowest a request body may come: `min_rate` bytes/s on average, once `grace` has
/// passed since `started`.
#[derive(Clone, Copy, Debug)]
pub struct BodyPace {
    pub min_rate: u64,
    pub grace: std::time::Duration,
}

/// For a host with token budgets: read the request's body before admission and estimate its
/// tokens from it (`plan.cost`). A body declared larger than the host's replay buffer, or
/// without a declared length, is not read early: its estimate is its declared length / 4,
/// corrected by the answer's usage. A client waiting for `100 Continue` gets it first.
pub async fn read_early(
    session: &mut Session,
    plan: &mut super::Plan,
    generation: &crate::generation::Generation,
) -> Result<Option<(Upload, Source)>> {
    if session.as_downstream_mut().is_body_empty() {
        return Ok(None);
    }
    let req = session.req_header();
    let len = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let cap = plan.limits.max_buffered_body;
    let Some(len) = len.filter(|l| *l <= cap) else {
        // At least one token: it waits while the budget is spent, and its answer's usage
        // is counted.
        plan.cost = crate::admission::TokenCost {
            input: len.unwrap_or(0).div_ceil(4).max(1),
            ..Default::default()
        };
        return Ok(None);
    };
    let expect_continue = req
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expect_continue {
        session.write_continue_response().await?;
    }
    let security = &generation.config.security;
    let (mut upload, _) = Upload::start(
        session,
        cap,
        security.max_body_bytes,
        BodyPace {
            min_rate: security.min_body_rate,
            grace: security.body_grace.get(),
        },
    );
    upload.tx = None;
    while !upload.done {
        let (_, chunk) = upload.next(session).await;
        upload.take(None, chunk?)?;
    }
    let body = upload.replay().unwrap_or_default();
    (plan.cost, plan.model) = super::usage::estimate(&body);
    debug_assert!(body.len() as u64 <= len.max(cap));
    Ok(Some((upload, Source::Whole(body))))
}

impl Upload {
    /// The body of `session`'s request, with a replay buffer of `cap` bytes. Returns the source
    /// of the first attempt.
    pub fn start(session: &mut Session, cap: u64, max: u64, pace: BodyPace) -> (Upload, Source) {
        if session.as_downstream_mut().is_body_empty() {
            let upload = Upload {
                replay: Some(BytesMut::new()),
                whole: Some(Bytes::new()),
                cap,
                max,
                read: 0,
                done: true,
                tx: None,
                pace: None,
            };
            return (upload, Source::Whole(Bytes::new()));
        }
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let pace =
            (pace.min_rate > 0).then(|| (std::time::Instant::now(), pace.min_rate, pace.grace));
        let upload = Upload {
            replay: Some(BytesMut::new()),
            whole: None,
            cap,
            max,
            read: 0,
            done: false,
            tx: Some(tx),
            pace,
        };
        (upload, Source::Stream(rx))
    }

    /// The whole body for another attempt, when it is complete and was kept.
    pub fn replay(&self) -> Option<Bytes> {
        self.whole.clone()
    }

    /// Can another attempt ever get the whole body?
    pub fn replayable(&self) -> bool {
        self.replay.is_some() || self.whole.is_some()
    }

    /// Wait for room toward the streamed attempt (if it still listens), then read the next
    /// chunk from the client. Cancel-safe at both awaits.
    pub async fn next(
        &self,
        session: &mut Session,
    ) -> (Option<mpsc::OwnedPermit<Piece>>, Result<Option<Bytes>>) {
        let permit = match self.tx.clone() {
            Some(tx) => tx.reserve_owned().await.ok(),
            None => None,
        };
        let Some((started, rate, grace)) = self.pace else {
            return (permit, session.read_request_body().await);
        };
        // The next byte is due when the average since `grace` would fall under the floor.
        let due = started
            + grace
            + std::time::Duration::from_secs_f64((self.read + 1) as f64 / rate as f64);
        let read = tokio::time::timeout_at(due.into(), session.read_request_body()).await;
        let chunk = read.unwrap_or_else(|_| {
            Err(error::error(
                Code::RequestTimeout,
                format!(
                    "request body slower than {rate} bytes/s (security.min_body_rate): {} bytes in {:?}",
                    self.read,
                    started.elapsed()
                ),
            ))
        });
        (permit, chunk)
    }

    /// Take in a chunk `next` read: count it against `max_body_bytes`, keep it for replay
    /// while it fits, pass it on. `None` ends the body (and tells the streamed attempt so);
    /// an empty chunk is nothing and is dropped.
    pub fn take(
        &mut self,
        permit: Option<mpsc::OwnedPermit<Piece>>,
        chunk: Option<Bytes>,
    ) -> Result<()> {
        let Some(chunk) = chunk else {
            self.done = true;
            self.tx = None;
            if let Some(p) = permit {
                p.send(Piece::End);
            }
            self.whole = self.replay.take().map(BytesMut::freeze);
            return Ok(());
        };
        if chunk.is_empty() {
            // Its reserved place goes back with `permit`.
            return Ok(());
        }
        self.read = self.read.saturating_add(chunk.len() as u64);
        if self.read > self.max {
            return Err(error::error(
                Code::BodyTooLarge,
                format!("request body over {} bytes", self.max),
            ));
        }
        if self.read > self.cap {
            self.replay = None;
        } else if let Some(b) = &mut self.replay {
            b.extend_from_slice(&chunk);
        }
        match permit {
            Some(p) => {
                p.send(Piece::Data(chunk));
            }
            // The streamed attempt is gone; nothing more is sent to it.
            None => self.tx = None,
        }
        Ok(())
    }
}
