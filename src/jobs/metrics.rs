//! The jobs' own metrics, registered with the process's registry at start (as the fleet's
//! are), so that nothing here depends on the rest of sluice's metrics.

use super::State;
use prometheus::{IntCounterVec, IntGauge, Opts};

pub struct JobMetrics {
    /// `sluice_jobs_total{state}`: jobs that reached each state.
    pub jobs: IntCounterVec,
    /// `sluice_jobs_waiting`: jobs whose call is not made yet (queued or running).
    pub waiting: IntGauge,
    /// `sluice_job_deliveries_total{outcome="acked|failed|held|gone|gave_up"}`.
    pub deliveries: IntCounterVec,
}

impl JobMetrics {
    pub fn new() -> Result<JobMetrics, prometheus::Error> {
        let jobs = IntCounterVec::new(
            Opts::new(
                "sluice_jobs_total",
                "Jobs that reached each state (queued, running, succeeded, failed, canceled, delivered, dead)",
            ),
            &["state"],
        )?;
        for s in State::ALL {
            jobs.with_label_values(&[s.as_str()]);
        }
        let waiting = IntGauge::new(
            "sluice_jobs_waiting",
            "Jobs whose call is not made yet (queued, or in the pipeline now)",
        )?;
        let deliveries = IntCounterVec::new(
            Opts::new(
                "sluice_job_deliveries_total",
                "Webhook deliveries by outcome: acked, failed (tried again), held (sluice's own pace), gone (410), gave_up",
            ),
            &["outcome"],
        )?;
        for o in ["acked", "failed", "held", "gone", "gave_up"] {
            deliveries.with_label_values(&[o]);
        }
        Ok(JobMetrics {
            jobs,
            waiting,
            deliveries,
        })
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.jobs.clone()),
            Box::new(self.waiting.clone()),
            Box::new(self.deliveries.clone()),
        ]
    }
}
