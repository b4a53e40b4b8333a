//! One destination host's admission state: a GCRA cell (theoretical arrival time), a pause,
//! and an in-flight count. Pure and lock-free: every method takes `now` (nanoseconds on the
//! admission clock) and works by atomics, so it is tested without sockets or sleeps.
//!
//! A request *reserves* its slot by advancing the TAT with a compare-and-swap, then waits until
//! the slot's time; reservations are thus served in the order they were made (FIFO per host).
//! A pause moves the TAT past its end and bumps `epoch`: reservations made before it are void,
//! and their holders reserve again after the pause, so traffic resumes at the pace.

use super::room::Room;
use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// What the cell says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go now.
    Now,
    /// A slot is reserved at `at` (ns); go then if `epoch` has not changed meanwhile.
    At { at: u64, epoch: u32 },
    /// No slot within the allowed wait; the earliest one is `retry_after` ns away.
    Refuse { retry_after: u64 },
}

/// Where a pause came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseSource {
    RetryAfter,
    Backoff,
    RateLimitHeaders,
}

impl PauseSource {
    pub const ALL: [PauseSource; 3] = [
        PauseSource::RetryAfter,
        PauseSource::Backoff,
        PauseSource::RateLimitHeaders,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PauseSource::RetryAfter => "retry_after",
            PauseSource::Backoff => "backoff",
            PauseSource::RateLimitHeaders => "ratelimit_headers",
        }
    }
}

/// Who paused a host last, as `/status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PauseOrigin {
    RetryAfter = 1,
    Backoff = 2,
    RateLimitHeaders = 3,
    /// Another node of the fleet (an event, or the store's answer).
    Fleet = 4,
}

impl PauseOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseOrigin::RetryAfter => "retry_after",
            PauseOrigin::Backoff => "backoff",
            PauseOrigin::RateLimitHeaders => "ratelimit_headers",
            PauseOrigin::Fleet => "fleet",
        }
    }

    fn from_u8(v: u8) -> Option<PauseOrigin> {
        Some(match v {
            1 => PauseOrigin::RetryAfter,
            2 => PauseOrigin::Backoff,
            3 => PauseOrigin::RateLimitHeaders,
            4 => PauseOrigin::Fleet,
            _ => return None,
        })
    }
}

impl From<PauseSource> for PauseOrigin {
    fn from(s: PauseSource) -> PauseOrigin {
        match s {
            PauseSource::RetryAfter => PauseOrigin::RetryAfter,
            PauseSource::Backoff => PauseOrigin::Backoff,
            PauseSource::RateLimitHeaders => PauseOrigin::RateLimitHeaders,
        }
    }
}

/// First backoff pause after a 429 without `Retry-After`, doubled each time, capped.
pub const BACKOFF_BASE_NS: u64 = 1_000_000_000;
pub const BACKOFF_CAP_NS: u64 = 60_000_000_000;

/// One GCRA reservation on an arrival-time word (full cells and the compact table share it):
/// `Ok(slot time)`, at or before `now` to go at once, or `Err(retry_after)` when the slot lies
/// more than `max_wait` ahead (nothing is taken then). `None` when the word holds a value above
/// `max_tat`: not a time but a marker of the compact table.
#[inline(always)]
pub(super) fn take_slot(
    word: &AtomicU64,
    now: u64,
    max_wait: u64,
    interval: u64,
    window: u64,
    max_tat: u64,
) -> Option<Result<u64, u64>> {
    let mut tat = word.load(Ordering::Acquire);
    loop {
        if tat > max_tat {
            return None;
        }
        let new_tat = tat.max(now).saturating_add(interval).min(max_tat);
        let at = new_tat.saturating_sub(window);
        if at > now && at - now > max_wait {
            return Some(Err(at - now));
        }
        match word.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(Ok(at)),
            Err(current) => tat = current,
        }
    }
}

