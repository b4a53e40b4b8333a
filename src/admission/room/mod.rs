//! A contended host's waiting room. A request that cannot go at once (no free slot at the
//! pace, or its caller at its in-flight cap) waits here, and one dispatcher task per
//! contended host takes the host's slots one at a time (from the local pace, or from the
//! fleet) and hands each, when it comes, to the request the fair order (`fair.rs`) picks.
//! Picking at the slot's time, not at arrival, is what lets a caller that arrives late go
//! before another caller's backlog.
//!
//! A request is refused at once, before it waits, when its estimated slot (the next free slot
//! plus one interval per request the fair order serves before it) lies past what it may wait
//! for: its queue wait, or the time that leaves its answer room before its deadline.
//!
//! The dispatcher, which takes the slots (and a request's tokens) and hands them, is
//! `dispatch.rs`.

mod dispatch;

use super::charge::Charge;
use super::fair::Fair;
use super::tokens::{Cost, Tokens};
use super::{Clock, FleetSeam, HostCell, Rejection};
use crate::config::Priority;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// The caller every request shares when callers are not told apart, and the one callers
/// beyond a host's `max_per_host` share.
pub const OTHER: &str = "other";

/// What one request asks of a waiting room.
pub struct Wait<'a> {
    pub caller: &'a Arc<str>,
    pub weight: u32,
    pub class: Priority,
    /// Its caller's in-flight cap at this host (0: none).
    pub cap: u32,
    /// Callers tracked apart at this host.
    pub max_callers: usize,
    /// The latest slot it may take (ns on the admission clock), the deadline rule applied,
    /// and the latest its queue wait alone allows (never earlier).
    pub latest: u64,
    pub latest_by_wait: u64,
    /// Its estimated tokens, charged to the host's token budgets when it is handed a slot.
    pub cost: Cost,
}

#[derive(Default)]
pub struct Room {
    /// Wakes requests waiting for an in-flight place at the host.
    pub(super) gate: Notify,
    /// Wakes the dispatcher: a request started waiting, or a caller's place came free.
    wake: Notify,
    state: Mutex<State>,
    /// The host's token budgets (none until configured or learned).
    pub tokens: Tokens,
}

#[derive(Default)]
struct State {
    queue: Fair<Waiter>,
    dispatching: bool,
    /// The latest slot any waiting request may take (reset when the queue empties), and how
    /// many waiting requests have a per-caller cap.
    latest: u64,
    capped: usize,
    /// The local pace's slots the dispatcher holds, in order, not yet handed.
    held: std::collections::VecDeque<u64>,
    /// Requests in flight by caller, of those admitted under a per-caller cap.
    in_flight: HashMap<Arc<str>, u32>,
    next_id: u64,
    /// The estimated tokens of every waiting request.
    cost: Cost,
    /// The tokens charged for the request `hand` gave its last slot to.
    handed: Option<Cost>,
}

struct Waiter {
    id: u64,
    latest: u64,
    cap: u32,
    cost: Cost,
    tx: oneshot::Sender<Result<Handed, Rejection>>,
}

/// A slot handed to a waiting request: its time and pause epoch, its caller's place, and the
/// tokens charged for it.
pub struct Handed {
    pub slot: u64,
    pub epoch: u32,
    pub place: Option<CallerPlace>,
    pub charge: Option<Box<Charge>>,
}

/// A caller's in-flight place at a host under a per-caller cap; given back when dropped.
pub struct CallerPlace {
    room: Option<Arc<Room>>,
    caller: Arc<str>,
}

impl Drop for CallerPlace {
    fn drop(&mut self) {
        if let Some(room) = self.room.take() {
            let mut st = room.lock();
            release(&mut st.in_flight, &self.caller);
            let waits = st.queue.has(&self.caller);
            drop(st);
            if waits {
                room.wake.notify_one();
            }
        }
    }
}

fn release(in_flight: &mut HashMap<Arc<str>, u32>, caller: &Arc<str>) {
    if let Some(n) = in_flight.get_mut(caller) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            in_flight.remove(caller);
        }
    }
}

