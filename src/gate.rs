//! One gate for every way in: may this caller reach this destination, and when. An HTTP
//! request (forward, explicit target, route, inside a tunnel) and a CONNECT pass the same
//! checks, in the same order, with the same refusals: loop detection, authentication, the
//! egress policy on the host name and on its resolved addresses, then the client's own pace
//! and the destination host's admission.
//!
//! A refusal is one type, made here and rendered once at the edge: into the Pingora session
//! (`proxy::fail_to_proxy`, through [`Refusal::into_error`]) or as raw bytes on a client
//! stream (a CONNECT refused before its tunnel opens, [`Refusal::raw`]).

use crate::admission::{Ask, Caller, Host, Permit, OTHER};
use crate::error::{self, Code};
use crate::generation::Generation;
use crate::policy::auth::{self, Client};
use crate::state::Shared;
use pingora_error::Error;
use std::net::SocketAddr;
use std::sync::Arc;

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

/// Names a caller by itself (`Sluice-Caller`) when clients do not authenticate.
pub const SLUICE_CALLER: http::HeaderName = http::HeaderName::from_static("sluice-caller");
/// A request's class at a contended host: `high`, `normal` or `low`.
pub const SLUICE_PRIORITY: http::HeaderName = http::HeaderName::from_static("sluice-priority");
/// Longest `Sluice-Caller` value.
const MAX_CALLER_NAME: usize = 64;

/// What a request says of its caller, read before admission.
#[derive(Default)]
pub struct Who<'a> {
    /// The authenticated client.
    pub client: Option<&'a Client>,
    /// One of sluice's own job requests (its client, if any, is `client`).
    pub job: bool,
    /// `Sluice-Caller` and `Sluice-Priority`, as sent.
    pub caller_header: Option<&'a [u8]>,
    pub priority_header: Option<&'a [u8]>,
    /// The client's address.
    pub addr: Option<std::net::IpAddr>,
}

impl<'a> Who<'a> {
    /// A caller known by its client and address only (a CONNECT).
    pub fn of(client: Option<&'a Client>, addr: Option<std::net::IpAddr>) -> Who<'a> {
        Who {
            client,
            addr,
            ..Who::default()
        }
    }
}

/// A caller named by its address: the last name made on this thread, when the address is
/// the same (a client's requests come one after another), else a new one.
fn address_name(ip: std::net::IpAddr) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::IpAddr, Arc<str>)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((seen, name)) if *seen == ip => name.clone(),
            _ => {
                let name: Arc<str> = Arc::from(ip.to_string());
                *last = Some((ip, name.clone()));
                name
            }
        }
    })
}

/// The caller of a request at a host whose limits are `limits`, as `[callers]` says to tell
/// callers apart: the authenticated client; else one of sluice's own jobs (`jobs`); else
/// `Sluice-Caller`, then the client's address (`by = "auto"`); or only the address
/// (`"address"`); or one caller for all (`"none"`). Its class is `Sluice-Priority`, else its
/// client's `priority`, else `low` for a job and `normal` for the rest.
pub fn caller(
    generation: &Generation,
    limits: &crate::config::HostLimits,
    who: &Who<'_>,
) -> Result<Caller, Refusal> {
    use crate::config::{CallerBy, Priority};
    let bad = |m: String| Refusal::new(Code::BadRequest, m);
    let priority = match who.priority_header {
        Some(v) => Some(
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| Priority::parse(v.trim()))
                .ok_or_else(|| bad("Sluice-Priority must be high, normal or low".into()))?,
        ),
        None => None,
    };
    let by = generation.config.callers.by;
    // The header names the caller only where nothing else does; only then is it checked.
    let header = match who.caller_header {
        _ if by != CallerBy::Auto || who.client.is_some() || who.job => None,
        Some(v) if valid_caller(v) => std::str::from_utf8(v).ok(),
        Some(_) => {
            return Err(bad(format!(
                "Sluice-Caller must be 1-{MAX_CALLER_NAME} letters, digits, '.', '_' or '-'"
            )))
        }
        None => None,
    };
    let (name, weight, client_priority, client): (Arc<str>, u32, Option<Priority>, bool) =
        match (who.client, by) {
            (_, CallerBy::None) => (OTHER_CALLER.clone(), 1, None, false),
            (Some(c), _) => (c.caller.clone(), c.weight, Some(c.priority), true),
            (None, CallerBy::Auto) if who.job => (JOBS_CALLER.clone(), 1, None, false),
            (None, CallerBy::Auto) if header.is_some() => {
                (Arc::from(header.unwrap_or(OTHER)), 1, None, false)
            }
            (None, _) => match who.addr {
                Some(ip) => (address_name(ip), 1, None, false),
                None => (OTHER_CALLER.clone(), 1, None, false),
            },
        };
    let default = if who.job {
        Priority::Low
    } else {
        Priority::Normal
    };
    Ok(Caller {
        name,
        weight,
        priority: priority
            .or(if who.job { None } else { client_priority })
            .unwrap_or(default),
        // One caller for everyone: no cap per caller (`max_concurrent` caps the host).
        cap: match by {
            CallerBy::None => 0,
            _ => limits.max_concurrent_per_caller,
        },
        hold: limits.request_timeout.get(),
        max_per_host: generation.config.callers.max_per_host,
        client,
    })
}

