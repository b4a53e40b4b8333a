//! Process-wide state shared by the listener, the proxy and the admin service: the current
//! configuration generation (swapped atomically) and the metrics.

use crate::admission::{Admission, Clock};
use crate::config::{Config, FleetBackend};
use crate::generation::Generation;
use crate::metrics::Metrics;
use crate::regions::Regions;
use arc_swap::ArcSwap;
use pingora_core::connectors::ConnectorOptions;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub struct Shared {
    current: ArcSwap<Generation>,
    pub metrics: Metrics,
    /// Per-host pacing, pauses and learned limits.
    pub admission: Admission,
    /// The fleet this node shares pace, pauses and learned limits with (`[shared] backend =
    /// "redis"`); admission reaches it through its seam.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    pub started: Instant,
    /// The file the configuration came from; `None` for the embedded default.
    pub config_path: Option<PathBuf>,
    /// Held while a reload runs: never two at once.
    pub reloading: std::sync::Mutex<()>,
    /// Configured hosts' regions: health, ejection, latency, retry budgets.
    pub regions: Regions,
    /// Connections to regions (and health checks), pooled.
    pub upstream: Arc<crate::upstream::Upstreams>,
    /// This process's id in `Via`, to refuse a request that comes back (a peer loop).
    pub instance: String,
    /// The `Via` value this process adds (made once: each head gets a shared copy).
    pub via: http::HeaderValue,
    /// Client connections open on the proxy listener (tunnels included).
    pub connections: std::sync::atomic::AtomicUsize,
    /// The same, by client address.
    pub per_client: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// DNS: hickory's resolver, the answers cached, the lookups in flight.
    pub dns: crate::resolve::Dns,
    /// The CA and leaf certificates of TLS interception (`[intercept]` with a CA).
    pub interceptor: Option<Arc<crate::intercept::Interceptor>>,
    /// Jobs: the store, the schedule, this process's job credential.
    pub jobs: crate::jobs::Jobs,
    /// Shutting down, this node has told the fleet it leaves (or it has no fleet).
    pub fleet_left: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        metrics: Metrics,
        connector: Option<ConnectorOptions>,
    ) -> Result<Arc<Shared>, String> {
        let clock = Arc::new(Clock::quanta());
        let fleet = match config.shared.backend {
            FleetBackend::Memory => None,
            FleetBackend::Redis => {
                let fleet = crate::fleet::Fleet::new(
                    &config.shared,
                    clock.clone(),
                    crate::fleet::Options::default(),
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
        let jobs = crate::jobs::Jobs::new().map_err(|e| format!("job metrics: {e}"))?;
        for c in jobs.metrics.collectors() {
            metrics
                .register(c)
                .map_err(|e| format!("job metrics: {e}"))?;
        }
        let dns = crate::resolve::Dns::new(&config.server)?;
        let interceptor = crate::intercept::Interceptor::from_config(&config.intercept)
            .map_err(|e| format!("intercept: {e}"))?;
        let generation = Generation::build(1, config);
        metrics.config_generation.set(1);
        metrics.prepare(&generation);
        let admission = Admission::with_fleet(
            clock,
            fleet
                .clone()
                .map(|f| f as Arc<dyn crate::admission::FleetSeam>),
        );
        let alone = fleet.is_none();
        admission.configure(&generation);
        let instance = instance_id();
        Ok(Arc::new(Shared {
            regions: Regions::with_connector(&generation, connector.clone()),
            upstream: crate::upstream::Upstreams::new(connector),
            via: http::HeaderValue::try_from(format!("1.1 sluice-{instance}"))
                .unwrap_or_else(|_| http::HeaderValue::from_static("1.1 sluice")),
            instance,
            current: ArcSwap::from_pointee(generation),
            metrics,
            admission,
            fleet,
            started: Instant::now(),
            config_path,
            reloading: std::sync::Mutex::new(()),
            connections: std::sync::atomic::AtomicUsize::new(0),
            per_client: std::sync::Mutex::new(std::collections::HashMap::new()),
            interceptor,
            dns,
            fleet_left: std::sync::atomic::AtomicBool::new(alone),
            jobs,
        }))
    }

    /// Put a new generation in force; requests already running keep the one they hold.
    pub fn swap(&self, generation: Generation) {
        let number = generation.number as i64;
        let new = Arc::new(generation);
        let old = self.current.swap(new.clone());
        self.admission.apply_generation(&old, &new);
        self.regions.apply_generation(&new);
        self.metrics.config_generation.set(number);
        self.metrics.prepare(&new);
    }

    /// A snapshot of the generation in force; hold it for the whole request.
    pub fn generation(&self) -> Arc<Generation> {
        self.current.load_full()
    }
}

/// The jobs' seam to the process.
impl crate::jobs::Process for Shared {
    fn jobs(&self) -> &crate::jobs::Jobs {
        &self.jobs
    }
    fn generation(&self) -> Arc<Generation> {
        Shared::generation(self)
    }
    fn instance(&self) -> &str {
        &self.instance
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn dns(&self) -> &crate::resolve::Dns {
        &self.dns
    }
}

/// A short id for this process: 8 hex digits from a randomly keyed hash of the pid and time.
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:08x}", h.finish() as u32)
}
