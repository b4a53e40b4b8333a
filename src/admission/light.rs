//! Compact pace state for hosts that need nothing but the default pace: 16 bytes a slot (a
//! 64-bit fingerprint of `host:port` and the GCRA's theoretical arrival time) in one
//! open-addressed table, no allocation per host. Most destinations of a forward proxy are such
//! hosts, and millions of them must stay cheap.
//!
//! A host leaves this table for a full [`super::HostCell`] (it is *promoted*) as soon as it
//! needs more: a pause, a learned limit, a concurrency cap, a `[hosts]` entry, the fleet. Its
//! slot then says so, and its pace position moves with it.
//!
//! Every operation is a probe and a compare-and-swap; growing copies the table under a lock
//! while operations on slots already frozen for the copy wait for the new table (as a blocking
//! resize does in any concurrent map), which happens a logarithmic number of times.
//!
//! Two hosts with the same 64-bit fingerprint would share a pace (with a random seed, about
//! one chance in 10^7 among a million hosts).

use super::cell::{take_slot, Decision};
use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Key of a slot never used.
const EMPTY: u64 = 0;
/// Key of a slot whose host was forgotten (probes go on past it).
const GONE: u64 = 1;
/// Key of an unused slot frozen while the table is copied.
const FROZEN: u64 = 2;
/// Smallest fingerprint (the ones below are the markers above).
const FIRST_FP: u64 = 3;

/// Word of a host promoted to a full cell.
const PROMOTED: u64 = u64::MAX;
/// Word of a slot frozen while the table is copied.
const MOVED: u64 = u64::MAX - 1;
/// Word of a forgotten host.
const DEAD: u64 = u64::MAX - 2;
/// Largest arrival time (the words above are markers).
const MAX_TAT: u64 = u64::MAX - 16;

const MIN_CAPACITY: usize = 64;

struct Slot {
    key: AtomicU64,
    word: AtomicU64,
}

struct Table {
    slots: Box<[Slot]>,
    mask: usize,
    /// Which table of its `Light` this is (each copy is the next).
    version: u64,
}

/// Distinguishes `Light`s in the per-thread handle below.
static LIGHT_IDS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's handle on the current table of the `Light` it used last: checking it is
    /// current is a plain load of the version, with no write to memory other threads read
    /// (taking a shared handle for each decision would cost two atomic writes).
    static CURRENT: RefCell<Option<(u64, Arc<Table>)>> = const { RefCell::new(None) };
}

impl Table {
    fn new(capacity: usize, version: u64) -> Table {
        let capacity = capacity.next_power_of_two().max(MIN_CAPACITY);
        Table {
            slots: (0..capacity)
                .map(|_| Slot {
                    key: AtomicU64::new(EMPTY),
                    word: AtomicU64::new(0),
                })
                .collect(),
            mask: capacity - 1,
            version,
        }
    }
}

