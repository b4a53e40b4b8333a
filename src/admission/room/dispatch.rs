//! A contended host's dispatcher: one task per contended host takes the host's slots as they
//! come (from the local pace, or from the fleet), waits for the tokens of the first request in
//! fair order when the host has token budgets, and hands each slot to the request the fair
//! order picks at that moment.

use super::{eligible, release, CallerPlace, Handed, Room, State, Waiter};
use crate::admission::charge::Charge;
use crate::admission::tokens::Cost;
use crate::admission::{Clock, Decision, FleetSeam, FleetTokens, HostCell, Rejection};
use std::sync::Arc;
use std::time::Duration;

/// Whose budgets a handed request's tokens are charged to: the host's, and the fleet's when
/// the dispatcher took them there.
struct ChargeTo<'a> {
    cell: &'a Arc<HostCell>,
    clock: &'a Arc<Clock>,
    fleet: Option<&'a Arc<dyn FleetSeam>>,
}

impl Room {
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
    pub(super) async fn dispatch(
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
                                    let by = now.saturating_add(crate::admission::nanos(wait));
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
                    let change = crate::admission::TokenChange::settle(taken, handed);
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
