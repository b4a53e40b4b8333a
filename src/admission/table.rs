//! The table of hosts: a full cell per host that needs one (in a concurrent map with
//! lock-free reads), the compact table for the rest, promotion from one to the other,
//! clients' own pace cells, eviction of idle hosts, reloads, and what `/status` shows.

use super::{interval_of, Admission, Decision, HostCell};
use crate::generation::Generation;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Keys of client pace cells start with this (never a valid `host:port`).
const CLIENT_PREFIX: &str = "@client/";

pub(super) type Map = papaya::HashMap<Box<str>, Arc<HostCell>, foldhash::fast::RandomState>;

/// A destination host's admission state, as one request holds it.
#[derive(Clone)]
pub enum Host {
    /// A full cell.
    Cell(Arc<HostCell>),
    /// A host at the default pace in the compact table (`key` finds its full cell once it is
    /// promoted).
    Light { fp: u64, key: String },
}

impl Host {
    /// Index of the limits profile in force for the host.
    pub fn profile(&self) -> u16 {
        match self {
            Host::Cell(c) => c.profile(),
            Host::Light { .. } => 0,
        }
    }
}

impl Admission {
    /// Take the generation's defaults for hosts without a `[hosts]` entry (at start and on
    /// every reload).
    pub fn configure(&self, generation: &Generation) {
        let limits = generation.limits(0);
        self.light.set_pace(interval_of(limits.rps), limits.burst);
        self.light_on.store(
            self.fleet.is_none()
                && limits.max_concurrent == 0
                && limits.max_concurrent_per_caller == 0
                && !limits.has_token_budget(),
            Ordering::Relaxed,
        );
    }

    /// Does `host` have token budgets (configured or learned)? A host in the compact table
    /// has none.
    pub fn counts_tokens(&self, host: &Host) -> bool {
        match host {
            Host::Cell(c) => c.counts_tokens(),
            Host::Light { .. } => false,
        }
    }

