//! Standard Webhooks 1.0 signatures (`webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`, one per active secret, space-separated) and the backoff between
//! tries of one receiver (exponential, full jitter). Pure functions.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;

type HmacSha256 = Hmac<Sha256>;

/// `v1,<signature>` of one message under one key (`None` only for a key HMAC refuses, which
/// HMAC-SHA256 never does: it takes keys of any length).
pub fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    ))
}

/// The `webhook-signature` value: one signature per key.
pub fn header(keys: &[Vec<u8>], id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
    let signatures: Option<Vec<String>> = keys
        .iter()
        .map(|k| signature(k, id, timestamp, body))
        .collect();
    Some(signatures?.join(" "))
}

/// Does `header` hold a valid signature of the message under `key`? (For receivers and
/// tests; compared in constant time.)
pub fn verify(key: &[u8], id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
    let Some(expected) = signature(key, id, timestamp, body) else {
        return false;
    };
    header
        .split(' ')
        .any(|s| crate::policy::auth::same_secret(s.as_bytes(), expected.as_bytes()))
}

/// Wait before try `n` (0 = the first retry): uniform in `[0, min(max, base * 2^n)]`, from a
/// uniform draw `unit` in `[0, 1)`.
pub fn backoff(base: Duration, max: Duration, n: u32, unit: f64) -> Duration {
    let ceiling = base
        .checked_mul(1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_reference() {
        // The example of the Standard Webhooks specification.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("key");
        let body = br#"{"test": 2432232314}"#;
        let sig = signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        let both = header(
            &[vec![1; 32], key.clone()],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
        )
        .expect("signed");
        assert!(verify(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            &both
        ));
        assert!(!verify(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265331,
            body,
            &both
        ));
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_ceiling() {
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(b, m, 0, 0.999_999).as_millis(), 999);
        assert_eq!(backoff(b, m, 3, 0.5), Duration::from_secs(4));
        assert_eq!(backoff(b, m, 40, 1.0), m, "capped, never overflowing");
        assert_eq!(backoff(b, m, 3, 0.0), Duration::ZERO);
    }
}
