//! What upstream response headers say about a host's limits: `Retry-After` (and OpenAI's
//! `retry-after-ms`), the `X-EZTHROTTLE-*` pace statements, and every "nothing left until T"
//! form: the IETF `RateLimit` field and the older `RateLimit-*`, `X-RateLimit-*` (delta, epoch
//! seconds or epoch milliseconds), OpenAI's `x-ratelimit-*-{requests,tokens}` (Go durations)
//! and Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-*`
//! (RFC 3339). Whichever budget ran out, requests or tokens, the host waits for its reset.
//! Parsing is total: a value that does not parse is ignored and reported by name, never a
//! panic; every delay is capped at `MAX_PAUSE` before it meets a clock.

use super::tokens::{Told, MAX_PER_MINUTE};
use http::HeaderMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest pause any header may cause.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// Header names whose values are parsed (lowercase); used as bounded metric labels.
pub const NAMES: [&str; 28] = [
    "retry-after",
    "retry-after-ms",
    "x-ezthrottle-rps",
    "x-ezthrottle-max-concurrent",
    "ratelimit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "ratelimit-limit",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
    "x-ratelimit-limit-tokens",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-output-tokens-limit",
    "x-ratelimit-limit-requests",
    "anthropic-ratelimit-requests-limit",
];

/// Parses a reset header value into a delay from now.
type ResetParser = fn(&str, SystemTime) -> Option<Duration>;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hints {
    /// `Retry-After`, as a delay from now.
    pub retry_after: Option<Duration>,
    /// `X-EZTHROTTLE-RPS`.
    pub rps: Option<f64>,
    /// `X-EZTHROTTLE-MAX-CONCURRENT`.
    pub max_concurrent: Option<u32>,
    /// Remaining requests reached 0: the window resets after this delay.
    pub exhausted_for: Option<Duration>,
    /// What the headers said of each token budget (`tokens::Budget` order: tokens, input,
    /// output).
    pub tokens: [Told; 3],
    /// What OpenAI's or Anthropic's headers said of the request budget (shown, not paced:
    /// a request budget run out pauses the host through `exhausted_for`).
    pub requests: Told,
    /// Headers present whose values did not parse.
    pub invalid: Vec<&'static str>,
    /// The model the request asked for (set by the caller, not read from headers): token
    /// budgets are learned per model.
    pub model: Option<std::sync::Arc<str>>,
}

impl Hints {
    pub fn is_empty(&self) -> bool {
        self.retry_after.is_none()
            && self.rps.is_none()
            && self.max_concurrent.is_none()
            && self.exhausted_for.is_none()
            && self.tokens.iter().all(Told::is_empty)
            && self.requests.is_empty()
    }

    /// The longest reset of the token budgets said to have run out that the same headers
    /// give no limit for (with a limit, the budget itself holds them).
    pub fn tokens_unbudgeted_for(&self) -> Option<Duration> {
        self.tokens
            .iter()
            .filter(|t| t.remaining == Some(0) && t.limit.is_none())
            .map(|t| t.reset.unwrap_or(Duration::ZERO))
            .max()
    }

    /// The longest reset of any budget said to have run out, requests or tokens.
    pub fn exhausted_any(&self) -> Option<Duration> {
        let tokens = self
            .tokens
            .iter()
            .filter(|t| t.remaining == Some(0))
            .map(|t| t.reset.unwrap_or(Duration::ZERO))
            .max();
        self.exhausted_for.max(tokens)
    }
}

/// Whether `headers` may carry a hint: a name that starts with `retry-after` or
/// `x-ezthrottle-`, or mentions `ratelimit`. Most answers have none, and need no clock.
pub fn present(headers: &HeaderMap) -> bool {
    headers.keys().any(|k| {
        let s = k.as_str().as_bytes();
        s.starts_with(b"retry-after")
            || s.starts_with(b"x-ezthrottle-")
            || s.windows(RATELIMIT.len())
                .any(|w| w[0] == b'r' && w == RATELIMIT)
    })
}

const RATELIMIT: &[u8] = b"ratelimit";

