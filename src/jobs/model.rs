//! What a job is, as stored and as shown: the call asked for, where it is in its life, the
//! upstream's answer and each webhook's deliveries. Plain data; the rules of moving from one
//! state to the next live here too, so the store and the workers share them.

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Accepted, waiting for its turn (or for its host's pause to end).
    Queued,
    /// Its call is in the pipeline now.
    Running,
    /// The upstream answered 2xx; webhooks (if any) are being told.
    Succeeded,
    /// No 2xx answer (the upstream's, or sluice's refusal, or `outcome_unknown`).
    Failed,
    /// Canceled before its call was sent.
    Canceled,
    /// The quorum of webhooks acknowledged the result.
    Delivered,
    /// The quorum cannot be reached any more (receivers gone or out of time).
    Dead,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Queued,
        State::Running,
        State::Succeeded,
        State::Failed,
        State::Canceled,
        State::Delivered,
        State::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Canceled => "canceled",
            State::Delivered => "delivered",
            State::Dead => "dead",
        }
    }

    /// The call was made (or given up): what is left is telling webhooks.
    pub fn called(self) -> bool {
        !matches!(self, State::Queued | State::Running)
    }
}

/// A webhook as the submission named it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub url: String,
    /// Name of a secret in `[webhooks.secrets]`.
    pub secret: String,
}

/// The call a job makes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    pub mode: Option<String>,
    pub regions: Option<Vec<String>>,
    pub retry_on: Option<String>,
    pub idempotency_key: Option<String>,
}

impl Call {
    /// May the call be sent again after a crash left its outcome unknown? Only when sending
    /// it twice means the same as once: an idempotent method, or an idempotency key.
    pub fn replayable(&self) -> bool {
        matches!(
            self.method.as_str(),
            "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
        ) || self.idempotency_key.is_some()
            || self
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("idempotency-key"))
    }
}

/// The upstream's answer, as kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    /// The body was longer than `jobs.max_result_bytes` and was cut there.
    pub truncated: bool,
}

/// Where one receiver is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Receipt {
    /// Not acknowledged yet: tried again at `next_at`.
    Pending,
    /// Answered 2xx.
    Acked,
    /// Answered 410: never tried again.
    Gone,
    /// Refused by sluice's egress policy, or out of `delivery_ttl`.
    GaveUp,
}

/// One receiver's deliveries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub url: String,
    pub secret: String,
    pub receipt: Receipt,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// Unix ms of the next try (while pending).
    pub next_at: u64,
}

/// A job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// The authenticated client that submitted it (its pace and limits apply to the call).
    pub client: Option<String>,
    pub created: u64,
    /// Unix ms: the call is given up after this.
    pub deadline: u64,
    pub state: State,
    /// Unix ms of the next try of the call (while queued).
    pub next_at: u64,
    /// Times the call went into the pipeline.
    pub attempts: u32,
    /// Why it failed, when that is not in `answer` (`outcome_unknown`, `timeout`, a
    /// `Sluice-Error` code).
    pub outcome: Option<String>,
    pub call: Call,
    pub answer: Option<StoredAnswer>,
    pub quorum: usize,
    pub deliveries: Vec<Delivery>,
    pub metadata: serde_json::Value,
    /// Unix ms when the call ended (or was given up).
    pub finished: Option<u64>,
}

impl Job {
    /// Acknowledged receivers.
    pub fn acked(&self) -> usize {
        self.deliveries
            .iter()
            .filter(|d| d.receipt == Receipt::Acked)
            .count()
    }

    /// After a delivery changed: `delivered` at the quorum, `dead` when it can no longer be
    /// reached. Returns the new state if it changed.
    pub fn settle(&mut self) -> Option<State> {
        if !matches!(self.state, State::Succeeded | State::Failed) || self.deliveries.is_empty() {
            return None;
        }
        let pending = self
            .deliveries
            .iter()
            .filter(|d| d.receipt == Receipt::Pending)
            .count();
        let next = if self.acked() >= self.quorum {
            State::Delivered
        } else if self.acked() + pending < self.quorum {
            State::Dead
        } else {
            return None;
        };
        self.state = next;
        Some(next)
    }

    /// Nothing left to do for it: kept only until its retention ends.
    pub fn done(&self) -> bool {
        self.state.called()
            && !self
                .deliveries
                .iter()
                .any(|d| d.receipt == Receipt::Pending)
    }
}

/// Bytes as base64 text in JSON.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(receipts: &[Receipt], quorum: usize) -> Job {
        Job {
            id: "j".into(),
            client: None,
            created: 0,
            deadline: 0,
            state: State::Succeeded,
            next_at: 0,
            attempts: 1,
            outcome: None,
            call: Call {
                url: "http://a.test/".into(),
                method: "POST".into(),
                headers: vec![],
                body: vec![],
                mode: None,
                regions: None,
                retry_on: None,
                idempotency_key: None,
            },
            answer: None,
            quorum,
            deliveries: receipts
                .iter()
                .map(|r| Delivery {
                    url: "http://r.test/".into(),
                    secret: "s".into(),
                    receipt: *r,
                    attempts: 0,
                    last_status: None,
                    last_error: None,
                    next_at: 0,
                })
                .collect(),
            metadata: serde_json::Value::Null,
            finished: Some(0),
        }
    }

    #[test]
    fn quorum_settles_delivered_or_dead() {
        use Receipt::*;
        assert_eq!(
            job(&[Acked, Acked, Pending], 2).settle(),
            Some(State::Delivered)
        );
        assert_eq!(job(&[Acked, Pending, Pending], 2).settle(), None);
        assert_eq!(job(&[Acked, Gone, GaveUp], 2).settle(), Some(State::Dead));
        assert_eq!(job(&[Acked, Gone, Pending], 2).settle(), None);
        let mut j = job(&[Acked, Acked, Pending], 2);
        j.settle();
        assert!(!j.done(), "the third receiver is still tried");
        assert_eq!(j.settle(), None, "settled once");
    }

    #[test]
    fn a_call_is_replayable_only_when_sending_twice_is_harmless() {
        let mut j = job(&[], 1);
        assert!(!j.call.replayable());
        j.call.method = "PUT".into();
        assert!(j.call.replayable());
        j.call.method = "POST".into();
        j.call.headers.push(("Idempotency-Key".into(), "k".into()));
        assert!(j.call.replayable());
    }
}