/// Where a host stands in the table.
enum Found<'a> {
    /// Its live slot.
    Slot(&'a Slot),
    /// Promoted: its state is a full cell.
    Promoted(&'a Slot),
    /// Not in the table.
    Absent,
    /// The table is being copied: try again on the new one.
    Moving,
}

pub struct Light {
    id: u64,
    table: ArcSwap<Table>,
    /// The current table's version (stored after the table).
    version: AtomicU64,
    /// Held while the table is copied or swept.
    grow: Mutex<()>,
    hasher: foldhash::fast::RandomState,
    /// Live and promoted slots, and slots of forgotten hosts (which still lengthen probes).
    used: AtomicUsize,
    live: AtomicUsize,
    /// The default pace: nanoseconds between requests (0 = no pacing) and burst.
    interval: AtomicU64,
    burst: AtomicU32,
}

impl Light {
    pub fn new() -> Light {
        Light {
            id: LIGHT_IDS.fetch_add(1, Ordering::Relaxed),
            table: ArcSwap::from_pointee(Table::new(MIN_CAPACITY, 0)),
            version: AtomicU64::new(0),
            grow: Mutex::new(()),
            hasher: foldhash::fast::RandomState::default(),
            used: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            interval: AtomicU64::new(0),
            burst: AtomicU32::new(1),
        }
    }

    /// The pace every host here follows (the defaults; set again on reload).
    pub fn set_pace(&self, interval: u64, burst: u32) {
        self.interval.store(interval, Ordering::Relaxed);
        self.burst.store(burst.max(1), Ordering::Relaxed);
    }

    /// The pace every host here follows: nanoseconds between requests, and burst.
    pub fn pace(&self) -> (u64, u32) {
        (
            self.interval.load(Ordering::Relaxed),
            self.burst.load(Ordering::Relaxed),
        )
    }

    /// How late after its slot a request here may still be sent without the send guard of a
    /// full cell: half the burst's window. Sends are then at most that much closer than the
    /// pace; a later one moves the host to a full cell (`Admission::before_send`).
    #[inline]
    pub fn late_after(&self) -> u64 {
        let interval = self.interval.load(Ordering::Relaxed);
        interval.saturating_mul(u64::from(self.burst.load(Ordering::Relaxed))) / 2
    }

    #[inline]
    pub fn fingerprint(&self, key: &str) -> u64 {
        self.hasher.hash_one(key).max(FIRST_FP)
    }

    /// Hosts with live pace state here (promoted ones are counted with the full cells).
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    #[inline(always)]
    fn find<'t>(table: &'t Table, fp: u64) -> Found<'t> {
        let mut i = fp as usize & table.mask;
        for _ in 0..=table.mask {
            let slot = &table.slots[i];
            match slot.key.load(Ordering::Acquire) {
                EMPTY => return Found::Absent,
                FROZEN => return Found::Moving,
                k if k == fp => match slot.word.load(Ordering::Acquire) {
                    DEAD => {}
                    MOVED => return Found::Moving,
                    PROMOTED => return Found::Promoted(slot),
                    _ => return Found::Slot(slot),
                },
                _ => {}
            }
            i = (i + 1) & table.mask;
        }
        Found::Absent
    }

    /// Claim the first unused slot on `fp`'s probe path (or find it there, inserted by a
    /// racing request). `None`: the table is full or being copied. An unused slot's word is
    /// always 0 (a fresh arrival time): only claimed slots' words ever change.
    fn claim<'t>(&self, table: &'t Table, fp: u64) -> Option<&'t Slot> {
        let mut i = fp as usize & table.mask;
        for _ in 0..=table.mask {
            let slot = &table.slots[i];
            let key = match slot.key.load(Ordering::Acquire) {
                EMPTY => {
                    match slot
                        .key
                        .compare_exchange(EMPTY, fp, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => {
                            self.used.fetch_add(1, Ordering::Relaxed);
                            self.live.fetch_add(1, Ordering::Relaxed);
                            return Some(slot);
                        }
                        Err(k) => k,
                    }
                }
                k => k,
            };
            match key {
                FROZEN => return None,
                k if k == fp => match slot.word.load(Ordering::Acquire) {
                    DEAD => {}
                    MOVED => return None,
                    _ => return Some(slot),
                },
                _ => {}
            }
            i = (i + 1) & table.mask;
        }
        None
    }

    /// Run `f` on the current table (or one just replaced: operations on it find its slots
    /// frozen and come back).
    #[inline(always)]
    fn with_table<R>(&self, mut f: impl FnMut(&Arc<Table>) -> R) -> R {
        let version = self.version.load(Ordering::Acquire);
        let cached = CURRENT.try_with(|current| {
            let mut current = current.try_borrow_mut().ok()?;
            if !matches!(&*current, Some((id, t)) if *id == self.id && t.version == version) {
                *current = Some((self.id, self.table.load_full()));
            }
            current.as_ref().map(|(_, table)| f(table))
        });
        match cached {
            Ok(Some(r)) => r,
            // No thread-local handle (the thread is ending): a shared one.
            _ => f(&self.table.load_full()),
        }
    }

    /// The host's slot, made on first use; `None` when it was promoted to a full cell.
    fn with_slot<R>(
        &self,
        fp: u64,
        insert: bool,
        mut f: impl FnMut(&Slot) -> Step<R>,
    ) -> Lookup<R> {
        loop {
            let outcome = self.with_table(|table| {
                let (slot, claimed) = match Self::find(table, fp) {
                    Found::Slot(s) => (s, false),
                    Found::Promoted(_) => return Outcome::Promoted,
                    Found::Absent if !insert => return Outcome::Absent,
                    Found::Absent => match self.claim(table, fp) {
                        Some(s) => (s, true),
                        None => return Outcome::Wait(table.clone()),
                    },
                    Found::Moving => return Outcome::Wait(table.clone()),
                };
                match f(slot) {
                    Step::Done(r) if claimed && self.crowded(table) => {
                        Outcome::Grow(r, table.clone())
                    }
                    Step::Done(r) => Outcome::Done(r),
                    Step::Again => Outcome::Again,
                }
            });
            match outcome {
                Outcome::Done(r) => return Lookup::Done(r),
                Outcome::Grow(r, table) => {
                    if let Ok(_held) = self.grow.try_lock() {
                        if Arc::ptr_eq(&self.table.load(), &table) {
                            self.copy(&table);
                        }
                    }
                    return Lookup::Done(r);
                }
                Outcome::Promoted => return Lookup::Promoted,
                Outcome::Absent => return Lookup::Absent,
                Outcome::Wait(table) => self.wait_or_grow(&table),
                Outcome::Again => {}
            }
        }
    }

    /// Reserve a slot at the default pace for `fp` at `now`, waiting at most `max_wait` ns
    /// (`None`: the host was promoted; use its full cell).
    // Inlined into the caller, whose decision then stays in registers (a returned decision
    // read back from memory stalled each call by a few nanoseconds).
    #[inline(always)]
    pub fn reserve(&self, fp: u64, now: u64, max_wait: u64) -> Option<Decision> {
        let interval = self.interval.load(Ordering::Relaxed);
        let burst = u64::from(self.burst.load(Ordering::Relaxed));
        let pace = Pace {
            now,
            max_wait,
            interval,
            window: interval.saturating_mul(burst),
        };
        // The common case, kept small enough to inline: a known host in the current table.
        // The answer crosses the thread-local access as two words, which come back in
        // registers (a decision returned through memory and read back whole stalled).
        let (kind, ns) = self.with_table(|table| match Self::find(table, fp) {
            Found::Slot(slot) => match pace.take(slot) {
                Some(Decision::Now) => (1, 0),
                Some(Decision::At { at, .. }) => (2, at),
                Some(Decision::Refuse { retry_after }) => (3, retry_after),
                None => (0, 0),
            },
            _ => (0, 0),
        });
        match kind {
            1 => Some(Decision::Now),
            2 => Some(Decision::At { at: ns, epoch: 0 }),
            3 => Some(Decision::Refuse { retry_after: ns }),
            _ => self.reserve_slow(fp, pace),
        }
    }

    /// A host new to the table, promoted, or met while the table is copied.
    #[inline(never)]
    fn reserve_slow(&self, fp: u64, pace: Pace) -> Option<Decision> {
        let found = self.with_slot(fp, true, |slot| match pace.take(slot) {
            Some(d) => Step::Done(d),
            // Promoted, forgotten or frozen meanwhile: look again.
            None => Step::Again,
        });
        match found {
            Lookup::Done(d) => Some(d),
            Lookup::Promoted | Lookup::Absent => None,
        }
    }

    /// Whether `fp` was promoted to a full cell.
    pub fn promoted(&self, fp: u64) -> bool {
        matches!(
            self.with_slot(fp, false, |_| Step::Done(())),
            Lookup::Promoted
        )
    }

    /// Whether `fp` still has its pace here (not promoted, not forgotten).
    pub fn holds(&self, fp: u64) -> bool {
        matches!(
            self.with_slot(fp, false, |_| Step::Done(())),
            Lookup::Done(())
        )
    }

    /// Promote `fp`: its slot says so from now on; returns its arrival time, if it had one.
    pub fn promote(&self, fp: u64) -> Option<u64> {
        let found = self.with_slot(fp, false, |slot| {
            let tat = slot.word.load(Ordering::Acquire);
            if tat > MAX_TAT {
                return Step::Again;
            }
            match slot
                .word
                .compare_exchange(tat, PROMOTED, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => Step::Done(tat),
                Err(_) => Step::Again,
            }
        });
        match found {
            Lookup::Done(tat) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                Some(tat)
            }
            Lookup::Promoted | Lookup::Absent => None,
        }
    }

    /// A promoted host whose full cell was forgotten gets a fresh slot here again.
    pub fn demote(&self, fp: u64) {
        loop {
            let table = self.table.load();
            match Self::find(&table, fp) {
                Found::Promoted(slot) => {
                    if slot
                        .word
                        .compare_exchange(PROMOTED, 0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.live.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Found::Moving => self.wait_or_grow(&table),
                Found::Slot(_) | Found::Absent => return,
            }
        }
    }

    /// Forget a promoted host's slot (its full cell was forgotten).
    pub fn forget_promoted(&self, fp: u64) {
        let table = self.table.load();
        if let Found::Promoted(slot) = Self::find(&table, fp) {
            if slot
                .word
                .compare_exchange(PROMOTED, DEAD, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.key.store(GONE, Ordering::Release);
            }
        }
    }

    /// Forget hosts whose arrival time is before `before` (ns): nothing reserved ahead, unused
    /// since. Returns how many were forgotten.
    pub fn forget_idle(&self, before: u64) -> usize {
        let _held = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let table = self.table.load();
        let mut forgotten = 0;
        for slot in table.slots.iter() {
            let key = slot.key.load(Ordering::Acquire);
            if key < FIRST_FP {
                continue;
            }
            let tat = slot.word.load(Ordering::Acquire);
            if tat < before
                && slot
                    .word
                    .compare_exchange(tat, DEAD, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                slot.key.store(GONE, Ordering::Release);
                forgotten += 1;
            }
        }
        self.live.fetch_sub(forgotten, Ordering::Relaxed);
        // Forgotten slots still lengthen probes until the table is copied: copy it when they
        // are a quarter of it.
        let gone = table
            .slots
            .iter()
            .filter(|s| s.key.load(Ordering::Relaxed) == GONE)
            .count();
        if gone * 4 > table.slots.len() {
            self.copy(&table);
        }
        forgotten
    }

    /// Three quarters of the table's slots are used: time to copy it into a larger one.
    fn crowded(&self, table: &Table) -> bool {
        self.used.load(Ordering::Relaxed) * 4 > table.slots.len() * 3
    }

    /// The table is full or being copied: wait for the copy, or make one.
    fn wait_or_grow(&self, table: &Arc<Table>) {
        let _held = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&self.table.load(), table) {
            self.copy(table);
        }
    }

    /// Copy live and promoted slots into a table sized for them (lock held): every old slot is
    /// frozen first, so no reservation made meanwhile is lost.
    fn copy(&self, old: &Table) {
        let mut kept = Vec::with_capacity(self.used.load(Ordering::Relaxed));
        for slot in old.slots.iter() {
            let mut key = slot.key.load(Ordering::Acquire);
            if key == EMPTY {
                match slot
                    .key
                    .compare_exchange(EMPTY, FROZEN, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => continue,
                    Err(k) => key = k,
                }
            }
            if key < FIRST_FP {
                continue;
            }
            let word = slot.word.swap(MOVED, Ordering::AcqRel);
            if word != DEAD && word != MOVED {
                kept.push((key, word));
            }
        }
        let fresh = Table::new((kept.len() * 2).max(MIN_CAPACITY), old.version + 1);
        for &(key, word) in &kept {
            let mut i = key as usize & fresh.mask;
            while fresh.slots[i].key.load(Ordering::Relaxed) != EMPTY {
                i = (i + 1) & fresh.mask;
            }
            fresh.slots[i].word.store(word, Ordering::Relaxed);
            fresh.slots[i].key.store(key, Ordering::Relaxed);
        }
        self.used.store(kept.len(), Ordering::Relaxed);
        let version = fresh.version;
        self.table.store(Arc::new(fresh));
        self.version.store(version, Ordering::Release);
    }
}