/// Read every hint from `headers`; `now` is the wall clock (for HTTP-dates and epoch resets).
pub fn parse(headers: &HeaderMap, now: SystemTime) -> Hints {
    let mut h = Hints::default();
    // Fast exit for the common response with none of these headers.
    if !present(headers) {
        return h;
    }
    let get = |name: &'static str| headers.get(name).and_then(|v| v.to_str().ok());

    if let Some(v) = get("retry-after") {
        match retry_after(v, now) {
            Some(d) => h.retry_after = Some(d),
            None => h.invalid.push("retry-after"),
        }
    }
    // OpenAI's milliseconds say the same more precisely.
    if let Some(v) = get("retry-after-ms") {
        match v.trim().parse::<f64>() {
            Ok(ms) if ms.is_finite() && ms >= 0.0 => {
                let secs = (ms / 1000.0).min(MAX_PAUSE.as_secs_f64());
                h.retry_after = Some(cap(Duration::from_secs_f64(secs)));
            }
            _ => h.invalid.push("retry-after-ms"),
        }
    }
    if let Some(v) = get("x-ezthrottle-rps") {
        match v.trim().parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 && r <= 1_000_000.0 => h.rps = Some(r),
            _ => h.invalid.push("x-ezthrottle-rps"),
        }
    }
    if let Some(v) = get("x-ezthrottle-max-concurrent") {
        match v.trim().parse::<u32>() {
            Ok(n) if n > 0 => h.max_concurrent = Some(n),
            _ => h.invalid.push("x-ezthrottle-max-concurrent"),
        }
    }

    // (remaining, reset) pairs, most specific first. Any budget at 0 holds the host until
    // its reset (the longest, when several ran out).
    let pairs: [(&'static str, &'static str, ResetParser); 4] = [
        (
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
            |v, _| go_duration(v),
        ),
        (
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
            rfc3339,
        ),
        ("ratelimit-remaining", "ratelimit-reset", |v, _| {
            delta_seconds(v)
        }),
        ("x-ratelimit-remaining", "x-ratelimit-reset", delta_or_epoch),
    ];
    for (rem_name, reset_name, parse_reset) in pairs {
        let Some(rem) = get(rem_name) else { continue };
        let Some(remaining) = parse_remaining(rem) else {
            h.invalid.push(rem_name);
            continue;
        };
        if remaining > 0 {
            continue;
        }
        match get(reset_name).map(|v| parse_reset(v, now)) {
            Some(Some(d)) => {
                h.exhausted_for = Some(h.exhausted_for.map_or(d, |e| e.max(d)));
            }
            Some(None) => h.invalid.push(reset_name),
            None => {}
        }
    }
    // The request budget as OpenAI and Anthropic state it (its values that do not parse
    // were reported above, with the "nothing left" pairs).
    for (names, parse_reset) in [
        (
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            (|v, _| go_duration(v)) as ResetParser,
        ),
        (
            [
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-requests-reset",
            ],
            rfc3339,
        ),
    ] {
        let told = told_by(&get, names, parse_reset, now, &mut Vec::new());
        if !told.is_empty() {
            h.requests = told;
        }
    }
    // Token budgets: (budget, limit, remaining, reset) header names.
    let budgets: [(usize, [&'static str; 3], ResetParser); 4] = [
        (
            0,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
            |v, _| go_duration(v),
        ),
        (
            1,
            [
                "anthropic-ratelimit-input-tokens-limit",
                "anthropic-ratelimit-input-tokens-remaining",
                "anthropic-ratelimit-input-tokens-reset",
            ],
            rfc3339,
        ),
        (
            2,
            [
                "anthropic-ratelimit-output-tokens-limit",
                "anthropic-ratelimit-output-tokens-remaining",
                "anthropic-ratelimit-output-tokens-reset",
            ],
            rfc3339,
        ),
        // Anthropic's combined form is the most restrictive of its input and output
        // budgets: a budget of its own only when those are not sent.
        (
            0,
            [
                "anthropic-ratelimit-tokens-limit",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ],
            rfc3339,
        ),
    ];
    for (k, [limit, remaining, reset], parse_reset) in budgets {
        if limit.starts_with("anthropic-ratelimit-tokens")
            && !(h.tokens[1].is_empty() && h.tokens[2].is_empty())
        {
            continue;
        }
        let told = told_by(
            &get,
            [limit, remaining, reset],
            parse_reset,
            now,
            &mut h.invalid,
        );
        if !told.is_empty() {
            h.tokens[k] = told;
        }
    }
    // The structured form: `RateLimit: limit=100, remaining=0, reset=5`.
    if let Some(v) = get("ratelimit") {
        match structured(v) {
            Some(Some(reset)) => {
                let d = Duration::from_secs(reset.min(MAX_PAUSE.as_secs()));
                h.exhausted_for = Some(h.exhausted_for.map_or(d, |e| e.max(d)));
            }
            Some(None) => {}
            None => h.invalid.push("ratelimit"),
        }
    }
    h
}

/// One budget's (limit, remaining, reset) headers, bounded; the names of those present that
/// do not parse go to `invalid` (a reset only when nothing remains: then it matters).
fn told_by<'h>(
    get: &impl Fn(&'static str) -> Option<&'h str>,
    [limit, remaining, reset]: [&'static str; 3],
    parse_reset: ResetParser,
    now: SystemTime,
    invalid: &mut Vec<&'static str>,
) -> Told {
    let mut told = Told::default();
    if let Some(v) = get(limit) {
        match parse_remaining(v) {
            Some(n) if n > 0 => told.limit = Some(n.min(MAX_PER_MINUTE)),
            _ => invalid.push(limit),
        }
    }
    if let Some(v) = get(remaining) {
        match parse_remaining(v) {
            Some(n) => told.remaining = Some(n.min(MAX_PER_MINUTE)),
            None => invalid.push(remaining),
        }
    }
    if let Some(v) = get(reset) {
        match parse_reset(v, now) {
            Some(d) => told.reset = Some(d),
            None if told.remaining == Some(0) => invalid.push(reset),
            None => {}
        }
    }
    told
}

fn parse_remaining(v: &str) -> Option<u64> {
    // Some APIs send a float ("0.0"); a negative count means exhausted too.
    let t = v.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Some(n);
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() => Some(if f <= 0.0 { 0 } else { f.ceil() as u64 }),
        _ => None,
    }
}

fn cap(d: Duration) -> Duration {
    d.min(MAX_PAUSE)
}

/// `Retry-After`: delay-seconds or an HTTP-date.
pub fn retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let t = v.trim();
    if let Some(d) = delta_seconds(t) {
        return Some(d);
    }
    let at = httpdate::parse_http_date(t).ok()?;
    Some(cap(at.duration_since(now).unwrap_or(Duration::ZERO)))
}

