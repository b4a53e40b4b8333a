//! Upstream rate-limit headers: any values for every parsed header name, and the duration
//! parsers alone. Never a panic; pauses stay within their cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::admission::hints;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut headers = http::HeaderMap::new();
    for (name, value) in hints::NAMES.iter().zip(data.split(|b| *b == b'\n')) {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.insert(*name, v);
        }
    }
    let h = hints::parse(&headers, now);
    if let Some(d) = h.retry_after {
        assert!(d <= hints::MAX_PAUSE);
    }
    if let Some(d) = h.exhausted_for {
        assert!(d <= hints::MAX_PAUSE);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hints::retry_after(text, now);
        let _ = hints::go_duration(text);
    }
    let _ = SystemTime::now();
});