    /// Hosts tracked now.
    pub fn len(&self) -> usize {
        self.cells.len() + self.light.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The admission state of `key` (`host:port`) for one request: compact for a host at the
    /// defaults, else its full cell (made from the generation's limits on first use).
    pub fn host(&self, key: String, host: &str, generation: &Generation) -> Host {
        let (profile, configured) = generation.profile_for(host, &key);
        if profile != 0 || configured || !self.light_on.load(Ordering::Relaxed) {
            return Host::Cell(self.cell(&key, host, generation));
        }
        let fp = self.light.fingerprint(&key);
        if self.light.promoted(fp) {
            if let Some(c) = self.cells.pin().get(key.as_str()) {
                return Host::Cell(c.clone());
            }
            // Its full cell was forgotten: back to the compact table.
            self.light.demote(fp);
        }
        Host::Light { fp, key }
    }

    /// The full cell of `key` (`host:port`), made from the generation's limits on first use.
    pub fn cell(&self, key: &str, host: &str, generation: &Generation) -> Arc<HostCell> {
        if let Some(c) = self.cells.pin().get(key) {
            return c.clone();
        }
        let (profile, configured) = generation.profile_for(host, key);
        self.make_cell(key, profile, configured, generation, 0)
    }

    /// The full cell of `key`, made (or found, if another thread made it) and then promoted
    /// out of the compact table, keeping its pace position. `paused_until` (0: none) is set on
    /// the cell before the promotion makes it visible, so no request slips through between
    /// the two.
    pub(super) fn make_cell(
        &self,
        key: &str,
        profile: u16,
        configured: bool,
        generation: &Generation,
        paused_until: u64,
    ) -> Arc<HostCell> {
        let limits = generation.limits(profile);
        let fresh = HostCell::new(
            limits.rps,
            limits.burst,
            limits.max_concurrent,
            profile,
            configured,
        );
        if limits.has_token_budget() {
            fresh
                .room()
                .tokens
                .configure(limits.token_budgets(), self.clock.now());
        }
        self.insert_cell(key, fresh, paused_until)
    }

    /// The full cell of a host in the compact table that became contended: requests now wait
    /// in its fair queue. It keeps the compact table's pace (the defaults) and position.
    pub(super) fn contended_cell(&self, key: &str) -> Arc<HostCell> {
        if let Some(c) = self.cells.pin().get(key) {
            return c.clone();
        }
        let (interval, burst) = self.light.pace();
        let fresh = HostCell::new(super::rps_of(interval), burst, 0, 0, false);
        self.insert_cell(key, fresh, 0)
    }

    fn insert_cell(&self, key: &str, fresh: HostCell, paused_until: u64) -> Arc<HostCell> {
        let fresh = Arc::new(fresh);
        // Paused and tracked by the fleet before any other request can find it: a request
        // that found it untracked would be paced by this node alone (its first one sent at
        // once, whatever the fleet's pace or pause).
        if paused_until > 0 {
            fresh.pause_until(paused_until);
        }
        if let Some(fleet) = &self.fleet {
            fleet.register(&fresh, key);
        }
        let cell = self
            .cells
            .pin()
            .get_or_insert(key.into(), fresh.clone())
            .clone();
        if !Arc::ptr_eq(&cell, &fresh) {
            // Another request made it first (and registered its own).
            if let Some(fleet) = &self.fleet {
                fleet.forget(&fresh);
            }
            if paused_until > 0 {
                cell.pause_until(paused_until);
            }
        }
        // Inserted (and paused) before the compact slot says "promoted", so whoever reads
        // that finds it as it must be.
        let promoted = self.light.promote(self.light.fingerprint(key));
        #[cfg(test)]
        if let Ok(mut seen) = self.on_promote.lock() {
            seen.push((self.light.fingerprint(key), cell.paused_until()));
        }
        if let Some(tat) = promoted {
            cell.raise_tat(tat);
        }
        cell
    }

    /// The full cell of a host, if it has one.
    pub(super) fn full(&self, host: &Host) -> Option<Arc<HostCell>> {
        match host {
            Host::Cell(c) => Some(c.clone()),
            Host::Light { fp, key } => {
                if self.light.holds(*fp) {
                    None
                } else {
                    self.cells.pin().get(key.as_str()).cloned()
                }
            }
        }
    }

    /// Until when the host is paused (ns on the admission clock; 0 or past: not paused).
    pub fn paused_until(&self, host: &Host) -> u64 {
        match host {
            Host::Cell(c) => c.paused_until(),
            Host::Light { .. } => self.full(host).map_or(0, |c| c.paused_until()),
        }
    }

    /// The pace cell of an authenticated client (its own limits, across all hosts).
    pub fn client_cell(&self, name: &str, rps: f64, burst: u32) -> Arc<HostCell> {
        let key = format!("{CLIENT_PREFIX}{name}");
        let map = self.cells.pin();
        if let Some(c) = map.get(key.as_str()) {
            return c.clone();
        }
        map.get_or_insert(key.into(), Arc::new(HostCell::new(rps, burst, 0, 0, true)))
            .clone()
    }

    /// The pacing decision alone, for a host at the defaults of the last [`Self::configure`]
    /// (the hot path measured by the benchmarks: a probe of the compact table and one
    /// compare-and-swap for a known host).
    pub fn decide(&self, key: &str, now: u64, max_wait: u64) -> Decision {
        let fp = self.light.fingerprint(key);
        match self.light.reserve(fp, now, max_wait) {
            Some(d) => d,
            None => match self.cells.pin().get(key) {
                Some(c) => c.reserve(now, max_wait),
                None => {
                    self.light.demote(fp);
                    self.decide(key, now, max_wait)
                }
            },
        }
    }

    /// Drop cells of hosts unused for `idle_for` that hold nothing (configured hosts stay).
    /// Returns how many were dropped.
    pub fn evict_idle(&self, idle_for: Duration) -> usize {
        let now = self.clock.now();
        let before = (now.saturating_sub(idle_for.as_nanos() as u64) / 1_000_000_000) as u32;
        let map = self.cells.pin();
        let start = map.len();
        map.retain(|key, c| {
            let keep = c.configured() || !c.idle(now, before);
            if !keep {
                if let Some(fleet) = &self.fleet {
                    fleet.forget(c);
                }
                // A promoted host's compact slot is forgotten with it.
                self.light.forget_promoted(self.light.fingerprint(key));
            }
            keep
        });
        let cells = start.saturating_sub(map.len());
        cells
            + self
                .light
                .forget_idle(now.saturating_sub(idle_for.as_nanos() as u64))
    }

    /// A new configuration is in force: point every tracked host at its new profile, and where
    /// the configured limits changed, apply them (replacing what was learned). Pace position,
    /// pauses and in-flight counts carry over.
    pub fn apply_generation(&self, old: &Generation, new: &Generation) {
        self.configure(new);
        let map = self.cells.pin();
        for (key, cell) in map.iter() {
            if key.starts_with(CLIENT_PREFIX) {
                // A client's own pace, not a host's: `[hosts]` does not apply to it.
                continue;
            }
            let host = host_of(key);
            let (profile, configured) = new.profile_for(host, key);
            let before = old.limits(cell.profile());
            let after = new.limits(profile);
            if before != after {
                cell.set_rps(after.rps);
                cell.set_burst(after.burst);
                cell.set_max_concurrent(after.max_concurrent);
                if before.has_token_budget() || after.has_token_budget() {
                    let now = self.clock.now();
                    cell.room().tokens.configure(after.token_budgets(), now);
                }
            }
            cell.set_profile(profile, configured);
        }
    }

    /// Up to `limit` hosts with a full cell (clients' own cells left out), those with the most
    /// going on first: paused, then by queue depth and requests in flight. For `/status`.
    pub fn notable(&self, limit: usize) -> Vec<(String, Arc<HostCell>)> {
        let now = self.clock.now();
        let mut all: Vec<(String, Arc<HostCell>)> = self
            .cells
            .pin()
            .iter()
            .filter(|(k, _)| !k.starts_with(CLIENT_PREFIX))
            .map(|(k, c)| (k.to_string(), c.clone()))
            .collect();
        all.sort_by_cached_key(|(k, c)| {
            (
                std::cmp::Reverse(c.paused_until() > now),
                std::cmp::Reverse(c.queued(now)),
                std::cmp::Reverse(c.in_flight()),
                k.clone(),
            )
        });
        all.truncate(limit);
        all
    }

    /// Hosts paused at `now` (a pause always gives a host a full cell).
    pub fn paused_count(&self, now: u64) -> usize {
        self.cells
            .pin()
            .iter()
            .filter(|(k, c)| !k.starts_with(CLIENT_PREFIX) && c.paused_until() > now)
            .count()
    }

    /// The waiting rooms of hosts that were ever contended.
    pub fn rooms(&self) -> Vec<Arc<super::room::Room>> {
        self.cells
            .pin()
            .iter()
            .filter_map(|(_, c)| c.room_if_any())
            .collect()
    }

    /// A snapshot of one host's cell, if tracked.
    pub fn get(&self, key: &str) -> Option<Arc<HostCell>> {
        self.cells.pin().get(key).cloned()
    }
}

/// The host part of a `host:port` key (IPv6 without brackets).
pub(super) fn host_of(key: &str) -> &str {
    let host = key.rsplit_once(':').map_or(key, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}
