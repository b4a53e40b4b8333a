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

use super::charge::Charge;
use super::fair::Fair;
use super::tokens::{Cost, Tokens};
use super::{Clock, Decision, FleetSeam, FleetTokens, HostCell, Rejection};
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

/// Whose budgets a handed request's tokens are charged to: the host's, and the fleet's when
/// the dispatcher took them there.
struct ChargeTo<'a> {
    cell: &'a Arc<HostCell>,
    clock: &'a Arc<Clock>,
    fleet: Option<&'a Arc<dyn FleetSeam>>,
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
            let mut estimate = match st.held.get(ahead as usize) {
                Some(at) => (*at).max(now),
                None => cell
                    .next_slot(now)
                    .saturating_add((ahead - held).saturating_mul(cell.interval())),
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

    /// The latest slot any waiting request may use, and how many may use one now: every
    /// waiting request while none is capped, else those whose caller has a free place.
    fn demand(st: &State, now: u64) -> (u64, u32) {
        if st.capped == 0 {
            let n = u32::try_from(st.queue.len()).unwrap_or(u32::MAX);
            return (st.latest, n);
        }
        let mut latest = 0;
        let mut demand = 0u32;
        for (caller, w) in st.queue.iter() {
            if w.latest >= now && eligible(&st.in_flight, caller, w) {
                latest = latest.max(w.latest);
                demand = demand.saturating_add(1);
            }
        }
        (latest, demand)
    }

    /// Hand the host's slots to waiting requests until none waits.
    async fn dispatch(
        self: &Arc<Self>,
        cell: &Arc<HostCell>,
        clock: &Arc<Clock>,
        fleet: Option<&Arc<dyn FleetSeam>>,
    ) {
        // Should this task end any other way than with an empty queue (a panic), the host
        // is not left without a dispatcher: its waiters are answered, the next starts one.
        let mut guard = Dispatching {
            room: self,
            done: false,
        };
        loop {
            let (latest, mut demand) = {
                let mut st = self.lock();
                if st.queue.is_empty() {
                    st.dispatching = false;
                    st.latest = 0;
                    guard.done = true;
                    return;
                }
                Self::demand(&st, clock.now())
            };
            if demand == 0 {
                // Every waiting caller is at its cap (or every request is about to time
                // out): wait for a place to come free or a request to come or go.
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            // Tokens taken from the fleet's count for the first in line.
            let mut pending = None;
            if self.tokens.active() {
                // The first in fair order waits for its tokens before a slot is taken for it,
                // and slots are taken one at a time.
                match self.tokens_for_first(clock) {
                    TokensFor::Ready(first) => {
                        demand = 1;
                        if let (Some(f), Some((cost, latest))) = (fleet, first) {
                            // Reserved in the fleet's count if not there yet: requests that
                            // ask later, on any node, wait behind it.
                            let now = clock.now();
                            let bound = Duration::from_nanos(latest.saturating_sub(now));
                            // A reservation is at most a minute ahead (a budget is in debt
                            // by at most a minute's worth).
                            let within = bound.min(RESERVE_AHEAD_MAX);
                            let limits = self.tokens.limits(cost.model);
                            match f.take_tokens(cell, limits, cost, Some(within)).await {
                                Some(FleetTokens::Taken) => pending = Some(cost),
                                Some(FleetTokens::Reserved(wait)) => {
                                    pending = Some(cost);
                                    tokio::time::sleep(wait).await;
                                }
                                Some(FleetTokens::NotWithin(wait)) if wait <= bound => {
                                    // Within its bound but more than a minute ahead: ask
                                    // again when it is a minute ahead.
                                    let later = wait.saturating_sub(RESERVE_AHEAD_MAX);
                                    tokio::time::sleep(later.max(Duration::from_millis(100))).await;
                                    continue;
                                }
                                Some(FleetTokens::NotWithin(wait)) => {
                                    let retry_after = wait;
                                    let by = now.saturating_add(super::nanos(wait));
                                    self.lock().refuse(Rejection::Pace { retry_after }, by - 1);
                                    continue;
                                }
                                // The store is away: this node's count holds.
                                None => {}
                            }
                        }
                    }
                    TokensFor::At(at) => {
                        let left = at.saturating_sub(clock.now());
                        tokio::select! {
                            _ = self.wake.notified() => {}
                            _ = tokio::time::sleep(Duration::from_nanos(left)) => {}
                        }
                        continue;
                    }
                    TokensFor::Refused => continue,
                }
            }
            let got = match fleet {
                Some(f) => f.pace(cell, latest, demand).await.map(|()| cell.epoch()),
                None => {
                    // Slots due close together are taken together (`BATCH_SPAN_NS`).
                    match self.local_slots(cell, clock, latest, demand).await {
                        Ok(()) => continue,
                        Err(r) => Err(r),
                    }
                }
            };
            let now = clock.now();
            let mut st = self.lock();
            st.handed = None;
            match got {
                Err(r) => st.refuse(r, latest),
                Ok(epoch) => {
                    // The slot, and every further one in hand (leased tokens), go to the
                    // first in fair order still waiting.
                    let mut first = true;
                    let to = ChargeTo {
                        cell,
                        clock,
                        fleet: fleet.filter(|_| pending.is_some()),
                    };
                    let fleet = fleet.map(|f| &**f);
                    while first || (!self.tokens.active() && slot_now(cell, fleet, now)) {
                        first = false;
                        if !st.hand(self, now, now, epoch, &to) {
                            break;
                        }
                    }
                }
            }
            // The fleet counts what the request that took the slot was charged here (another
            // may have come first meanwhile; or nobody took it).
            if let (Some(f), Some(taken)) = (fleet, pending) {
                let handed = st.handed.take().unwrap_or_default();
                if handed != taken {
                    let change = super::TokenChange::settle(taken, handed);
                    f.tokens_changed(cell, self.tokens.limits(taken.model), change);
                }
            }
        }
    }

    /// Take up to `demand` slots of the local pace due within `BATCH_SPAN_NS` of the first,
    /// before `latest`, and hand each to the first in fair order when its time comes. A
    /// refusal when not even the first slot comes before `latest`.
    async fn local_slots(
        self: &Arc<Self>,
        cell: &Arc<HostCell>,
        clock: &Arc<Clock>,
        latest: u64,
        demand: u32,
    ) -> Result<(), Rejection> {
        let now = clock.now();
        let epoch = cell.epoch();
        let mut slots: Vec<u64> = Vec::new();
        while slots.len() < demand as usize {
            let bound = match slots.first() {
                Some(first) => latest.min(first.saturating_add(BATCH_SPAN_NS)),
                None => latest,
            };
            match cell.reserve(now, bound.saturating_sub(now)) {
                Decision::Now => slots.push(now),
                Decision::At { at, .. } => slots.push(at),
                Decision::Refuse { retry_after } if slots.is_empty() => {
                    let retry_after = Duration::from_nanos(retry_after);
                    return Err(if cell.paused_until() > now {
                        Rejection::Paused { retry_after }
                    } else {
                        Rejection::Pace { retry_after }
                    });
                }
                Decision::Refuse { .. } => break,
            }
        }
        self.lock().held.extend(slots.iter().copied());
        // Whatever ends this (a pause, nobody left, the task dropped), the slots are no longer
        // held.
        let _release = Unhold(self);
        for at in slots {
            let now = clock.now();
            if at > now {
                tokio::time::sleep(Duration::from_nanos(at - now)).await;
            }
            if !cell.still_valid(epoch) {
                // Paused meanwhile: the slots taken before are void.
                return Ok(());
            }
            let now = clock.now();
            let mut st = self.lock();
            st.held.pop_front();
            let to = ChargeTo {
                cell,
                clock,
                fleet: None,
            };
            if !st.hand(self, at, now, epoch, &to) {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Whether the first request in fair order has its tokens.
enum TokensFor {
    /// It has them (its estimate and latest slot, if it needs any).
    Ready(Option<(Cost, u64)>),
    /// Not before this time.
    At(u64),
    /// Not within its wait: it (and every request that cannot wait as long) was refused.
    Refused,
}

impl Room {
    fn tokens_for_first(&self, clock: &Clock) -> TokensFor {
        let now = clock.now();
        let mut st = self.lock();
        let first = {
            let State {
                queue, in_flight, ..
            } = &*st;
            queue
                .peek(|c, w| w.latest >= now && eligible(in_flight, c, w))
                .map(|w| (w.cost, w.latest))
        };
        let Some((cost, latest)) = first else {
            return TokensFor::Ready(None);
        };
        // A budget lowered since it came (a reload, a learned limit) can make it too large
        // ever to go, and others like it.
        if let Some((budget, limit)) = self.tokens.too_large(cost) {
            let r = Rejection::OverBudget {
                budget,
                limit,
                estimate: cost.of(budget),
            };
            st.refuse_if(|w| self.tokens.too_large(w.cost).is_some(), r);
            return TokensFor::Refused;
        }
        let at = self.tokens.ready_at(cost, now);
        if at <= now {
            TokensFor::Ready((!cost.is_zero()).then_some((cost, latest)))
        } else if at <= latest {
            TokensFor::At(at)
        } else {
            // The requests behind it come after it: none that cannot wait past `at` gets
            // its tokens in time.
            let retry_after = Duration::from_nanos(at - now);
            st.refuse(Rejection::Pace { retry_after }, at - 1);
            TokensFor::Refused
        }
    }
}

/// Furthest ahead a request's tokens are reserved in the fleet's count.
const RESERVE_AHEAD_MAX: Duration = Duration::from_secs(60);

/// How long past its latest slot a waiting request still waits for a slot timed within it
/// that the dispatcher hands late.
const HAND_GRACE: Duration = Duration::from_millis(20);

/// Slots due within this span of the first are taken together. A timer wakes at most once a
/// millisecond, so a pace faster than that needs several slots per wake-up; taken one at a
/// time, a late wake-up would lose the slots between (GCRA gives back none in the past).
/// Each is still handed, in fair order, only when its time comes.
const BATCH_SPAN_NS: u64 = 5_000_000;

impl State {
    /// No slot before `latest` (with the fleet's store away, none for a while): every
    /// request that cannot wait past it is answered now.
    fn refuse(&mut self, r: Rejection, latest: u64) {
        let unavailable = matches!(r, Rejection::Unavailable { .. });
        self.refuse_if(|w| unavailable || w.latest <= latest, r);
    }

    /// Answer `r` to every waiting request `doomed` says cannot go.
    fn refuse_if(&mut self, doomed: impl FnMut(&Waiter) -> bool, r: Rejection) {
        for w in self.queue.drain_where(doomed) {
            if w.cap > 0 {
                self.capped = self.capped.saturating_sub(1);
            }
            self.cost = self.cost - w.cost;
            let _ = w.tx.send(Err(r));
        }
    }

    /// Hand one slot to the first in fair order still waiting; false if nobody took it.
    /// The slot's time is `at`: whoever may take a slot then may take it, even handed
    /// later (`now`).
    fn hand(&mut self, room: &Arc<Room>, at: u64, now: u64, epoch: u32, to: &ChargeTo) -> bool {
        let State {
            queue,
            in_flight,
            capped,
            cost,
            handed: last,
            ..
        } = self;
        // With token budgets, the request must find its tokens too (the dispatcher waited
        // for the first one's; another that came first in the meantime may have to wait).
        // The first in fair order only: one that does not find its tokens (spent since the
        // dispatcher looked) keeps its turn, and the slot goes unused.
        let tokens = room.tokens.active().then_some(&room.tokens);
        while let Some(need) = queue
            .peek(|c, w| w.latest >= at && eligible(in_flight, c, w))
            .map(|w| w.cost)
        {
            if tokens.is_some_and(|t| t.ready_at(need, now) > now) {
                return false;
            }
            let Some((caller, w)) = queue.pop(|c, w| w.latest >= at && eligible(in_flight, c, w))
            else {
                break;
            };
            if w.cap > 0 {
                *capped = capped.saturating_sub(1);
            }
            *cost = *cost - w.cost;
            let charge = match tokens {
                Some(t) if !w.cost.is_zero() && t.try_take(w.cost, now) => {
                    Some(Charge::new(w.cost, to.cell, to.clock, to.fleet))
                }
                _ => None,
            };
            let charged = charge.as_ref().map_or(Cost::default(), |c| c.cost());
            let place = (w.cap > 0).then(|| {
                *in_flight.entry(caller.clone()).or_insert(0) += 1;
                CallerPlace {
                    room: Some(room.clone()),
                    caller: caller.clone(),
                }
            });
            let handed = Handed {
                slot: now,
                epoch,
                place,
                charge,
            };
            match w.tx.send(Ok(handed)) {
                Ok(()) => {
                    *last = Some(charged);
                    return true;
                }
                // It stopped waiting: its place and its tokens are given back here (the lock
                // is held, so not by the place's own drop), and the slot goes to the next.
                Err(Ok(mut h)) => {
                    if let Some(mut p) = h.place.take() {
                        p.room = None;
                        release(in_flight, &p.caller);
                    }
                    // Its tokens go back to this node's count (the dispatcher settles the
                    // fleet's with whoever takes the slot).
                    if let Some(c) = &mut h.charge {
                        c.local_only();
                    }
                }
                Err(Err(_)) => {}
            }
        }
        false
    }
}

/// A free slot at once (the same look as a request's own on the uncontended path).
fn slot_now(cell: &Arc<HostCell>, fleet: Option<&dyn FleetSeam>, now: u64) -> bool {
    match fleet {
        Some(f) => f.try_now(cell),
        None => cell.reserve(now, 0) == Decision::Now,
    }
}

/// Forgets the slots a dispatcher held.
struct Unhold<'a>(&'a Room);

impl Drop for Unhold<'_> {
    fn drop(&mut self) {
        self.0.lock().held.clear();
    }
}

/// Resets a room whose dispatcher ended before its queue did.
struct Dispatching<'a> {
    room: &'a Room,
    done: bool,
}

impl Drop for Dispatching<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.room.lock();
        st.dispatching = false;
        // Their senders dropped: each waiting request is refused at once.
        drop(st.queue.drain_where(|_| true));
        st.capped = 0;
        st.latest = 0;
        st.cost = Cost::default();
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