/// An RFC 3339 time (`2026-12-06T07:00:03Z`, fractions and offsets allowed), as a delay
/// from now.
fn rfc3339(v: &str, now: SystemTime) -> Option<Duration> {
    let at = humantime::parse_rfc3339_weak(v.trim()).ok()?;
    Some(cap(at.duration_since(now).unwrap_or(Duration::ZERO)))
}

/// Non-negative seconds, integer or decimal.
fn delta_seconds(v: &str) -> Option<Duration> {
    let t = v.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Some(cap(Duration::from_secs(n.min(MAX_PAUSE.as_secs()))));
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => {
            Some(cap(Duration::from_secs_f64(f.min(MAX_PAUSE.as_secs_f64()))))
        }
        _ => None,
    }
}

/// `X-RateLimit-Reset`: seconds from now, or a Unix time in seconds or milliseconds.
fn delta_or_epoch(v: &str, now: SystemTime) -> Option<Duration> {
    let n: f64 = v
        .trim()
        .parse()
        .ok()
        .filter(|f: &f64| f.is_finite() && *f >= 0.0)?;
    let now_s = now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    let secs = if n > 1e12 {
        n / 1000.0 - now_s
    } else if n > 1e9 {
        n - now_s
    } else {
        n
    };
    Some(cap(Duration::from_secs_f64(
        secs.clamp(0.0, MAX_PAUSE.as_secs_f64()),
    )))
}

/// Durations as some providers write them: "1s", "6m0s", "20ms", "1.5s", "1h2m3s"; a bare
/// number is seconds.
pub fn go_duration(v: &str) -> Option<Duration> {
    let t = v.trim();
    if t.is_empty() {
        return None;
    }
    if let Some(d) = delta_seconds(t) {
        return Some(d);
    }
    let bytes = t.as_bytes();
    let mut i = 0;
    let mut total = 0f64;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let n: f64 = t.get(start..i)?.parse().ok()?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let scale = match t.get(unit_start..i)? {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
    }
    if !total.is_finite() {
        return None;
    }
    Some(cap(Duration::from_secs_f64(
        total.clamp(0.0, MAX_PAUSE.as_secs_f64()),
    )))
}

