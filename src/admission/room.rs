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

use super::fair::Fair;
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
}

#[derive(Default)]
pub struct Room {
    /// Wakes requests waiting for an in-flight place at the host.
    pub(super) gate: Notify,
    /// Wakes the dispatcher: a request started waiting, or a caller's place came free.
    wake: Notify,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: Fair<Waiter>,
    dispatching: bool,
    /// Requests in flight by caller, of those admitted under a per-caller cap.
    in_flight: HashMap<Arc<str>, u32>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    latest: u64,
    cap: u32,
    tx: oneshot::Sender<Result<Handed, Rejection>>,
}

/// A slot handed to a waiting request: its time and pause epoch, and its caller's place.
pub struct Handed {
    pub slot: u64,
    pub epoch: u32,
    pub place: Option<CallerPlace>,
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
            release(&mut st, &self.caller);
            let waits = st.queue.has(&self.caller);
            drop(st);
            if waits {
                room.wake.notify_one();
            }
        }
    }
}

fn release(st: &mut State, caller: &Arc<str>) {
    if let Some(n) = st.in_flight.get_mut(caller) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            st.in_flight.remove(caller);
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
            let ahead = st.queue.ahead(&key, w.weight, w.class) as u64;
            let next = cell.next_slot(now);
            // While the dispatcher waits for a slot it holds the next one: it goes to the
            // first in the fair order.
            let next = if st.dispatching {
                next.saturating_sub(cell.interval()).max(now)
            } else {
                next
            };
            let estimate = next.saturating_add(ahead.saturating_mul(cell.interval()));
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
            let waiter = Waiter {
                id,
                latest: w.latest,
                cap: w.cap,
                tx,
            };
            st.queue.push(&key, w.weight, w.class, waiter);
            if !st.dispatching {
                st.dispatching = true;
                let (room, cell, clock, fleet) =
                    (self.clone(), cell.clone(), clock.clone(), fleet.clone());
                tokio::spawn(async move { room.dispatch(&cell, &clock, fleet.as_deref()).await });
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
        };
        let left = Duration::from_nanos(w.latest.saturating_sub(now));
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(handed)) => handed,
            // The dispatcher ended without an answer (the runtime is shutting down).
            Ok(Err(_)) => Err(Rejection::Pace {
                retry_after: Duration::from_secs(1),
            }),
            Err(_) => {
                let queued = self.lock().queue.len() as u64;
                let retry_after =
                    Duration::from_nanos(queued.max(1).saturating_mul(cell.interval().max(1)));
                Err(if w.latest < w.latest_by_wait {
                    Rejection::Deadline { retry_after }
                } else {
                    Rejection::Pace { retry_after }
                })
            }
        }
    }

    /// Hand the host's slots to waiting requests until none waits.
    async fn dispatch(
        self: &Arc<Self>,
        cell: &Arc<HostCell>,
        clock: &Clock,
        fleet: Option<&dyn FleetSeam>,
    ) {
        loop {
            // The slot to take: before the latest any eligible request may use.
            let (latest, demand) = {
                let mut st = self.lock();
                if st.queue.is_empty() {
                    st.dispatching = false;
                    return;
                }
                let now = clock.now();
                let mut latest = 0;
                let mut demand = 0u32;
                for (caller, w) in st.queue.iter() {
                    if w.latest >= now && eligible(&st.in_flight, caller, w) {
                        latest = latest.max(w.latest);
                        demand = demand.saturating_add(1);
                    }
                }
                (latest, demand)
            };
            if demand == 0 {
                // Every waiting caller is at its cap (or every request is about to time
                // out): wait for a place to come free or a new request.
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let got = match fleet {
                Some(f) => f.pace(cell, latest, demand).await,
                None => super::pace_cell(cell, clock, latest).await,
            };
            let now = clock.now();
            let mut st = self.lock();
            let State {
                queue, in_flight, ..
            } = &mut *st;
            match got {
                Err(r) => {
                    // No slot before `latest`: every request that cannot wait past the
                    // earliest one is refused.
                    let until = now.saturating_add(r.retry_after().as_nanos() as u64);
                    for w in queue.drain_where(|w| w.latest < until) {
                        let _ = w.tx.send(Err(r));
                    }
                }
                Ok(()) => {
                    let epoch = cell.epoch();
                    // The slot goes to the first in fair order still waiting.
                    while let Some((caller, w)) =
                        queue.pop(|caller, w| w.latest >= now && eligible(in_flight, caller, w))
                    {
                        let place = (w.cap > 0).then(|| {
                            *in_flight.entry(caller.clone()).or_insert(0) += 1;
                            CallerPlace {
                                room: Some(self.clone()),
                                caller: caller.clone(),
                            }
                        });
                        let handed = Handed {
                            slot: now,
                            epoch,
                            place,
                        };
                        match w.tx.send(Ok(handed)) {
                            Ok(()) => break,
                            // It stopped waiting: its place is given back here (the lock is
                            // held, so not by the place's own drop).
                            Err(Ok(mut h)) => {
                                if let Some(mut p) = h.place.take() {
                                    p.room = None;
                                    if let Some(n) = in_flight.get_mut(&p.caller) {
                                        *n = n.saturating_sub(1);
                                        if *n == 0 {
                                            in_flight.remove(&p.caller);
                                        }
                                    }
                                }
                            }
                            Err(Err(_)) => {}
                        }
                    }
                }
            }
        }
    }
}

fn eligible(in_flight: &HashMap<Arc<str>, u32>, caller: &Arc<str>, w: &Waiter) -> bool {
    w.cap == 0 || in_flight.get(caller).copied().unwrap_or(0) < w.cap
}

fn key_of(st: &State, caller: &Arc<str>, max: usize) -> Arc<str> {
    if st.in_flight.contains_key(caller) || st.queue.has(caller) {
        return caller.clone();
    }
    let mut known: HashSet<&str> = st.in_flight.keys().map(|k| &**k).collect();
    let by_caller = st.queue.by_caller();
    known.extend(by_caller.iter().map(|(c, _)| &**c));
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
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let id = self.id;
        let removed = self
            .room
            .lock()
            .queue
            .remove(self.caller, self.class, |w| w.id == id);
        if removed {
            // The dispatcher may be waiting for this request to become eligible or go.
            self.room.wake.notify_one();
        }
    }
}
