//! One gate for every way in: may this caller reach this destination, and when. An HTTP
//! request (forward, explicit target, route, inside a tunnel) and a CONNECT pass the same
//! checks, in the same order, with the same refusals: loop detection, authentication, the
//! egress policy on the host name and on its resolved addresses, then the client's own pace
//! and the destination host's admission.
//!
//! A refusal is one type, made here and rendered once at the edge: into the Pingora session
//! (`proxy::fail_to_proxy`, through [`Refusal::into_error`]) or as raw bytes on a client
//! stream (a CONNECT refused before its tunnel opens, [`Refusal::raw`]).

use crate::admission::{Host, Permit};
use crate::error::{self, Code};
use crate::generation::Generation;
use crate::policy::auth::{self, Client};
use crate::state::Shared;
use pingora_error::Error;
use std::net::SocketAddr;
use std::time::Duration;

/// Why sluice refused a caller, with everything its answer needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    /// The answer's status (the code's own, or 401 where an origin's credentials were due).
    pub status: u16,
    pub message: String,
    /// `Retry-After` in seconds (a refusal by admission).
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(code: Code, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            status: code.status(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// A refusal for a failure that came as an error (a DNS lookup's).
    pub fn of_error(e: &Error) -> Refusal {
        Refusal::new(Code::of(e), error::message_of(e))
    }

    /// For a Pingora session: the error `proxy::fail_to_proxy` answers, `Retry-After`
    /// included.
    pub fn into_error(self) -> Box<Error> {
        error::refusal(self.code, self.status, self.message, self.retry_after)
    }

    /// For a raw client stream: the whole HTTP/1.1 answer.
    pub fn raw(&self) -> Vec<u8> {
        error::raw_response_with(self.code, &self.message, self.retry_after)
    }
}

/// The `Via` pseudonym prefix; each process adds `1.1 sluice-<instance>`.
pub const VIA_PREFIX: &str = "sluice-";

/// A request or CONNECT (`what`) whose `Via` values name this sluice came back to it: a
/// peer loop.
pub fn not_a_loop<'a>(
    via: impl IntoIterator<Item = &'a [u8]>,
    shared: &Shared,
    what: &str,
) -> Result<(), Refusal> {
    if !via_names(via, &shared.instance) {
        return Ok(());
    }
    Err(Refusal::new(
        Code::LoopDetected,
        format!(
            "this {what} already passed through this sluice (instance {}): a peer loop",
            shared.instance
        ),
    ))
}

/// Does any of these `Via` values name this instance?
fn via_names<'a>(values: impl IntoIterator<Item = &'a [u8]>, instance: &str) -> bool {
    values.into_iter().any(|v| {
        std::str::from_utf8(v).is_ok_and(|text| {
            text.split(',').any(|hop| {
                hop.split_whitespace()
                    .nth(1)
                    .and_then(|by| by.strip_prefix(VIA_PREFIX))
                    .is_some_and(|id| id.eq_ignore_ascii_case(instance))
            })
        })
    })
}

/// The client, when `[[clients]]` are listed (see `policy::auth::authenticate`):
/// `proxy_way` says whether it came as to a proxy (`Proxy-Authorization`, 407) or as to an
/// origin (`Sluice-Key`, 401).
pub fn authenticate<'g>(
    generation: &'g Generation,
    proxy_way: bool,
    proxy_authorization: Option<&[u8]>,
    sluice_key: Option<&[u8]>,
) -> Result<&'g Client, Refusal> {
    auth::authenticate(
        &generation.clients,
        proxy_way,
        proxy_authorization,
        sluice_key,
    )
    .map_err(|(code, status, message)| Refusal {
        status,
        ..Refusal::new(code, message)
    })
}

/// The egress policy on the host's name (before any lookup).
pub fn check_host(generation: &Generation, host: &str) -> Result<(), Refusal> {
    generation
        .egress
        .check_host(host)
        .map_err(|(code, message)| Refusal::new(code, message))
}

/// The host's addresses (pins, else DNS), those the egress policy allows.
pub async fn addresses(
    shared: &Shared,
    generation: &Generation,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, Refusal> {
    let timeout = generation.config.server.dns_timeout.get();
    let addrs = shared
        .dns
        .resolve(generation, &shared.metrics, host, port, timeout)
        .await
        .map_err(|e| Refusal::of_error(&e))?;
    generation
        .egress
        .filter(host, addrs)
        .map_err(|(code, message)| Refusal::new(code, message))
}

/// Wait for `cell`'s slot and in-flight place, at most `wait`; counted either way. `who` names
/// what was waited for in a refusal (`api.example.com:443`, `client ci`), made only then.
pub async fn admit(
    shared: &Shared,
    who: impl FnOnce() -> String,
    cell: &Host,
    wait: Duration,
) -> Result<Permit, Refusal> {
    let result = shared.admission.acquire(cell, wait).await;
    let r = match result {
        Ok(p) => {
            shared.metrics.queue_wait.observe(p.queued.as_secs_f64());
            return Ok(p);
        }
        Err(r) => r,
    };
    shared
        .metrics
        .rejections
        .with_label_values(&[r.reason()])
        .inc();
    let secs = r.retry_after_secs();
    let why = match r {
        crate::admission::Rejection::Pace { .. } => "its pace has no free slot",
        crate::admission::Rejection::Paused { .. } => "it is paused after a rate-limit signal",
        crate::admission::Rejection::Concurrency { .. } => "its in-flight limit is reached",
        crate::admission::Rejection::Unavailable { .. } => {
            "the fleet's shared state is unavailable (on_error = throttle)"
        }
    };
    Err(Refusal {
        retry_after: Some(secs),
        ..Refusal::new(
            r.code(),
            format!(
                "{}: {why} within the allowed wait; retry after {secs}s",
                who()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_that_came_back_is_recognised() {
        let via = |values: &[&'static str], instance| {
            via_names(values.iter().map(|v| v.as_bytes()), instance)
        };
        assert!(!via(&[], "ab12"));
        assert!(via(&["1.1 cdn, 1.1 sluice-ab12"], "ab12"));
        assert!(
            via(&["1.1 cdn", "1.0 sluice-AB12"], "ab12"),
            "in a later Via line"
        );
        assert!(!via(&["1.1 cdn, 1.1 sluice-ab12"], "cd34"));
    }

    #[test]
    fn a_refusal_renders_the_same_code_message_and_retry_after_both_ways() {
        let r = Refusal {
            retry_after: Some(3),
            ..Refusal::new(Code::RateLimited, "api.test:443: its pace has no free slot")
        };
        let raw = String::from_utf8(r.raw()).expect("utf-8");
        assert!(raw.starts_with("HTTP/1.1 429 "), "{raw}");
        assert!(raw.contains("Retry-After: 3\r\n"), "{raw}");
        assert!(raw.contains("rate_limited"), "{raw}");
        let e = r.into_error();
        assert_eq!(Code::of(&e), Code::RateLimited);
        assert_eq!(error::status_of(&e), 429);
        assert_eq!(error::retry_after_of(&e), Some(3));
        assert_eq!(
            error::message_of(&e),
            "api.test:443: its pace has no free slot"
        );
    }
}