impl Default for Light {
    fn default() -> Self {
        Light::new()
    }
}

/// One reservation's terms at the default pace.
#[derive(Clone, Copy)]
struct Pace {
    now: u64,
    max_wait: u64,
    interval: u64,
    window: u64,
}

impl Pace {
    /// The GCRA on a slot's word; `None` when the word is a marker (promoted, forgotten,
    /// frozen), not an arrival time.
    #[inline(always)]
    fn take(self, slot: &Slot) -> Option<Decision> {
        let Pace {
            now,
            max_wait,
            interval,
            window,
        } = self;
        if interval == 0 {
            // No pacing: the word only records the last use (for forgetting idle hosts),
            // written at most once a second.
            let mut last = slot.word.load(Ordering::Acquire);
            loop {
                if last > MAX_TAT {
                    return None;
                }
                if now.saturating_sub(last) < 1_000_000_000 {
                    return Some(Decision::Now);
                }
                match slot.word.compare_exchange_weak(
                    last,
                    now,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some(Decision::Now),
                    Err(t) => last = t,
                }
            }
        }
        take_slot(&slot.word, now, max_wait, interval, window, MAX_TAT).map(|slot| match slot {
            Ok(at) if at > now => Decision::At { at, epoch: 0 },
            Ok(_) => Decision::Now,
            Err(retry_after) => Decision::Refuse { retry_after },
        })
    }
}