/// The `RateLimit` field: one or more named policies, `"default";r=0;t=5, "daily";r=90;t=3600`
/// (a list of items, each with its parameters), or the older single form
/// `limit=100, remaining=0, reset=5`. The longest reset of the policies with nothing
/// remaining (`Some(None)`: none ran out); `None` when no policy says what remains, or a
/// value does not parse.
fn structured(v: &str) -> Option<Option<u64>> {
    let named = v.contains(';') || v.trim_start().starts_with('"');
    let policies: Vec<Vec<&str>> = match named {
        true => v.split(',').map(|p| p.split(';').collect()).collect(),
        false => vec![v.split(',').collect()],
    };
    let mut said = false;
    let mut exhausted: Option<u64> = None;
    for params in policies {
        let (mut remaining, mut reset) = (None, None);
        for part in params {
            let Some((k, val)) = part.split_once('=') else {
                continue;
            };
            let val = val.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "remaining" | "r" => remaining = Some(val.parse::<u64>().ok()?),
                "reset" | "t" => reset = Some(val.parse::<u64>().ok()?),
                _ => {}
            }
        }
        let Some(r) = remaining else { continue };
        said = true;
        if let (0, Some(t)) = (r, reset) {
            exhausted = exhausted.max(Some(t));
        }
    }
    said.then_some(exhausted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn present_sees_a_hint_name_and_only_those() {
        for (name, hint) in [
            ("r", false),
            ("rate", false),
            ("ratelimi", false),
            ("x-request-id", false),
            ("content-type", false),
            ("retry", false),
            ("ratelimit", true),
            ("x-ratelimit-reset", true),
            ("anthropic-ratelimit-tokens-remaining", true),
            ("retry-after", true),
            ("retry-after-ms", true),
            ("x-ezthrottle-rps", true),
        ] {
            let h = headers(&[("date", "x"), (name, "1")]);
            assert_eq!(present(&h), hint, "{name}");
        }
        assert!(!present(&HeaderMap::new()));
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let h = parse(&headers(&[("retry-after", "2")]), now());
        assert_eq!(h.retry_after, Some(Duration::from_secs(2)));
        let date = httpdate::fmt_http_date(now() + Duration::from_secs(30));
        let h = parse(&headers(&[("retry-after", &date)]), now());
        assert_eq!(h.retry_after, Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(30));
        let h = parse(&headers(&[("retry-after", &past)]), now());
        assert_eq!(h.retry_after, Some(Duration::ZERO));
        let h = parse(&headers(&[("retry-after", "soon")]), now());
        assert_eq!((h.retry_after, h.invalid), (None, vec!["retry-after"]));
    }

    /// Headers as OpenAI and Anthropic send them when a budget ran out (values from their
    /// documented responses, times moved to the test's clock).
    #[test]
    fn provider_forms_pause_until_the_budget_that_ran_out_resets() {
        let at =
            |secs: u64| humantime::format_rfc3339(now() + Duration::from_secs(secs)).to_string();
        let cases: Vec<(Vec<(&'static str, String)>, f64)> = vec![
            // OpenAI, tokens: the request budget is left, the token budget is not.
            (
                vec![
                    ("x-ratelimit-limit-requests", "60".into()),
                    ("x-ratelimit-remaining-requests", "59".into()),
                    ("x-ratelimit-reset-requests", "1s".into()),
                    ("x-ratelimit-limit-tokens", "150000".into()),
                    ("x-ratelimit-remaining-tokens", "0".into()),
                    ("x-ratelimit-reset-tokens", "6m0s".into()),
                ],
                360.0,
            ),
            (
                vec![
                    ("x-ratelimit-remaining-tokens", "0".into()),
                    ("x-ratelimit-reset-tokens", "12ms".into()),
                ],
                0.012,
            ),
            // Anthropic, each budget; the longest reset wins when several ran out.
            (
                vec![
                    ("anthropic-ratelimit-requests-limit", "50".into()),
                    ("anthropic-ratelimit-requests-remaining", "0".into()),
                    ("anthropic-ratelimit-requests-reset", at(3)),
                ],
                3.0,
            ),
            (
                vec![
                    ("anthropic-ratelimit-tokens-remaining", "0".into()),
                    ("anthropic-ratelimit-tokens-reset", at(4)),
                ],
                4.0,
            ),
            (
                vec![
                    ("anthropic-ratelimit-input-tokens-remaining", "0".into()),
                    ("anthropic-ratelimit-input-tokens-reset", at(5)),
                    ("anthropic-ratelimit-output-tokens-remaining", "0".into()),
                    ("anthropic-ratelimit-output-tokens-reset", at(7)),
                ],
                7.0,
            ),
            (
                vec![
                    ("anthropic-ratelimit-output-tokens-remaining", "0".into()),
                    (
                        "anthropic-ratelimit-output-tokens-reset",
                        "2023-11-14T22:13:26+00:00".into(),
                    ),
                ],
                6.0,
            ),
        ];
        for (pairs, want) in cases {
            let h = parse(
                &headers(
                    &pairs
                        .iter()
                        .map(|(k, v)| (*k, v.as_str()))
                        .collect::<Vec<_>>(),
                ),
                now(),
            );
            let got = h.exhausted_any().map(|d| d.as_secs_f64());
            assert_eq!(got, Some(want), "{pairs:?}");
            assert!(h.invalid.is_empty(), "{:?}", h.invalid);
        }
        // Budgets left: nothing to hold.
        let h = parse(
            &headers(&[
                ("anthropic-ratelimit-tokens-remaining", "1200"),
                ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:13:26Z"),
            ]),
            now(),
        );
        assert_eq!(h.exhausted_any(), None);
        assert_eq!(h.tokens[0].remaining, Some(1200));
        // A reset that is not a time is reported, not guessed.
        let h = parse(
            &headers(&[
                ("anthropic-ratelimit-tokens-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", "in a minute"),
            ]),
            now(),
        );
        assert_eq!(h.invalid, vec!["anthropic-ratelimit-tokens-reset"]);
        // `retry-after-ms` is the more precise `retry-after`.
        let h = parse(
            &headers(&[("retry-after", "1"), ("retry-after-ms", "250")]),
            now(),
        );
        assert_eq!(h.retry_after, Some(Duration::from_millis(250)));
        let h = parse(&headers(&[("retry-after-ms", "99999999999")]), now());
        assert_eq!(h.retry_after, Some(MAX_PAUSE));
    }

    /// The budgets as OpenAI and Anthropic state them on every answer.
    #[test]
    fn token_budgets_are_read_with_their_limits() {
        let at =
            |secs: u64| humantime::format_rfc3339(now() + Duration::from_secs(secs)).to_string();
        let h = parse(
            &headers(&[
                ("x-ratelimit-limit-requests", "5000"),
                ("x-ratelimit-limit-tokens", "800000"),
                ("x-ratelimit-remaining-tokens", "799100"),
                ("x-ratelimit-reset-tokens", "67ms"),
            ]),
            now(),
        );
        assert_eq!(
            h.tokens[0],
            Told {
                limit: Some(800_000),
                remaining: Some(799_100),
                reset: Some(Duration::from_millis(67)),
            }
        );
        assert_eq!(h.tokens_unbudgeted_for(), None);
        // The request budget is read too (shown in /status).
        assert_eq!(h.requests.limit, Some(5_000));
        assert_eq!(h.requests.remaining, None);
        // Anthropic: input and output budgets; the combined form is then not a budget.
        let (r5, r9) = (at(5), at(9));
        let h = parse(
            &headers(&[
                ("anthropic-ratelimit-tokens-limit", "10000"),
                ("anthropic-ratelimit-tokens-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", &r9),
                ("anthropic-ratelimit-input-tokens-limit", "40000"),
                ("anthropic-ratelimit-input-tokens-remaining", "39000"),
                ("anthropic-ratelimit-input-tokens-reset", &r5),
                ("anthropic-ratelimit-output-tokens-limit", "10000"),
                ("anthropic-ratelimit-output-tokens-remaining", "0"),
                ("anthropic-ratelimit-output-tokens-reset", &r9),
            ]),
            now(),
        );
        assert_eq!(h.tokens[0], Told::default());
        assert_eq!(h.tokens[1].limit, Some(40_000));
        assert_eq!(h.tokens[2].remaining, Some(0));
        assert_eq!(h.tokens[2].reset, Some(Duration::from_secs(9)));
        assert_eq!(h.tokens_unbudgeted_for(), None, "the limit came with it");
        assert_eq!(h.exhausted_any(), Some(Duration::from_secs(9)));
        // Only the combined form: it is the budget.
        let h = parse(
            &headers(&[
                ("anthropic-ratelimit-tokens-limit", "10000"),
                ("anthropic-ratelimit-tokens-remaining", "20"),
            ]),
            now(),
        );
        assert_eq!(h.tokens[0].limit, Some(10_000));
        // Hostile values are bounded or reported.
        let h = parse(
            &headers(&[
                ("x-ratelimit-limit-tokens", "lots"),
                ("x-ratelimit-remaining-tokens", "-5"),
            ]),
            now(),
        );
        assert_eq!(h.tokens[0].remaining, Some(0));
        assert_eq!(h.invalid, vec!["x-ratelimit-limit-tokens"]);
        let h = parse(&headers(&[("x-ratelimit-limit-tokens", "0")]), now());
        assert_eq!(h.invalid, vec!["x-ratelimit-limit-tokens"]);
        for huge in ["99999999999999999999", "1e30"] {
            let h = parse(&headers(&[("x-ratelimit-limit-tokens", huge)]), now());
            assert_eq!(h.tokens[0].limit, Some(MAX_PER_MINUTE));
        }
    }

    #[test]
    fn ezthrottle_pace() {
        let h = parse(
            &headers(&[
                ("x-ezthrottle-rps", "10"),
                ("x-ezthrottle-max-concurrent", "4"),
            ]),
            now(),
        );
        assert_eq!(h.rps, Some(10.0));
        assert_eq!(h.max_concurrent, Some(4));
        let h = parse(
            &headers(&[
                ("x-ezthrottle-rps", "-1"),
                ("x-ezthrottle-max-concurrent", "0"),
            ]),
            now(),
        );
        assert!(h.is_empty());
        assert_eq!(h.invalid.len(), 2);
    }

    #[test]
    fn remaining_zero_pauses_until_reset_in_every_form() {
        for (pairs, want) in [
            (
                vec![
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "1s"),
                ],
                1.0,
            ),
            (
                vec![
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "6m0s"),
                ],
                360.0,
            ),
            (
                vec![
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "20ms"),
                ],
                0.02,
            ),
            (
                vec![("ratelimit-remaining", "0"), ("ratelimit-reset", "5")],
                5.0,
            ),
            (
                vec![("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "7")],
                7.0,
            ),
            (
                vec![
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1700000009"),
                ],
                9.0,
            ),
            (
                vec![
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1700000004000"),
                ],
                4.0,
            ),
            (vec![("ratelimit", "limit=100, remaining=0, reset=3")], 3.0),
            // Several named policies: the one that ran out holds, whichever comes first.
            (
                vec![("ratelimit", "\"default\";r=0;t=4, \"daily\";r=100;t=3600")],
                4.0,
            ),
            (
                vec![("ratelimit", "\"burst\";r=5;t=1, \"hour\";r=0;t=7")],
                7.0,
            ),
        ] {
            let h = parse(&headers(&pairs), now());
            let got = h.exhausted_for.map(|d| d.as_secs_f64());
            assert_eq!(got, Some(want), "{pairs:?}");
        }
        let h = parse(
            &headers(&[("x-ratelimit-remaining", "5"), ("x-ratelimit-reset", "7")]),
            now(),
        );
        assert!(h.is_empty());
        let h = parse(&headers(&[("ratelimit", "\"default\";r=50;t=30")]), now());
        assert!(h.is_empty() && h.invalid.is_empty());
    }

    #[test]
    fn pauses_are_capped() {
        let h = parse(&headers(&[("retry-after", "99999999999")]), now());
        assert_eq!(h.retry_after, Some(MAX_PAUSE));
    }

    proptest! {
        #[test]
        fn parsing_is_total(values in proptest::collection::vec("[ -~]{0,24}", NAMES.len())) {
            let mut h = HeaderMap::new();
            for (name, v) in NAMES.iter().zip(values.iter()) {
                if let Ok(v) = HeaderValue::from_str(v) {
                    h.insert(*name, v);
                }
            }
            let hints = parse(&h, now());
            if let Some(d) = hints.retry_after { prop_assert!(d <= MAX_PAUSE); }
            if let Some(d) = hints.exhausted_for { prop_assert!(d <= MAX_PAUSE); }
            if let Some(r) = hints.rps { prop_assert!(r > 0.0 && r.is_finite()); }
        }

        #[test]
        fn integer_retry_after_round_trips(n in 0u64..3600) {
            let h = parse(&headers(&[("retry-after", &n.to_string())]), now());
            prop_assert_eq!(h.retry_after, Some(Duration::from_secs(n)));
        }

        #[test]
        fn go_durations_never_panic(s in "\\PC{0,16}") {
            if let Some(d) = go_duration(&s) { prop_assert!(d <= MAX_PAUSE); }
        }
    }
}