/// One caller's line at a host, as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerLine {
    pub caller: Arc<str>,
    pub waiting: usize,
    pub in_flight: u32,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").finish_non_exhaustive()
    }
}

impl Room {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held; a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests waiting here.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// No request waits here.
    pub fn none_waiting(&self) -> bool {
        self.lock().queue.is_empty()
    }

    /// Wake the dispatcher (tokens came back: the first in line may go sooner).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Nothing waits here and no caller holds a place.
    pub fn is_empty(&self) -> bool {
        let st = self.lock();
        st.queue.is_empty() && st.in_flight.is_empty()
    }

    /// The caller a request is counted as here: its own name while the host tracks fewer
    /// than `max` callers (or already tracks it), else `other`.
    pub fn caller_key(&self, caller: &Arc<str>, max: usize) -> Arc<str> {
        let st = self.lock();
        key_of(&st, caller, max)
    }

    /// Take a place for `caller` under `cap` at once, if it has one free and none of its
    /// requests waits (order within a caller stays first come, first served).
    pub fn try_place(self: &Arc<Self>, caller: &Arc<str>, cap: u32) -> Option<CallerPlace> {
        let mut st = self.lock();
        let n = st.in_flight.get(caller).copied().unwrap_or(0);
        if n >= cap || st.queue.has(caller) {
            return None;
        }
        *st.in_flight.entry(caller.clone()).or_insert(0) += 1;
        Some(CallerPlace {
            room: Some(self.clone()),
            caller: caller.clone(),
        })
    }

    /// Each caller's waiting requests and places, busiest first.
    pub fn lines(&self) -> Vec<CallerLine> {
        let st = self.lock();
        let mut lines: Vec<CallerLine> = st
            .queue
            .by_caller()
            .into_iter()
            .map(|(caller, waiting)| CallerLine {
                in_flight: st.in_flight.get(&caller).copied().unwrap_or(0),
                caller,
                waiting,
            })
            .collect();
        for (caller, n) in &st.in_flight {
            if !lines.iter().any(|l| l.caller == *caller) {
                lines.push(CallerLine {
                    caller: caller.clone(),
                    waiting: 0,
                    in_flight: *n,
                });
            }
        }
        lines.sort_by(|a, b| {
            (b.waiting, b.in_flight, &a.caller).cmp(&(a.waiting, a.in_flight, &b.caller))
        });
        lines
    }

