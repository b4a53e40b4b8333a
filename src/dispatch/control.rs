//! The per-request dispatch controls: `Sluice-Mode`, `Sluice-Regions`, `Sluice-Hedge-After`
//! and `Sluice-Retry-On`, over the host's configured defaults.

use crate::config::{HedgeAfter, HostLimits, Mode, RetryOn};
use http::HeaderName;
use pingora_http::RequestHeader;
use std::time::Duration;

/// Header a client uses to bound the whole request, queueing included.
pub const SLUICE_TIMEOUT: HeaderName = HeaderName::from_static("sluice-timeout");
/// Longest `Sluice-Timeout` a client may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
pub const SLUICE_MODE: HeaderName = HeaderName::from_static("sluice-mode");
pub const SLUICE_REGIONS: HeaderName = HeaderName::from_static("sluice-regions");
pub const SLUICE_HEDGE_AFTER: HeaderName = HeaderName::from_static("sluice-hedge-after");
pub const SLUICE_RETRY_ON: HeaderName = HeaderName::from_static("sluice-retry-on");
/// Longest `Sluice-Hedge-After` a client may ask for (a duration that must meet a clock).
pub const MAX_HEDGE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Clone, Debug, PartialEq)]
pub struct Control {
    pub mode: Mode,
    /// Regions allowed for this request, in the order to try them.
    pub regions: Option<Vec<String>>,
    pub hedge_after: HedgeAfter,
    pub retry_on: RetryOn,
    pub max_attempts: u32,
}

impl Control {
    /// The controls of a request; a malformed header is an error naming it.
    pub fn read(req: &RequestHeader, limits: &HostLimits) -> Result<Control, String> {
        let text = |name: HeaderName| -> Result<Option<&str>, String> {
            match req.headers.get(&name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .map(|s| Some(s.trim()))
                    .map_err(|_| format!("{name} is not ASCII")),
            }
        };
        let mode = match text(SLUICE_MODE)? {
            None => limits.mode,
            Some(t) => Mode::parse(t)
                .ok_or_else(|| format!("Sluice-Mode {t:?}: write single, hedge or race"))?,
        };
        let regions = match text(SLUICE_REGIONS)? {
            None => None,
            Some(t) => {
                let names: Vec<String> = t
                    .split(',')
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect();
                if names.is_empty() {
                    return Err("Sluice-Regions names no region".into());
                }
                Some(names)
            }
        };
        let hedge_after = match text(SLUICE_HEDGE_AFTER)? {
            None => limits.hedge_after,
            Some(t) => match HedgeAfter::parse(t).map_err(|e| format!("Sluice-Hedge-After {e}"))? {
                HedgeAfter::Fixed(d) if d > MAX_HEDGE_AFTER => {
                    return Err(format!(
                        "Sluice-Hedge-After {t:?} is over the longest allowed, {}",
                        humantime::format_duration(MAX_HEDGE_AFTER)
                    ))
                }
                h => h,
            },
        };
        let retry_on = match text(SLUICE_RETRY_ON)? {
            None => limits.retry_on,
            Some(t) => RetryOn::parse(t.split(',')).map_err(|e| format!("Sluice-Retry-On {e}"))?,
        };
        Ok(Control {
            mode,
            regions,
            hedge_after,
            retry_on,
            max_attempts: limits.max_attempts,
        })
    }

    /// The host's configured defaults (a request that names none of the controls).
    pub fn of(limits: &HostLimits) -> Control {
        Control {
            mode: limits.mode,
            regions: None,
            hedge_after: limits.hedge_after,
            retry_on: limits.retry_on,
            max_attempts: limits.max_attempts,
        }
    }
}

/// Parse `Sluice-Timeout` ("5s", "150ms").
pub fn parse_timeout(value: &http::HeaderValue) -> Result<Duration, String> {
    let text = value
        .to_str()
        .map_err(|_| "Sluice-Timeout is not ASCII".to_string())?;
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d > MAX_TIMEOUT => Err(format!(
            "Sluice-Timeout {text:?} is over the longest allowed, {}",
            humantime::format_duration(MAX_TIMEOUT)
        )),
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("Sluice-Timeout must be greater than zero".into()),
        Err(e) => Err(format!(
            "Sluice-Timeout {text:?}: {e} (write e.g. \"5s\" or \"250ms\")"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).expect("req");
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).expect("header");
        }
        r
    }

    #[test]
    fn the_defaults_are_what_a_request_without_controls_reads() {
        let l = HostLimits::default();
        let read = Control::read(&req(&[("Accept", "*/*")]), &l).expect("ok");
        assert_eq!(read, Control::of(&l));
    }

    #[test]
    fn headers_override_the_defaults() {
        let l = HostLimits::default();
        let c = Control::read(&req(&[]), &l).expect("ok");
        assert_eq!(c.mode, Mode::Single);
        assert_eq!(c.regions, None);
        let c = Control::read(
            &req(&[
                ("Sluice-Mode", "Race"),
                ("Sluice-Regions", "lax, iad"),
                ("Sluice-Hedge-After", "150ms"),
                ("Sluice-Retry-On", "429,5xx,connect"),
            ]),
            &l,
        )
        .expect("ok");
        assert_eq!(c.mode, Mode::Race);
        assert_eq!(c.regions, Some(vec!["lax".to_string(), "iad".to_string()]));
        assert_eq!(c.hedge_after, HedgeAfter::Fixed(Duration::from_millis(150)));
        assert!(c.retry_on.status(500) && c.retry_on.connect && !c.retry_on.timeout);
    }

    #[test]
    fn bad_headers_are_named() {
        let l = HostLimits::default();
        for (h, v) in [
            ("Sluice-Mode", "fastest"),
            ("Sluice-Regions", " , "),
            ("Sluice-Hedge-After", "soon"),
            ("Sluice-Retry-On", "always"),
            ("Sluice-Hedge-After", "18446744073709551615s"),
            ("Sluice-Hedge-After", "2h"),
        ] {
            let e = Control::read(&req(&[(h, v)]), &l).expect_err("bad");
            assert!(e.starts_with(h), "{e}");
        }
    }
}
