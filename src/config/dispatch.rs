//! Config types for regions and dispatch: a host's regions and health check, the dispatch mode,
//! hedge delay, retry conditions, retry budget and outlier ejection. Only types and parsing
//! live here; `regions/` and `dispatch/` use them.

use super::HumanDuration;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// How a request is sent across a host's regions.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The best region; another one after a retryable failure.
    Single,
    /// The best region, and a duplicate to the next when no answer came within `hedge_after`.
    Hedge,
    /// Every allowed region at once; the first good answer wins.
    Race,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text.trim().to_ascii_lowercase().as_str() {
            "single" => Some(Mode::Single),
            "hedge" => Some(Mode::Hedge),
            "race" => Some(Mode::Race),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Hedge => "hedge",
            Mode::Race => "race",
        }
    }
}

/// Whose quota a rate-limit signal from one region speaks for.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Quota {
    /// The account's quota, shared by every region (most APIs): the host is paused for
    /// everyone and the request waits the pause; no other region is tried for it.
    Host,
    /// Each region counts its own quota: that region is held out for the pause and the
    /// request moves on to another region at once.
    Region,
}

/// Which HTTP versions sluice speaks to a host's upstreams.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Http2 {
    /// Over TLS, offer h2 and HTTP/1.1 by ALPN and speak what the upstream picks; over plain
    /// HTTP, HTTP/1.1, except for gRPC, which only speaks h2 (h2c with prior knowledge).
    #[default]
    Auto,
    /// h2 only (h2c with prior knowledge over plain HTTP).
    Always,
    /// HTTP/1.1 only.
    Never,
}

/// When a hedge is sent: after a fixed delay, or after a percentile of the chosen region's
/// observed latency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HedgeAfter {
    Fixed(Duration),
    Percentile(u8),
}

impl HedgeAfter {
    /// `"150ms"`, `"1s"`, `"p95"`, `"p99"` (any percentile from p50 to p99).
    pub fn parse(text: &str) -> Result<HedgeAfter, String> {
        let t = text.trim();
        if let Some(p) = t.strip_prefix(['p', 'P']) {
            return match p.parse::<u8>() {
                Ok(n) if (50..=99).contains(&n) => Ok(HedgeAfter::Percentile(n)),
                _ => Err(format!(
                    "{text:?}: a percentile must be p50 to p99 (e.g. \"p95\")"
                )),
            };
        }
        match humantime::parse_duration(t) {
            Ok(d) if !d.is_zero() => Ok(HedgeAfter::Fixed(d)),
            Ok(_) => Err(format!("{text:?}: must be greater than zero")),
            Err(e) => Err(format!(
                "{text:?}: {e} (write a duration like \"150ms\" or a percentile like \"p95\")"
            )),
        }
    }
}

impl std::fmt::Display for HedgeAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HedgeAfter::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
            HedgeAfter::Percentile(p) => write!(f, "p{p}"),
        }
    }
}

impl<'de> Deserialize<'de> for HedgeAfter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HedgeAfter::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HedgeAfter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Which failures send a request to another region: connect errors, timeouts, and statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RetryOn {
    pub connect: bool,
    pub timeout: bool,
    /// Every 5xx status.
    pub all_5xx: bool,
    /// Bit `s - 400` for each listed status from 400 to 527.
    statuses: u128,
}

impl RetryOn {
    /// Parse a list of `connect`, `timeout`, `5xx`, or statuses (400-527).
    pub fn parse<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Result<RetryOn, String> {
        let mut r = RetryOn::default();
        for token in tokens {
            match token.trim().to_ascii_lowercase().as_str() {
                "" => {}
                "connect" => r.connect = true,
                "timeout" => r.timeout = true,
                "5xx" => r.all_5xx = true,
                other => match other.parse::<u16>() {
                    Ok(s) if (400..528).contains(&s) => r.statuses |= 1u128 << (s - 400),
                    _ => {
                        return Err(format!(
                            "{token:?}: write connect, timeout, 5xx or a status from 400 to 527"
                        ))
                    }
                },
            }
        }
        Ok(r)
    }