#[derive(Debug, Default)]
pub struct HostCell {
    /// Theoretical arrival time of the next request (ns).
    tat: AtomicU64,
    /// The host is paused until this time (ns); 0 = not paused.
    paused_until: AtomicU64,
    /// Nanoseconds between requests; 0 = no pacing.
    interval: AtomicU64,
    /// Theoretical time of the next send (ns): the send guard of [`Self::send_slot`].
    sent: AtomicU64,
    /// Bumped by every pause: reservations of older epochs must be made again.
    epoch: AtomicU32,
    burst: AtomicU32,
    /// Requests in flight at once; 0 = unlimited.
    max_concurrent: AtomicU32,
    in_flight: AtomicU32,
    /// Seconds on the admission clock when the cell was last used (for eviction).
    last_used: AtomicU32,
    /// Consecutive 429s without `Retry-After`.
    backoff: AtomicU8,
    /// The `PauseOrigin` of the pause that set `paused_until` (0: never paused).
    pause_origin: AtomicU8,
    /// Index of the configured limits profile in force (changes on reload), and
    /// `CONFIGURED`: named in `[hosts]`, never evicted. One word, so that the cell fits in a
    /// cache line.
    profile: AtomicU16,
    /// Where requests wait when the host is contended (its fair queue, and the gate of its
    /// in-flight places); made on first need.
    room: ArcSwapOption<Room>,
}

/// Bit of a cell's profile word: the host is named in `[hosts]`.
pub(super) const CONFIGURED: u16 = 1 << 15;

fn profile_word(profile: u16, configured: bool) -> u16 {
    (profile & !CONFIGURED) | if configured { CONFIGURED } else { 0 }
}

/// `rps` as nanoseconds per request (0 when pacing is off).
pub fn interval_of(rps: f64) -> u64 {
    if rps > 0.0 && rps.is_finite() {
        (1e9 / rps).round().max(1.0) as u64
    } else {
        0
    }
}

/// The pace of an interval (ns per request) in requests/s, to six significant digits.
pub fn rps_of(interval: u64) -> f64 {
    match interval {
        0 => 0.0,
        i => {
            let rps = 1e9 / i as f64;
            let scale = 10f64.powi(5 - rps.log10().floor() as i32);
            (rps * scale).round() / scale
        }
    }
}

impl HostCell {
    pub fn new(rps: f64, burst: u32, max_concurrent: u32, profile: u16, configured: bool) -> Self {
        HostCell {
            interval: AtomicU64::new(interval_of(rps)),
            burst: AtomicU32::new(burst.max(1)),
            max_concurrent: AtomicU32::new(max_concurrent),
            profile: AtomicU16::new(profile_word(profile, configured)),
            ..HostCell::default()
        }
    }

    pub fn profile(&self) -> u16 {
        self.profile.load(Ordering::Relaxed) & !CONFIGURED
    }

    pub fn configured(&self) -> bool {
        self.profile.load(Ordering::Relaxed) & CONFIGURED != 0
    }

    /// Point the cell at a new configuration's profile (on reload).
    pub fn set_profile(&self, profile: u16, configured: bool) {
        self.profile
            .store(profile_word(profile, configured), Ordering::Relaxed);
    }

    /// Mark the cell used at `now` (for eviction).
    #[inline]
    pub fn touch(&self, now: u64) {
        let secs = (now / 1_000_000_000) as u32;
        if self.last_used.load(Ordering::Relaxed) != secs {
            self.last_used.store(secs, Ordering::Relaxed);
        }
    }

    /// Reserve a slot for one request arriving at `now`, waiting at most `max_wait` ns.
    pub fn reserve(&self, now: u64, max_wait: u64) -> Decision {
        self.touch(now);
        let epoch = self.epoch.load(Ordering::Acquire);
        let interval = self.interval.load(Ordering::Relaxed);
        if interval == 0 {
            let paused = self.paused_until.load(Ordering::Acquire);
            return if paused <= now {
                Decision::Now
            } else if paused - now > max_wait {
                Decision::Refuse {
                    retry_after: paused - now,
                }
            } else {
                Decision::At { at: paused, epoch }
            };
        }
        let window = interval.saturating_mul(u64::from(self.burst.load(Ordering::Relaxed)));
        // No arrival time exceeds `u64::MAX`, so the slot is always `Some`.
        match take_slot(&self.tat, now, max_wait, interval, window, u64::MAX) {
            Some(Ok(at)) if at > now => Decision::At { at, epoch },
            Some(Err(retry_after)) => Decision::Refuse { retry_after },
            _ => Decision::Now,
        }
    }