    /// Wait here for a slot of `cell`, handed in fair order. Refused at once when the
    /// estimated slot lies past `w.latest`.
    pub async fn wait(
        self: &Arc<Self>,
        cell: &Arc<HostCell>,
        clock: &Arc<Clock>,
        fleet: &Option<Arc<dyn FleetSeam>>,
        w: Wait<'_>,
    ) -> Result<Handed, Rejection> {
        let now = clock.now();
        let (tx, rx) = oneshot::channel();
        let (key, id) = {
            let mut st = self.lock();
            let key = key_of(&st, w.caller, w.max_callers);
            let ahead = {
                let State {
                    queue, in_flight, ..
                } = &*st;
                // A capped caller's requests beyond its free places wait for a place, not
                // for slots (the cap is the host's, the same for every caller).
                let room = |c: &str| match w.cap {
                    0 => usize::MAX,
                    cap => cap.saturating_sub(in_flight.get(c).copied().unwrap_or(0)) as usize,
                };
                queue.ahead(&key, w.weight, w.class, room) as u64
            };
            // The slots the dispatcher holds go to the first in fair order; then the pace's.
            let held = st.held.len() as u64;
            // In a fleet, this node's share of the pace when it holds one.
            let (next, interval) = fleet
                .as_ref()
                .and_then(|f| f.own_pace(cell, now))
                .unwrap_or_else(|| (cell.next_slot(now), cell.interval()));
            let mut estimate = match st.held.get(ahead as usize) {
                Some(at) => (*at).max(now),
                None => next.saturating_add((ahead - held).saturating_mul(interval)),
            };
            // And its tokens, after those of the requests before it (their share of what the
            // waiting requests are estimated to use).
            if !w.cost.is_zero() && self.tokens.active() {
                let before = st.cost.share(ahead, st.queue.len() as u64);
                estimate = estimate.max(self.tokens.ready_at(before + w.cost, now));
            }
            if estimate > w.latest {
                let retry_after = Duration::from_nanos(estimate - now);
                // The deadline rule's refusal only when the wait alone would have allowed it.
                return Err(if estimate <= w.latest_by_wait {
                    Rejection::Deadline { retry_after }
                } else if cell.paused_until() > now {
                    Rejection::Paused { retry_after }
                } else {
                    Rejection::Pace { retry_after }
                });
            }
            st.next_id += 1;
            let id = st.next_id;
            st.latest = st.latest.max(w.latest);
            if w.cap > 0 {
                st.capped += 1;
            }
            let waiter = Waiter {
                id,
                latest: w.latest,
                cap: w.cap,
                cost: w.cost,
                tx,
            };
            st.cost = st.cost + w.cost;
            st.queue.push(&key, w.weight, w.class, waiter);
            if !st.dispatching {
                st.dispatching = true;
                let (room, cell, clock, fleet) =
                    (self.clone(), cell.clone(), clock.clone(), fleet.clone());
                tokio::spawn(async move { room.dispatch(&cell, &clock, fleet.as_ref()).await });
            } else {
                self.wake.notify_one();
            }
            (key, id)
        };
        // Leaves the queue if this request stops waiting (answered, timed out or dropped).
        let _leave = Leave {
            room: self,
            caller: &key,
            class: w.class,
            id,
            capped: w.cap > 0,
            cost: w.cost,
        };
        // A slot timed within `latest` may be handed a little after it (a late timer, a busy
        // runtime): the request waits that much longer for it.
        let left = Duration::from_nanos(w.latest.saturating_sub(now)) + HAND_GRACE;
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(handed)) => handed,
            // The dispatcher ended without an answer (it failed, or the runtime is shutting
            // down).
            Ok(Err(_)) => Err(Rejection::Pace {
                retry_after: Duration::from_secs(1),
            }),
            Err(_) => {
                let st = self.lock();
                let at_cap = w.cap > 0 && st.in_flight.get(&key).copied().unwrap_or(0) >= w.cap;
                let queued = st.queue.len() as u64;
                drop(st);
                let retry_after =
                    Duration::from_nanos(queued.max(1).saturating_mul(cell.interval().max(1)));
                Err(if at_cap {
                    Rejection::Concurrency { retry_after }
                } else if w.latest < w.latest_by_wait {
                    Rejection::Deadline { retry_after }
                } else {
                    Rejection::Pace { retry_after }
                })
            }
        }
    }
}

/// How long past its latest slot a waiting request still waits for a slot timed within it
/// that the dispatcher hands late.
const HAND_GRACE: Duration = Duration::from_millis(20);

fn eligible(in_flight: &HashMap<Arc<str>, u32>, caller: &Arc<str>, w: &Waiter) -> bool {
    w.cap == 0 || in_flight.get(caller).copied().unwrap_or(0) < w.cap
}

fn key_of(st: &State, caller: &Arc<str>, max: usize) -> Arc<str> {
    if st.in_flight.contains_key(caller) || st.queue.has(caller) {
        return caller.clone();
    }
    let mut known: HashSet<&str> = st.in_flight.keys().map(|k| &**k).collect();
    known.extend(st.queue.callers());
    if known.len() >= max {
        Arc::from(OTHER)
    } else {
        caller.clone()
    }
}

/// Takes a request out of the queue when it stops waiting before it was handed a slot.
struct Leave<'a> {
    room: &'a Room,
    caller: &'a Arc<str>,
    class: Priority,
    id: u64,
    capped: bool,
    cost: Cost,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let id = self.id;
        let mut st = self.room.lock();
        let removed = st.queue.remove(self.caller, self.class, |w| w.id == id);
        if removed {
            st.cost = st.cost - self.cost;
        }
        if removed && self.capped {
            st.capped = st.capped.saturating_sub(1);
        }
        drop(st);
        if removed {
            // The dispatcher may be waiting for this request to become eligible or go.
            self.room.wake.notify_one();
        }
    }
}