    /// Is a response with this status retryable?
    pub fn status(&self, status: u16) -> bool {
        (self.all_5xx && (500..600).contains(&status))
            || ((400..528).contains(&status) && self.statuses & (1u128 << (status - 400)) != 0)
    }

    /// What may still be retried when nothing may be sent twice: a connection never made,
    /// and a 429 (the upstream refused the request without processing it).
    pub fn unsafe_subset(&self) -> RetryOn {
        RetryOn {
            connect: self.connect,
            timeout: false,
            all_5xx: false,
            statuses: self.statuses & (1u128 << (429 - 400)),
        }
    }

    fn tokens(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.connect {
            out.push("connect".to_string());
        }
        if self.timeout {
            out.push("timeout".to_string());
        }
        if self.all_5xx {
            out.push("5xx".to_string());
        }
        for s in 400..528u16 {
            if self.statuses & (1u128 << (s - 400)) != 0 {
                out.push(s.to_string());
            }
        }
        out
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        RetryOn::parse(list.iter().map(String::as_str)).map_err(serde::de::Error::custom)
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.tokens().serialize(s)
    }
}

/// The default `retry_on`: connect errors, timeouts, 502, 503, 504 and 429.
pub fn default_retry_on() -> RetryOn {
    RetryOn::parse(["connect", "timeout", "502", "503", "504", "429"]).unwrap_or_default()
}

/// Extra attempts (retries and hedges) allowed per host.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudget {
    /// Extra attempts as a share of requests over the last 10 s.
    pub ratio: f64,
    /// Extra attempts always allowed in flight, whatever the ratio says.
    pub min_in_flight: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_in_flight: 3,
        }
    }
}

/// Passive ejection of a region that keeps failing.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    /// Consecutive failures (5xx, connect errors, timeouts) that eject a region; 0 = never.
    pub consecutive_failures: u32,
    /// First ejection; each further one doubles, up to `max_ejection`.
    pub base_ejection: HumanDuration,
    pub max_ejection: HumanDuration,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: HumanDuration::from_secs(5),
            max_ejection: HumanDuration::from_secs(300),
        }
    }
}

/// One region of a host: direct addresses, or another sluice (`via`) serving that region.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    /// One `ip:port`.
    pub address: Option<String>,
    /// Several `ip:port`, used in turn.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Speak TLS to the region; default: as the request's scheme says.
    pub tls: Option<bool>,
    /// TLS server name; default: the host name.
    pub sni: Option<String>,
    /// `http://peer:port` of a sluice running in that region.
    pub via: Option<String>,
}

/// Active health checking of a host's regions.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// HTTP path to GET (2xx or 3xx is healthy); without it, a TCP (and TLS) connect is the check.
    pub path: Option<String>,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    /// Consecutive passes that make an unhealthy address healthy.
    pub healthy: u32,
    /// Consecutive failures that make a healthy address unhealthy.
    pub unhealthy: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: None,
            interval: HumanDuration::from_secs(2),
            timeout: HumanDuration::from_secs(1),
            healthy: 2,
            unhealthy: 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedge_after_reads_durations_and_percentiles() {
        assert_eq!(
            HedgeAfter::parse("150ms"),
            Ok(HedgeAfter::Fixed(Duration::from_millis(150)))
        );
        assert_eq!(HedgeAfter::parse("p95"), Ok(HedgeAfter::Percentile(95)));
        assert!(HedgeAfter::parse("p100").is_err());
        assert!(HedgeAfter::parse("0s").is_err());
        assert!(HedgeAfter::parse("soon").is_err());
    }

    #[test]
    fn retry_on_tokens() {
        let r = RetryOn::parse(["429", "5xx", "connect"]).expect("valid");
        assert!(r.connect && !r.timeout);
        assert!(r.status(429) && r.status(500) && r.status(599));
        assert!(!r.status(404) && !r.status(200));
        let d = default_retry_on();
        assert!(d.status(502) && d.status(503) && d.status(504) && d.status(429));
        assert!(!d.status(500) && d.connect && d.timeout);
        assert!(RetryOn::parse(["600"]).is_err());
        assert!(RetryOn::parse(["sometimes"]).is_err());
        assert_eq!(RetryOn::parse(d.tokens().iter().map(String::as_str)), Ok(d));
    }
}
