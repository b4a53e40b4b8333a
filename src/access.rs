//! The end of every request and tunnel, for every way in: its count in the metrics
//! (`sluice_requests_total`, `sluice_request_duration_seconds`) and its line in the access log
//! (the `sluice::access` target, when `server.access_log` is on). Written here only.

use crate::error::Code;
use crate::generation::Generation;
use crate::state::Shared;
use crate::target::WayIn;
use std::time::Duration;

/// One request's or tunnel's line; what is not known stays `None` (logged as `-` or 0).
#[derive(Default)]
pub struct Line<'a> {
    pub way: WayIn,
    pub host: Option<&'a str>,
    /// A CONNECT's port.
    pub port: Option<u16>,
    /// The configured region that answered.
    pub region: Option<&'a str>,
    pub method: Option<&'a str>,
    /// The status answered (0: none, the connection was closed).
    pub status: u16,
    /// What a tunnel carried inside (`tls`, `http`), when sluice served it.
    pub inside: Option<&'a str>,
    pub attempts: u32,
    pub queued: Duration,
    pub elapsed: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The refusal or failure, when sluice answered instead of the upstream.
    pub error: Option<Code>,
    /// The error's name when it is no code of sluice's (why an interception's TLS failed:
    /// `untrusted_ca`, `sni_mismatch`, ...).
    pub error_name: Option<&'a str>,
    /// Why, in words (a refusal's message, what to do about it).
    pub reason: Option<&'a str>,
    /// The HTTP version spoken with the client, and with the upstream that answered (none
    /// when sluice answered itself), for a proxied request.
    pub protocol: Option<(&'static str, Option<&'static str>)>,
}

impl Line<'_> {
    /// Write the line, when the access log is on in `generation` (the one the request ran
    /// on).
    pub fn write(&self, generation: &Generation) {
        if !generation.config.server.access_log {
            return;
        }
        tracing::info!(
            target: "sluice::access",
            way = self.way.as_str(),
            host = self.host.unwrap_or("-"),
            port = self.port.unwrap_or(0),
            region = self.region.unwrap_or("-"),
            method = self.method.unwrap_or("-"),
            status = self.status,
            inside = self.inside.unwrap_or("-"),
            attempts = self.attempts,
            queued_ms = self.queued.as_millis() as u64,
            ms = self.elapsed.as_millis() as u64,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            error = self
                .error_name
                .or(self.error.map(Code::as_str))
                .unwrap_or("-"),
            reason = self.reason.unwrap_or("-"),
            protocol = self.protocol.map_or("-", |p| p.0),
            upstream_protocol = self.protocol.and_then(|p| p.1).unwrap_or("-"),
        );
    }

    /// Count the outcome under `host_label` (bounded: a `[hosts]` name or `other`), then
    /// write the line.
    pub fn finish(&self, shared: &Shared, generation: &Generation, host_label: &str) {
        shared
            .metrics
            .record(self.way, host_label, self.error, self.elapsed.as_secs_f64());
        if let Some((client, upstream)) = self.protocol {
            shared.metrics.record_protocols(client, upstream);
        }
        self.write(generation);
    }
}
