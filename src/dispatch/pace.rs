//! The request side of admission: wait for the client's and the destination host's slots
//! before the first attempt (`admit`: a plan in, an admitted request or a refusal out), and learn from each response head what it says about the host's pace
//! and pauses. Whether to send again is the dispatch policy's decision (`policy.rs`).

use super::prepare::Plan;
use crate::admission::{hints, Ask, Host, Permit};
use crate::gate::{self, Refusal};
use crate::generation::Generation;
use crate::state::Shared;
use pingora_http::ResponseHeader;
use std::time::{Duration, SystemTime};

/// A region paused by its own signal that names no time is held out this long.
const REGION_PAUSE_DEFAULT: Duration = Duration::from_secs(1);
/// Longest a region is held out by its own signal.
const REGION_PAUSE_MAX: Duration = Duration::from_secs(3600);

/// An admitted request: its places at the host's pace and at its client's, held while it
/// runs.
pub struct Admitted {
    pub permit: Permit,
    pub client: Option<Permit>,
}

/// Admission, before a request's first attempt: the client's own pace, then the host's (both
/// through the gate, as for a CONNECT). A refusal carries its `Retry-After`. Each wait is
/// added to `queued` as it ends (a refusal by the host still counts the client's wait).
pub async fn admit(
    shared: &Shared,
    plan: &Plan,
    queued: &mut Duration,
) -> pingora_error::Result<Admitted> {
    let client = match &plan.client {
        Some(c) => {
            let wait = plan.within_deadline(c.wait);
            let who = || format!("client {}", c.name);
            let p = gate::admit(shared, who, &c.cell, &Ask::plain(wait))
                .await
                .map_err(Refusal::into_error)?;
            *queued += p.queued;
            Some(p)
        }
        None => None,
    };
    let permit = gate::admit(
        shared,
        || plan.origin.host_port(),
        &plan.cell,
        &plan.ask(plan.max_wait()),
    )
    .await
    .map_err(Refusal::into_error)?;
    *queued += permit.queued;
    Ok(Admitted { permit, client })
}

/// What a response head did to the host's or the region's pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseEffect {
    Nothing,
    /// The host is paused (for every region and every caller).
    HostPaused,
    /// Only the answering region is to be held out this long (`quota = "region"`).
    RegionPaused(Duration),
}

/// Take in what a response head says about its host (pace statements, pauses). With
/// `host_quota` off, a pause signal speaks for the answering region only: the host's pace is
/// still learned, its pause is not.
pub fn learn(
    shared: &Shared,
    cell: &Host,
    generation: &Generation,
    resp: &ResponseHeader,
    host_quota: bool,
    model: Option<&std::sync::Arc<str>>,
) -> PauseEffect {
    let mut status = resp.status.as_u16();
    // The wall clock only for an answer that has hints (HTTP-dates, epoch resets).
    let mut h = match hints::present(&resp.headers) {
        true => hints::parse(&resp.headers, SystemTime::now()),
        false => hints::Hints::default(),
    };
    h.model = model.cloned();
    // A trailers-only gRPC answer carries its status in the head: `RESOURCE_EXHAUSTED` is
    // the upstream's 429.
    let grpc = grpc_exhausted(&resp.headers);
    if let Some(pushback) = grpc {
        status = 429;
        h.retry_after = h.retry_after.or(pushback);
    }
    let m = &shared.metrics;
    for name in &h.invalid {
        m.hint_errors.with_label_values(&[name]).inc();
    }
    let mut region_pause = None;
    if !host_quota && (pause_signal(resp) || grpc.is_some() || h.exhausted_any().is_some()) {
        let d = h
            .retry_after
            .or(h.exhausted_any())
            .unwrap_or(REGION_PAUSE_DEFAULT)
            .clamp(Duration::from_millis(1), REGION_PAUSE_MAX);
        region_pause = Some(d);
        h.retry_after = None;
        h.exhausted_for = None;
        h.tokens = Default::default();
        // Neither a success nor the host's 429.
        status = 0;
    }
    let learned = shared.admission.learn(cell, generation, status, &h);
    if learned.rps.is_some() {
        m.learned.with_label_values(&["rps"]).inc();
    }
    if learned.max_concurrent.is_some() {
        m.learned.with_label_values(&["max_concurrent"]).inc();
    }
    if let Some((_, source)) = learned.paused {
        m.pauses.with_label_values(&[source.as_str()]).inc();
    }
    match region_pause {
        Some(d) => PauseEffect::RegionPaused(d),
        None if !pause_left(shared, cell).is_zero() => PauseEffect::HostPaused,
        None => PauseEffect::Nothing,
    }
}

