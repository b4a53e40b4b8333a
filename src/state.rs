//! Process-wide state shared by the listener, the proxy and the admin service: the current
//! configuration generation (swapped atomically) and the metrics.

use crate::admission::{Admission, Clock};
use crate::config::{Backend, Config, Generation};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub struct Shared {
    current: ArcSwap<Generation>,
    pub metrics: Metrics,
    /// Per-host pacing, pauses and learned limits.
    pub admission: Admission,
    pub started: Instant,
    /// The file the configuration came from; `None` for the embedded default.
    pub config_path: Option<PathBuf>,
    /// Held while a reload runs: never two at once.
    pub reloading: std::sync::Mutex<()>,
}

impl Shared {
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        metrics: Metrics,
    ) -> Result<Arc<Shared>, String> {
        let clock = Arc::new(Clock::quanta());
        let fleet = match config.shared.backend {
            Backend::Memory => None,
            Backend::Redis => {
                let fleet = crate::shared::Fleet::new(
                    &config.shared,
                    clock.clone(),
                    crate::shared::Options::default(),
                )
                .map_err(|e| format!("shared metrics: {e}"))?;
                for c in fleet.metrics.collectors() {
                    metrics
                        .register(c)
                        .map_err(|e| format!("shared metrics: {e}"))?;
                }
                Some(fleet)
            }
        };
        let generation = Generation::build(1, config);
        metrics.config_generation.set(1);
        Ok(Arc::new(Shared {
            current: ArcSwap::from_pointee(generation),
            metrics,
            admission: Admission::with_fleet(clock, fleet),
            started: Instant::now(),
            config_path,
            reloading: std::sync::Mutex::new(()),
        }))
    }

    /// Put a new generation in force; requests already running keep the one they hold.
    pub fn swap(&self, generation: Generation) {
        let number = generation.number as i64;
        let new = Arc::new(generation);
        let old = self.current.swap(new.clone());
        self.admission.apply_generation(&old, &new);
        self.metrics.config_generation.set(number);
    }

    /// A snapshot of the generation in force; hold it for the whole request.
    pub fn generation(&self) -> Arc<Generation> {
        self.current.load_full()
    }
}
