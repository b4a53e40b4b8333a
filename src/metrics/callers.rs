//! Waits and refusals by caller at contended hosts. `caller` is a configured client's name or
//! `other`, so the label set stays bounded.

use crate::admission::{Admission, OTHER};
use crate::generation::Generation;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct CallerMetrics {
    /// `sluice_caller_waiting{caller}`: requests waiting in contended hosts' queues now,
    /// counted when scraped.
    pub waiting: IntGaugeVec,
    /// `sluice_caller_queue_wait_seconds{caller,priority}`: how long admitted requests that
    /// had to wait waited.
    pub queue_wait: HistogramVec,
    /// `sluice_caller_rejections_total{caller,reason}`: refusals by admission.
    pub rejections: IntCounterVec,
}

impl CallerMetrics {
    pub fn new(registry: &Registry) -> Result<CallerMetrics, prometheus::Error> {
        let waiting = IntGaugeVec::new(
            Opts::new(
                "sluice_caller_waiting",
                "Requests waiting for their host's admission now, by caller",
            ),
            &["caller"],
        )?;
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "sluice_caller_queue_wait_seconds",
                "Time admitted requests that had to wait waited, by caller and priority",
            )
            .buckets(vec![
                0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["caller", "priority"],
        )?;
        let rejections = IntCounterVec::new(
            Opts::new(
                "sluice_caller_rejections_total",
                "Requests refused by admission, by caller and reason",
            ),
            &["caller", "reason"],
        )?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        registry.register(Box::new(rejections.clone()))?;
        waiting.with_label_values(&[OTHER]);
        Ok(CallerMetrics {
            waiting,
            queue_wait,
            rejections,
        })
    }

    /// Count the requests waiting in contended hosts' queues now.
    pub fn refresh(&self, admission: &Admission, generation: &Generation) {
        self.waiting.reset();
        self.waiting.with_label_values(&[OTHER]).set(0);
        for room in admission.rooms() {
            for line in room.lines() {
                let label = match generation.clients.by_name(&line.caller) {
                    Some(_) => &*line.caller,
                    None => OTHER,
                };
                self.waiting
                    .with_label_values(&[label])
                    .add(i64::try_from(line.waiting).unwrap_or(i64::MAX));
            }
        }
    }
}