/// gRPC's status code for a spent quota.
const GRPC_RESOURCE_EXHAUSTED: &[u8] = b"8";
/// What gRPC libraries say of a message over the size limit (`grpc-message`; its spaces may
/// come percent-encoded).
const GRPC_TOO_LARGE: [&[u8]; 2] = [b"larger than max", b"larger%20than%20max"];
/// The field of a gRPC call's status.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
/// Longest pause a gRPC `grpc-retry-pushback-ms` may ask for (as long as a `Retry-After`).
const GRPC_PUSHBACK_MAX: Duration = Duration::from_secs(3600);

/// A gRPC `RESOURCE_EXHAUSTED` status in `headers` (a trailers-only head, or trailers), with
/// the pause `grpc-retry-pushback-ms` asks for, bounded (a negative or malformed one asks for
/// none).
pub fn grpc_exhausted(headers: &http::HeaderMap) -> Option<Option<Duration>> {
    let status = headers.get(GRPC_STATUS)?;
    if status.as_bytes().trim_ascii() != GRPC_RESOURCE_EXHAUSTED {
        return None;
    }
    // gRPC says RESOURCE_EXHAUSTED of a message over the size limit too: that one call's
    // fault, not the quota's.
    let message = headers
        .get("grpc-message")
        .map_or(&b""[..], |v| v.as_bytes());
    let says = |words: &[u8]| {
        message
            .windows(words.len())
            .any(|w| w.eq_ignore_ascii_case(words))
    };
    if GRPC_TOO_LARGE.iter().any(|w| says(w)) {
        return None;
    }
    let pushback = headers
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms).min(GRPC_PUSHBACK_MAX));
    Some(pushback)
}

/// Take in what a gRPC answer's trailers say: `RESOURCE_EXHAUSTED` pauses the host like a 429
/// (or, with `host_quota` off, says nothing: its region was already answered). Returns
/// whether the host is paused now.
pub fn learn_trailers(
    shared: &Shared,
    cell: &Host,
    generation: &Generation,
    trailers: &http::HeaderMap,
    host_quota: bool,
) -> bool {
    let Some(pushback) = grpc_exhausted(trailers) else {
        return false;
    };
    if !host_quota {
        return false;
    }
    let h = hints::Hints {
        retry_after: pushback,
        ..Default::default()
    };
    let learned = shared.admission.learn(cell, generation, 429, &h);
    if let Some((_, source)) = learned.paused {
        shared
            .metrics
            .pauses
            .with_label_values(&[source.as_str()])
            .inc();
    }
    !pause_left(shared, cell).is_zero()
}

/// How long the host is paused from now.
pub fn pause_left(shared: &Shared, cell: &Host) -> Duration {
    let until = shared.admission.paused_until(cell);
    Duration::from_nanos(until.saturating_sub(shared.admission.now()))
}

/// Tell the client how long the host is paused, on a 429 or 503 passed to it.
pub fn set_retry_after(
    resp: &mut ResponseHeader,
    pause_left: Duration,
) -> pingora_error::Result<()> {
    let status = resp.status.as_u16();
    if (status == 429 || status == 503) && !pause_left.is_zero() {
        let secs = crate::admission::retry_after_secs(pause_left);
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    Ok(())
}

/// Does this response ask for a pause (429, or 503 with `Retry-After`)?
pub fn pause_signal(resp: &ResponseHeader) -> bool {
    let status = resp.status.as_u16();
    status == 429 || (status == 503 && resp.headers.contains_key(http::header::RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, http::HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn resource_exhausted_is_the_quota_and_its_pushback_is_bounded() {
        let t = |pairs| grpc_exhausted(&trailers(pairs));
        assert_eq!(t(&[("grpc-status", "0")]), None);
        assert_eq!(t(&[("grpc-status", "14")]), None);
        assert_eq!(t(&[("grpc-status", "8")]), Some(None));
        assert_eq!(
            t(&[("grpc-status", "8"), ("grpc-retry-pushback-ms", "2500")]),
            Some(Some(Duration::from_millis(2500)))
        );
        // Bounded, and a negative or malformed pushback asks for no time (the backoff).
        assert_eq!(
            t(&[
                ("grpc-status", "8"),
                ("grpc-retry-pushback-ms", "99999999999")
            ]),
            Some(Some(GRPC_PUSHBACK_MAX))
        );
        assert_eq!(
            t(&[("grpc-status", "8"), ("grpc-retry-pushback-ms", "-1")]),
            Some(None)
        );
        assert_eq!(
            t(&[("grpc-status", "8"), ("grpc-retry-pushback-ms", "soon")]),
            Some(None)
        );
        // A message over the size limit is that call's fault, not the quota's.
        for message in [
            "grpc: received message larger than max (4194305 vs. 4194304)",
            "Received%20message%20larger%20than%20max",
        ] {
            let mut map = trailers(&[("grpc-status", "8")]);
            map.insert(
                "grpc-message",
                http::HeaderValue::from_str(message).expect("value"),
            );
            assert_eq!(grpc_exhausted(&map), None, "{message}");
        }
    }
}