enum Step<R> {
    Done(R),
    Again,
}

enum Outcome<R> {
    Done(R),
    /// Done, and the table needs copying into a larger one.
    Grow(R, Arc<Table>),
    Promoted,
    Absent,
    Wait(Arc<Table>),
    Again,
}

enum Lookup<R> {
    Done(R),
    Promoted,
    Absent,
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn paces_at_the_default_and_refuses_beyond_the_wait() {
        let l = Light::new();
        l.set_pace(S / 2, 2);
        let fp = l.fingerprint("a.test:443");
        let now = 10 * S;
        assert_eq!(l.reserve(fp, now, 0), Some(Decision::Now));
        assert_eq!(l.reserve(fp, now, 0), Some(Decision::Now));
        assert_eq!(
            l.reserve(fp, now, 0),
            Some(Decision::Refuse { retry_after: S / 2 })
        );
        assert_eq!(
            l.reserve(fp, now, S),
            Some(Decision::At {
                at: now + S / 2,
                epoch: 0
            })
        );
        // Another host is not behind this one.
        assert_eq!(
            l.reserve(l.fingerprint("b.test:443"), now, 0),
            Some(Decision::Now)
        );
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn promotion_hands_over_the_pace_position_and_demotion_starts_afresh() {
        let l = Light::new();
        l.set_pace(S, 1);
        let fp = l.fingerprint("a.test:443");
        assert_eq!(l.reserve(fp, 5 * S, 0), Some(Decision::Now));
        assert_eq!(l.promote(fp), Some(6 * S));
        assert_eq!(
            l.reserve(fp, 5 * S, 0),
            None,
            "promoted: the full cell decides"
        );
        assert!(!l.holds(fp));
        assert_eq!(l.promote(fp), None);
        assert_eq!(l.len(), 0);
        l.demote(fp);
        assert!(l.holds(fp));
        assert_eq!(l.reserve(fp, 5 * S, 0), Some(Decision::Now));
    }

    #[test]
    fn grows_keeps_every_host_and_forgets_idle_ones() {
        let l = Light::new();
        l.set_pace(S, 1);
        let n = 10_000u64;
        for i in 0..n {
            let fp = l.fingerprint(&format!("h{i}.test:443"));
            // Host i was last used at i seconds.
            assert_eq!(l.reserve(fp, i * S, 0), Some(Decision::Now), "host {i}");
        }
        assert_eq!(l.len(), n as usize);
        let table = l.table.load();
        assert!(table.slots.len() >= n as usize * 4 / 3);
        assert!(table.slots.len() <= n as usize * 4);
        for i in 0..n {
            let fp = l.fingerprint(&format!("h{i}.test:443"));
            // Every host still has its pace: its next slot is a second after its last.
            assert_eq!(
                l.reserve(fp, i * S, 0),
                Some(Decision::Refuse { retry_after: S }),
                "host {i}"
            );
        }
        // Hosts whose next slot was before 5000 s are idle.
        assert_eq!(l.forget_idle(5_000 * S), 4_999);
        assert_eq!(l.len(), n as usize - 4_999);
        assert!(!l.holds(l.fingerprint("h10.test:443")));
        assert!(l.holds(l.fingerprint("h9000.test:443")));
        // A forgotten host comes back fresh.
        let fp = l.fingerprint("h10.test:443");
        assert_eq!(l.reserve(fp, 10 * S, 0), Some(Decision::Now));
    }

    #[test]
    fn two_tables_used_by_one_thread_keep_apart() {
        let (a, b) = (Light::new(), Light::new());
        a.set_pace(S, 1);
        b.set_pace(S, 1);
        for i in 0..200u64 {
            // Alternating, and growing both, so each thread handle is replaced every time.
            let key = format!("h{i}.test:443");
            assert_eq!(a.reserve(a.fingerprint(&key), 0, 0), Some(Decision::Now));
            assert_eq!(b.reserve(b.fingerprint(&key), 0, 0), Some(Decision::Now));
        }
        let fp = a.fingerprint("h7.test:443");
        assert_eq!(
            a.reserve(fp, 0, 0),
            Some(Decision::Refuse { retry_after: S })
        );
        assert_eq!(a.promote(fp), Some(S), "a refusal takes no slot");
        assert!(b.holds(b.fingerprint("h7.test:443")));
        assert_eq!((a.len(), b.len()), (199, 200));
    }

    #[test]
    fn racing_threads_lose_no_reservation_while_the_table_grows() {
        let l = Arc::new(Light::new());
        // One slot every nanosecond, no burst: every reservation moves the arrival time by
        // exactly one, so the total tells whether any was lost.
        l.set_pace(1, 1);
        let hot = l.fingerprint("hot.test:443");
        let per_thread = 20_000u64;
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let l = l.clone();
                s.spawn(move || {
                    for i in 0..per_thread {
                        // New hosts force copies of the table while the hot one is used.
                        l.reserve(l.fingerprint(&format!("t{t}-{i}.test:443")), 0, u64::MAX);
                        l.reserve(hot, 0, u64::MAX);
                    }
                });
            }
        });
        assert_eq!(l.len(), 2 * per_thread as usize + 1);
        assert_eq!(l.promote(hot), Some(2 * per_thread));
    }
}
