//! Configuration reload (SIGHUP or `POST /reload`): read and validate the file aside, build the
//! new generation, then swap it in atomically. A bad file changes nothing: the reasons are
//! logged and counted, and the running generation keeps serving.

use crate::config::Config;
use crate::generation::Generation;
use crate::state::Shared;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;

/// Settings a running process cannot change: they need a restart (or an upgrade).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.server, &new.server);
    let mut changed = Vec::new();
    if o.listen != n.listen {
        changed.push("server.listen");
    }
    if o.admin_listen != n.admin_listen {
        changed.push("server.admin_listen");
    }
    if o.threads != n.threads {
        changed.push("server.threads");
    }
    if o.dns_servers != n.dns_servers
        || o.dns_cache_size != n.dns_cache_size
        || o.dns_max_in_flight != n.dns_max_in_flight
    {
        changed.push("server.dns_servers/dns_cache_size/dns_max_in_flight");
    }
    if o.state_dir != n.state_dir || old.jobs.workers != new.jobs.workers {
        changed.push("server.state_dir/jobs.workers");
    }
    if o.upstream_ca_file != n.upstream_ca_file {
        changed.push("server.upstream_ca_file");
    }
    if o.upstream_keepalive_pool_size != n.upstream_keepalive_pool_size {
        changed.push("server.upstream_keepalive_pool_size");
    }
    if o.pid_file != n.pid_file || o.upgrade_sock != n.upgrade_sock {
        changed.push("server.pid_file/upgrade_sock");
    }
    if o.grace_period != n.grace_period
        || o.graceful_shutdown_timeout != n.graceful_shutdown_timeout
    {
        changed.push("server.grace_period/graceful_shutdown_timeout");
    }
    if o.log_level != n.log_level || o.access_log != n.access_log || o.log_format != n.log_format {
        changed.push("server.log_*/access_log");
    }
    if old.shared != new.shared {
        changed.push("shared");
    }
    let (oi, ni) = (&old.intercept, &new.intercept);
    if oi.ca_cert != ni.ca_cert
        || oi.ca_key != ni.ca_key
        || oi.leaf_ttl != ni.leaf_ttl
        || oi.leaf_cache != ni.leaf_cache
    {
        changed.push("intercept.ca_cert/ca_key/leaf_ttl/leaf_cache");
    }
    changed
}

/// Reload from the configuration file. Returns the new generation number, or every reason
/// the file was refused.
pub fn reload(shared: &Shared) -> Result<u64, String> {
    let _one_at_a_time = shared.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let result = try_reload(shared);
    let label = if result.is_ok() { "ok" } else { "error" };
    shared
        .metrics
        .config_reloads
        .with_label_values(&[label])
        .inc();
    match &result {
        Ok(n) => tracing::info!(generation = n, "configuration reloaded"),
        Err(why) => {
            tracing::error!(reason = %why, "configuration reload refused; the running configuration stays")
        }
    }
    result
}

fn try_reload(shared: &Shared) -> Result<u64, String> {
    let Some(path) = shared.config_path.as_ref() else {
        return Err(
            "sluice runs on the embedded default; start it with --config FILE to reload".into(),
        );
    };
    let config = Config::load(path)
        .and_then(|config| {
            // The CA files are read as at start, so that a reload never accepts what a
            // restart would refuse.
            crate::intercept::Interceptor::check(&config.intercept)?;
            Ok(config)
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let current = shared.generation();
    let restart = restart_only_changes(&current.config, &config);
    if !restart.is_empty() {
        return Err(format!(
            "{} changed: these take effect only after a restart or an upgrade; nothing was applied",
            restart.join(", ")
        ));
    }
    let number = current.number + 1;
    shared.swap(Generation::build(number, config));
    Ok(number)
}

/// Reloads on SIGHUP until shutdown.
pub struct HangupListener {
    shared: Arc<Shared>,
}

impl HangupListener {
    pub fn new(shared: Arc<Shared>) -> HangupListener {
        HangupListener { shared }
    }
}

#[async_trait]
impl BackgroundService for HangupListener {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; use POST /reload");
                return;
            }
        };
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let shared = self.shared.clone();
                    // Reading and validating the file is blocking work.
                    let outcome = tokio::task::spawn_blocking(move || reload(&shared)).await;
                    if let Err(e) = outcome {
                        tracing::error!(error = %e, "reload task failed");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