    /// Take over a pace position (a host moving here from the compact table): the arrival
    /// time only moves forward.
    pub fn raise_tat(&self, tat: u64) {
        self.tat.fetch_max(tat, Ordering::AcqRel);
    }

    /// The pause epoch now: a request admitted in it stands until the next pause.
    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// When a request admitted earlier may be sent (at or after `now`), its place among the
    /// host's sends taken. Sends follow the pace too: a request that reached the send late
    /// (its task starved of CPU, its connection slow to open) is not followed at once by
    /// the next one, whose slot came after its own. Never refuses: the wait is at most what
    /// the lateness of the sends before it added, and it resets once the host is idle.
    pub fn send_slot(&self, now: u64) -> u64 {
        let interval = self.interval.load(Ordering::Relaxed);
        if interval == 0 {
            return now;
        }
        let window = interval.saturating_mul(u64::from(self.burst.load(Ordering::Relaxed)));
        match take_slot(&self.sent, now, u64::MAX, interval, window, u64::MAX) {
            Some(Ok(at)) => at.max(now),
            _ => now,
        }
    }

    /// Whether a reservation made in `epoch` still stands.
    pub fn still_valid(&self, epoch: u32) -> bool {
        self.epoch.load(Ordering::Acquire) == epoch
    }

    /// Pause the host until `until` (ns). Never shortens a longer pause. Returns whether the
    /// pause was extended. Reservations made before are void; after the pause, the first
    /// request goes at `until` and the rest follow at the pace (no burst).
    pub fn pause_until(&self, until: u64) -> bool {
        let mut current = self.paused_until.load(Ordering::Acquire);
        loop {
            if current >= until {
                return false;
            }
            match self.paused_until.compare_exchange_weak(
                current,
                until,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(c) => current = c,
            }
        }
        let interval = self.interval.load(Ordering::Relaxed);
        let burst = u64::from(self.burst.load(Ordering::Relaxed));
        // The first reservation after this lands exactly at `until`.
        let tat = until.saturating_add(interval.saturating_mul(burst.saturating_sub(1)));
        // Reservations made before are void (the epoch bump below), so their slots are freed.
        self.tat.store(tat, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// `pause_until`, remembering who asked for the pause when it was extended. The fleet's
    /// answer often echoes this node's own pause a few milliseconds later: that keeps the
    /// pause's first origin; only a fleet pause that starts one, or extends it by over a
    /// second, is the fleet's.
    pub fn pause_until_by(&self, until: u64, origin: PauseOrigin) -> bool {
        let before = self.paused_until();
        let extended = self.pause_until(until);
        let echo = origin == PauseOrigin::Fleet && until.saturating_sub(before) <= 1_000_000_000;
        if extended && !echo {
            self.pause_origin.store(origin as u8, Ordering::Relaxed);
        }
        extended
    }

    /// Who asked for the latest pause (`None` if the host was never paused).
    pub fn pause_origin(&self) -> Option<PauseOrigin> {
        PauseOrigin::from_u8(self.pause_origin.load(Ordering::Relaxed))
    }

    /// A 429 without `Retry-After`: pause for 1 s, doubling per consecutive 429, capped at 60 s.
    /// Returns the pause length in ns.
    pub fn backoff(&self, now: u64) -> u64 {
        let level = self.backoff.fetch_add(1, Ordering::AcqRel).min(16);
        let pause = (BACKOFF_BASE_NS << level).min(BACKOFF_CAP_NS);
        self.pause_until_by(now.saturating_add(pause), PauseOrigin::Backoff);
        pause
    }

    /// A successful response resets the backoff.
    pub fn succeeded(&self) {
        if self.backoff.load(Ordering::Relaxed) != 0 {
            self.backoff.store(0, Ordering::Relaxed);
        }
    }

    pub fn paused_until(&self) -> u64 {
        self.paused_until.load(Ordering::Acquire)
    }

    /// Set the pace (from configuration or a learned limit).
    pub fn set_rps(&self, rps: f64) {
        self.interval.store(interval_of(rps), Ordering::Relaxed);
    }

    /// The pace in requests/s, to six significant digits (the interval is whole
    /// nanoseconds, so 2 rps reads 2, and the slowest learned pace, one an hour, 0.000277778).
    pub fn rps(&self) -> f64 {
        rps_of(self.interval.load(Ordering::Relaxed))
    }

    pub fn burst(&self) -> u32 {
        self.burst.load(Ordering::Relaxed)
    }

    pub fn set_burst(&self, burst: u32) {
        self.burst.store(burst.max(1), Ordering::Relaxed);
    }

    pub fn set_max_concurrent(&self, n: u32) {
        self.max_concurrent.store(n, Ordering::Relaxed);
    }

    pub fn max_concurrent(&self) -> u32 {
        self.max_concurrent.load(Ordering::Relaxed)
    }

    /// Take an in-flight place if the concurrency limit allows.
    pub fn try_enter(&self) -> bool {
        let mut cur = self.in_flight.load(Ordering::Acquire);
        loop {
            let limit = self.max_concurrent.load(Ordering::Relaxed);
            if limit != 0 && cur >= limit {
                return false;
            }
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    pub fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(room) = self.room.load().as_ref() {
            room.gate.notify_one();
        }
    }

    /// The host's waiting room (its fair queue and the gate of its in-flight places).
    pub fn room(&self) -> Arc<Room> {
        if let Some(r) = self.room.load_full() {
            return r;
        }
        let fresh = Arc::new(Room::default());
        let prev = self
            .room
            .compare_and_swap(&None::<Arc<Room>>, Some(fresh.clone()));
        match prev.as_ref() {
            Some(existing) => existing.clone(),
            None => fresh,
        }
    }

    /// The waiting room, if the host was ever contended.
    pub fn room_if_any(&self) -> Option<Arc<Room>> {
        self.room.load_full()
    }

    /// The host's token budgets now (none when it has none).
    pub fn token_views(&self, now: u64) -> Vec<super::TokenView> {
        match self.room.load().as_ref() {
            Some(r) if r.tokens.active() => r.tokens.views(now),
            _ => Vec::new(),
        }
    }

    /// The upstream's request budget as it last told it: limit, remaining, time to reset.
    pub fn upstream_requests(
        &self,
        now: u64,
    ) -> Option<(Option<u64>, Option<u64>, Option<std::time::Duration>)> {
        self.room
            .load()
            .as_ref()
            .and_then(|r| r.tokens.requests(now))
    }

    /// Does the host have token budgets (configured or learned)?
    pub fn counts_tokens(&self) -> bool {
        self.room.load().as_ref().is_some_and(|r| r.tokens.active())
    }

    /// The time of the next free slot at the pace (at least `now`; a pause's end while
    /// paused), without taking it.
    pub fn next_slot(&self, now: u64) -> u64 {
        let interval = self.interval.load(Ordering::Relaxed);
        let paused = self.paused_until.load(Ordering::Acquire);
        if interval == 0 {
            return paused.max(now);
        }
        let window = interval.saturating_mul(u64::from(self.burst.load(Ordering::Relaxed)));
        let tat = self.tat.load(Ordering::Acquire);
        tat.max(now)
            .saturating_add(interval)
            .saturating_sub(window)
            .max(now)
    }

    /// Nanoseconds between requests at the pace now (0: not paced).
    pub fn interval(&self) -> u64 {
        self.interval.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Requests waiting for a slot at `now`: those in the waiting room, or those holding a
    /// reserved slot later than `now` (an estimate from the TAT), whichever is more. While
    /// paused, the TAT starts at the pause's end (`pause_until`), so only the reservations
    /// past it count, not the pause itself.
    pub fn queued(&self, now: u64) -> u64 {
        let waiting = self.room.load().as_ref().map_or(0, |r| r.len() as u64);
        let interval = self.interval.load(Ordering::Relaxed);
        let tat = self.tat.load(Ordering::Acquire);
        let paused_until = self.paused_until();
        let burst = u64::from(self.burst());
        let reserved = if interval == 0 || tat <= now {
            0
        } else if paused_until > now {
            (tat.saturating_sub(paused_until) / interval).saturating_sub(burst - 1)
        } else {
            ((tat - now) / interval).saturating_sub(burst)
        };
        reserved.max(waiting)
    }

    /// Idle: nothing in flight, nothing reserved or paused ahead, unused since `before_secs`.
    pub fn idle(&self, now: u64, before_secs: u32) -> bool {
        self.in_flight() == 0
            && self.room.load().as_ref().is_none_or(|r| r.is_empty())
            && self.tat.load(Ordering::Acquire) <= now
            && self.paused_until() <= now
            && self.last_used.load(Ordering::Relaxed) < before_secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn slots(cell: &HostCell, now: u64, n: usize) -> Vec<Decision> {
        (0..n).map(|_| cell.reserve(now, 30 * S)).collect()
    }

    #[test]
    fn burst_then_pace() {
        let cell = HostCell::new(2.0, 2, 0, 0, false);
        let d = slots(&cell, 10 * S, 4);
        assert_eq!(d[0], Decision::Now);
        assert_eq!(d[1], Decision::Now);
        assert_eq!(
            d[2],
            Decision::At {
                at: 10 * S + 500 * MS,
                epoch: 0
            }
        );
        assert_eq!(
            d[3],
            Decision::At {
                at: 11 * S,
                epoch: 0
            }
        );
        // After a long idle spell the burst is available again, not more.
        let d = slots(&cell, 100 * S, 3);
        assert_eq!(&d[..2], &[Decision::Now, Decision::Now]);
        assert!(matches!(d[2], Decision::At { .. }));
    }

    #[test]
    fn refuses_without_reserving_beyond_the_allowed_wait() {
        let cell = HostCell::new(1.0, 1, 0, 0, false);
        assert_eq!(cell.reserve(S, 0), Decision::Now);
        assert_eq!(
            cell.reserve(S, 500 * MS),
            Decision::Refuse { retry_after: S }
        );
        // The refusal took nothing: the next slot is still one interval away.
        assert_eq!(
            cell.reserve(S, 2 * S),
            Decision::At {
                at: 2 * S,
                epoch: 0
            }
        );
    }

    #[test]
    fn pause_voids_reservations_and_resumes_at_the_pace() {
        let cell = HostCell::new(20.0, 1, 0, 0, false);
        let now = 5 * S;
        assert_eq!(cell.reserve(now, 30 * S), Decision::Now);
        let held: Vec<_> = slots(&cell, now, 10);
        assert!(held
            .iter()
            .all(|d| matches!(d, Decision::At { epoch: 0, .. })));
        assert!(cell.pause_until(now + 2 * S));
        assert!(!cell.still_valid(0));
        // Re-reserving after the pause: first at the pause end, then every 50 ms.
        let again = slots(&cell, now + 10 * MS, 3);
        assert_eq!(
            again[0],
            Decision::At {
                at: now + 2 * S,
                epoch: 1
            }
        );
        assert_eq!(
            again[1],
            Decision::At {
                at: now + 2 * S + 50 * MS,
                epoch: 1
            }
        );
        assert_eq!(
            again[2],
            Decision::At {
                at: now + 2 * S + 100 * MS,
                epoch: 1
            }
        );
        // A shorter pause does not shorten it.
        assert!(!cell.pause_until(now + S));
        assert_eq!(cell.paused_until(), now + 2 * S);
    }

    #[test]
    fn pause_with_burst_still_resumes_one_at_a_time() {
        let cell = HostCell::new(10.0, 5, 0, 0, false);
        cell.pause_until(S);
        let d = slots(&cell, 0, 3);
        assert_eq!(d[0], Decision::At { at: S, epoch: 1 });
        assert_eq!(
            d[1],
            Decision::At {
                at: S + 100 * MS,
                epoch: 1
            }
        );
    }

    #[test]
    fn unpaced_hosts_still_obey_pauses() {
        let cell = HostCell::new(0.0, 1, 0, 0, false);
        assert_eq!(cell.reserve(S, 0), Decision::Now);
        cell.pause_until(3 * S);
        assert_eq!(
            cell.reserve(S, 5 * S),
            Decision::At {
                at: 3 * S,
                epoch: 1
            }
        );
        assert_eq!(cell.reserve(S, S), Decision::Refuse { retry_after: 2 * S });
        assert_eq!(cell.reserve(3 * S, 0), Decision::Now);
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let cell = HostCell::new(1.0, 1, 0, 0, false);
        assert_eq!(cell.backoff(0), S);
        assert_eq!(cell.backoff(0), 2 * S);
        assert_eq!(cell.backoff(0), 4 * S);
        for _ in 0..10 {
            cell.backoff(0);
        }
        assert_eq!(cell.backoff(0), 60 * S);
        cell.succeeded();
        assert_eq!(cell.backoff(100 * S), S);
    }

    #[test]
    fn concurrency_limit() {
        let cell = HostCell::new(0.0, 1, 2, 0, false);
        assert!(cell.try_enter());
        assert!(cell.try_enter());
        assert!(!cell.try_enter());
        cell.leave();
        assert!(cell.try_enter());
        cell.set_max_concurrent(0);
        assert!(cell.try_enter());
        assert_eq!(cell.in_flight(), 3);
    }

    #[test]
    fn reservations_from_many_threads_are_distinct_slots() {
        let cell = std::sync::Arc::new(HostCell::new(1000.0, 1, 0, 0, false));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let cell = cell.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .map(|_| match cell.reserve(0, u64::MAX) {
                            Decision::Now => 0,
                            Decision::At { at, .. } => at,
                            Decision::Refuse { .. } => u64::MAX,
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect();
        all.sort_unstable();
        let expected: Vec<u64> = (0..4000u64).map(|i| i * MS).collect();
        assert_eq!(
            all, expected,
            "every slot handed out exactly once, 1 ms apart"
        );
    }

    #[test]
    fn a_pause_keeps_its_origin_through_the_fleet_echo() {
        let cell = HostCell::new(10.0, 1, 0, 0, false);
        assert_eq!(cell.pause_origin(), None);
        assert!(cell.pause_until_by(30 * S, PauseOrigin::RetryAfter));
        // The store hands the same pause back, a few milliseconds later.
        assert!(cell.pause_until_by(30 * S + 5 * MS, PauseOrigin::Fleet));
        assert_eq!(cell.pause_origin(), Some(PauseOrigin::RetryAfter));
        // Another node's longer pause is the fleet's.
        assert!(cell.pause_until_by(90 * S, PauseOrigin::Fleet));
        assert_eq!(cell.pause_origin(), Some(PauseOrigin::Fleet));
        // A pause that does not extend changes nothing.
        assert!(!cell.pause_until_by(10 * S, PauseOrigin::Backoff));
        assert_eq!(cell.pause_origin(), Some(PauseOrigin::Fleet));
    }

    #[test]
    fn queue_estimate_and_idleness() {
        let cell = HostCell::new(10.0, 1, 0, 0, false);
        for _ in 0..5 {
            cell.reserve(0, 30 * S);
        }
        assert_eq!(cell.queued(0), 4);
        assert!(!cell.idle(0, 100));
        // A pause is not a queue: only the reservations waiting for its end count.
        let paused = HostCell::new(10.0, 3, 0, 0, false);
        paused.pause_until(30 * S);
        assert_eq!(paused.queued(0), 0);
        paused.reserve(0, 60 * S);
        paused.reserve(0, 60 * S);
        assert_eq!(paused.queued(0), 2);
        assert!(cell.idle(10 * S, 100));
        assert!(
            std::mem::size_of::<HostCell>() <= 64,
            "{}",
            std::mem::size_of::<HostCell>()
        );
    }
}
