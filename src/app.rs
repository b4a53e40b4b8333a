//! Wiring: from a validated `Config` to a Pingora `Server` with the proxy and admin services.

use crate::admin::Admin;
use crate::config::Config;
use crate::front::{Front, ProxyListener};
use crate::metrics::Metrics;
use crate::proxy::SluiceProxy;
use crate::state::Shared;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::listening::Service;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Process options that pass through to Pingora.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub daemon: bool,
    pub upgrade: bool,
}

/// Build the server; the caller runs it with `run_forever()`.
pub fn build_server(
    config: Config,
    config_path: Option<PathBuf>,
    options: RunOptions,
) -> Result<Server, String> {
    let metrics = Metrics::new().map_err(|e| format!("metrics registry: {e}"))?;
    let proxy_conf = Arc::new(server_conf(&config)?);
    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config)?);
    server.bootstrap();

    let listen = config.server.listen.clone();
    let admin_listen = config.server.admin_listen.clone();
    if !options.upgrade {
        // Pingora retries a busy address for a while and then panics in the service thread,
        // leaving the process up without its listener: fail at once with a clear reason.
        for (key, addr) in [
            ("server.listen", &listen),
            ("server.admin_listen", &admin_listen),
        ] {
            if let Err(e) = std::net::TcpListener::bind(addr.as_str()) {
                return Err(format!("{key} {addr}: cannot listen: {e}"));
            }
        }
    }
    let connector = pingora_core::connectors::ConnectorOptions::from_server_conf(&proxy_conf);
    let shared = Shared::new(config, config_path, metrics, Some(connector))?;
    let state_dir = std::path::PathBuf::from(&shared.generation().config.server.state_dir);
    let config_now = shared.generation().config.clone();
    if config_now.jobs.enabled && crate::jobs::fleet_url(&config_now).is_none() {
        if let Err(e) = shared.jobs.open_dir(&state_dir) {
            // During an upgrade the old process still holds it: taken when it lets go.
            tracing::info!(target: "sluice::jobs", error = %e, "job store not open at start");
        }
    }

    let http = pingora_proxy::http_proxy(&proxy_conf, SluiceProxy::new(shared.clone()));
    let front = ProxyListener::new("sluice proxy", Front::new(shared.clone(), http), &listen);

    let sweeper = pingora_core::services::background::background_service(
        "sluice sweeper",
        crate::sweeper::Sweeper::new(shared.clone()),
    );
    let hangup = pingora_core::services::background::background_service(
        "sluice reload",
        crate::reload::HangupListener::new(shared.clone()),
    );
    let health = pingora_core::services::background::background_service(
        "sluice health checks",
        crate::sweeper::HealthChecker::new(shared.clone()),
    );
    // Only with a fleet (`[shared]` needs a restart to change): with the memory backend the
    // service would stop at once and Pingora would log it as exited, which reads as a fault.
    let fleet = shared.fleet.clone().map(|fleet| {
        let (told, left) = (shared.clone(), shared.clone());
        pingora_core::services::background::background_service(
            "sluice fleet",
            crate::fleet::service::FleetService::new(
                fleet,
                Box::new(move |event| told.admission.apply_event(event)),
                Box::new(move || left.fleet_left.store(true, Ordering::Release)),
            ),
        )
    });
    let shared_for_exit = shared.clone();
    let shared_for_jobs = shared.clone();
    let grace = shared.generation().config.server.grace_period.get();
    let mut admin = Service::new("sluice admin".to_string(), Admin::new(shared));
    admin.add_tcp(&admin_listen);
    admin.threads = Some(1);

    early_exit(&server, shared_for_exit, grace);
    server.add_service(front);
    server.add_service(admin);
    server.add_service(sweeper);
    server.add_service(pingora_core::services::background::background_service(
        "sluice jobs",
        crate::jobs::Service::new(shared_for_jobs),
    ));
    server.add_service(hangup);
    server.add_service(health);
    if let Some(fleet) = fleet {
        server.add_service(fleet);
    }
    Ok(server)
}

/// How long nothing must be in flight before the process exits ahead of its grace period.
const QUIET_BEFORE_EXIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Pingora sleeps the whole grace period after SIGTERM, even with nothing left to finish.
/// This watcher ends the process as soon as the last client connection has closed (idle
/// kept-alive connections close at once on shutdown; requests and tunnels in flight finish
/// first) and the node has left its fleet, both for `QUIET_BEFORE_EXIT`, and otherwise lets
/// the grace period run its course.
fn early_exit(server: &Server, shared: Arc<Shared>, grace: std::time::Duration) {
    use pingora_core::server::ExecutionPhase;
    use std::sync::atomic::Ordering;
    let mut phases = server.watch_execution_phase();
    let spawned = std::thread::Builder::new()
        .name("sluice exit".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::ShutdownGracePeriod) => {}
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
            let started = std::time::Instant::now();
            // Quiet for a while, not just for a moment: a connection accepted just before the
            // listener stopped may not be counted yet (its task has yet to run).
            let mut quiet_since: Option<std::time::Instant> = None;
            while started.elapsed() < grace {
                let idle = shared.connections.load(Ordering::Acquire) == 0
                    && shared.fleet_left.load(Ordering::Acquire);
                if !idle {
                    quiet_since = None;
                } else if quiet_since
                    .get_or_insert_with(std::time::Instant::now)
                    .elapsed()
                    >= QUIET_BEFORE_EXIT
                {
                    tracing::info!(
                        after_ms = started.elapsed().as_millis() as u64,
                        "nothing left in flight: exiting before the grace period ends"
                    );
                    std::process::exit(0);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            return;
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no early exit on shutdown: the grace period runs in full");
    }
}

fn server_conf(config: &Config) -> Result<ServerConf, String> {
    let s = &config.server;
    let mut conf = ServerConf {
        threads: config.worker_threads(),
        // One worker has nobody to steal from: a plain single-threaded runtime for it skips
        // the multi-threaded scheduler's bookkeeping on every wake-up.
        work_stealing: config.worker_threads() > 1,
        grace_period_seconds: Some(ceil_secs(s.grace_period.get())),
        graceful_shutdown_timeout_seconds: Some(ceil_secs(s.graceful_shutdown_timeout.get())),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    if let Some(extra) = &s.upstream_ca_file {
        let bundle = ca_bundle(Path::new(extra))
            .map_err(|e| format!("server.upstream_ca_file: cannot build the CA bundle: {e}"))?;
        conf.ca_file = Some(bundle.display().to_string());
    }
    Ok(conf)
}

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Pingora's connector trusts either the system roots or one CA file. To *add* the operator's
/// CAs to the system roots, write both into one bundle that the connector loads.
fn ca_bundle(extra: &Path) -> std::io::Result<PathBuf> {
    let mut pem = String::new();
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file());
    if let Some(path) = system {
        pem.push_str(&std::fs::read_to_string(path)?);
        pem.push('\n');
    } else {
        tracing::warn!("no system CA bundle found; trusting only server.upstream_ca_file");
    }
    pem.push_str(&std::fs::read_to_string(extra)?);
    let out = std::env::temp_dir().join(format!("sluice-ca-{}.pem", std::process::id()));
    std::fs::write(&out, pem)?;
    Ok(out)
}