/// The callers every request may share, named once.
static OTHER_CALLER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(OTHER));
static JOBS_CALLER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("jobs"));

/// A `Sluice-Caller` value: a short token.
fn valid_caller(v: &[u8]) -> bool {
    (1..=MAX_CALLER_NAME).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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

/// Wait for `cell`'s slot and in-flight place, as `ask` allows; counted either way. `who` names
/// what was waited for in a refusal (`api.example.com:443`, `client ci`), made only then.
pub async fn admit(
    shared: &Shared,
    who: impl FnOnce() -> String,
    cell: &Host,
    ask: &Ask<'_>,
) -> Result<Permit, Refusal> {
    let m = &shared.metrics;
    let label = ask.caller.filter(|c| c.client).map_or(OTHER, |c| &*c.name);
    let result = shared.admission.acquire(cell, ask).await;
    let r = match result {
        Ok(p) => {
            m.queue_wait.observe(p.queued.as_secs_f64());
            // By caller, only the requests that waited (nothing more on the uncontended path).
            if let Some(c) = ask.caller.filter(|_| !p.queued.is_zero()) {
                m.callers
                    .queue_wait
                    .with_label_values(&[label, c.priority.as_str()])
                    .observe(p.queued.as_secs_f64());
            }
            return Ok(p);
        }
        Err(r) => r,
    };
    m.rejections.with_label_values(&[r.reason()]).inc();
    if ask.caller.is_some() {
        m.callers
            .rejections
            .with_label_values(&[label, r.reason()])
            .inc();
    }
    if let crate::admission::Rejection::OverBudget {
        budget,
        limit,
        estimate,
    } = r
    {
        return Err(Refusal::new(
            r.code(),
            format!(
                "{}: the request is estimated at {estimate} {}, more than its whole budget of \
                 {limit} a minute; lower max_tokens or the prompt",
                who(),
                budget.as_str().replace('_', " "),
            ),
        ));
    }
    let secs = r.retry_after_secs();
    let why = match r {
        crate::admission::Rejection::Pace { .. } => "its pace has no free slot",
        crate::admission::Rejection::Paused { .. } => "it is paused after a rate-limit signal",
        crate::admission::Rejection::Concurrency { .. } => "its in-flight limit is reached",
        crate::admission::Rejection::Deadline { .. } => {
            "no slot leaves time for an answer before the request's deadline"
        }
        crate::admission::Rejection::Unavailable { .. } => {
            "the fleet's shared state is unavailable (on_error = throttle)"
        }
        crate::admission::Rejection::OverBudget { .. } => "its token budget is too small",
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
    fn callers_are_named_by_client_job_header_or_address() {
        use crate::config::{Config, Priority};
        let g = |toml: &str| Generation::build(1, Config::parse(toml).expect("valid"));
        let auto = g("");
        let limits = auto.limits(0).clone();
        let addr = Some(std::net::IpAddr::from([10, 0, 0, 7]));
        let named = |g: &Generation, who: Who<'_>| caller(g, &limits, &who).map(|c| c.name);
        let by_header = Who {
            caller_header: Some(b"batch-7"),
            addr,
            ..Who::default()
        };
        assert_eq!(named(&auto, by_header).expect("ok").as_ref(), "batch-7");
        let by_addr = Who {
            addr,
            ..Who::default()
        };
        assert_eq!(named(&auto, by_addr).expect("ok").as_ref(), "10.0.0.7");
        // Addresses in turn (the thread keeps the last name it made): each its own.
        for ip in [[10, 0, 0, 8], [10, 0, 0, 7], [10, 0, 0, 7], [192, 0, 2, 1]] {
            let who = Who {
                addr: Some(std::net::IpAddr::from(ip)),
                ..Who::default()
            };
            let want = std::net::IpAddr::from(ip).to_string();
            assert_eq!(named(&auto, who).expect("ok").as_ref(), want);
        }
        let v6 = Who {
            addr: Some("2001:db8::1".parse().expect("ip")),
            ..Who::default()
        };
        assert_eq!(named(&auto, v6).expect("ok").as_ref(), "2001:db8::1");
        let job = Who {
            job: true,
            caller_header: Some(b"x"),
            ..Who::default()
        };
        let c = caller(&auto, &limits, &job).expect("ok");
        assert_eq!((c.name.as_ref(), c.priority), ("jobs", Priority::Low));
        let high_job = Who {
            job: true,
            priority_header: Some(b"high"),
            ..Who::default()
        };
        let c = caller(&auto, &limits, &high_job).expect("ok");
        assert_eq!(c.priority, Priority::High, "the header wins");
        let address_only = g("[callers]\nby = \"address\"\n");
        let spoof = Who {
            caller_header: Some(b"someone-else"),
            addr,
            ..Who::default()
        };
        assert_eq!(
            named(&address_only, spoof).expect("ok").as_ref(),
            "10.0.0.7"
        );
        for bad in [&b""[..], b"has space", &[b'a'; 65]] {
            let who = Who {
                caller_header: Some(bad),
                ..Who::default()
            };
            let r = caller(&auto, &limits, &who).expect_err("refused");
            assert_eq!(r.code, Code::BadRequest);
        }
        let who = Who {
            priority_header: Some(b"urgent"),
            ..Who::default()
        };
        assert_eq!(
            caller(&auto, &limits, &who).expect_err("refused").status,
            400
        );
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
