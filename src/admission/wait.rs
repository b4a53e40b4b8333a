//! Waiting for admission: a slot at the host's pace and an in-flight place (`acquire`: at once
//! while the host has a free slot, else in its fair queue, `room.rs`), the permit that holds the place, and the last look before a request is sent
//! (`before_send`: the send guard and a pause learned since).

use super::charge::{settle_on, Charge};
use super::room::{CallerPlace, Wait, OTHER};
use super::tokens::Cost;
use super::{nanos, Admission, Clock, Decision, FleetPlace, Host, HostCell, Rejection};
use crate::config::Priority;
use crate::generation::Generation;
use std::sync::Arc;
use std::time::Duration;

/// What one request asks of admission at a host.
pub struct Ask<'a> {
    /// Who is asking (fair shares, classes and the per-caller cap at a contended host);
    /// `None`: the caller everyone shares.
    pub caller: Option<&'a Caller>,
    /// Longest the request may wait for its slot and in-flight place.
    pub max_wait: Duration,
    /// The deadline rule, asked only when the request has to wait; `None`: no rule.
    pub due: Option<&'a dyn Due>,
    /// Its estimated tokens, for a host with token budgets.
    pub cost: Cost,
}

/// The deadline rule of a request: a request that has to wait takes only a slot within
/// [`Due::slot_within`] from now (its deadline less the time its answer is expected to take).
pub trait Due: Sync {
    fn slot_within(&self) -> Duration;
}

impl Due for Duration {
    fn slot_within(&self) -> Duration {
        *self
    }
}

impl Ask<'_> {
    /// `caller`'s wait of at most `max_wait`, with no deadline rule.
    pub fn of(caller: &Caller, max_wait: Duration) -> Ask<'_> {
        Ask {
            caller: Some(caller),
            max_wait,
            due: None,
            cost: Cost::default(),
        }
    }

    /// A wait of at most `max_wait`, with no caller and no deadline rule.
    pub fn plain(max_wait: Duration) -> Ask<'static> {
        Ask {
            caller: None,
            max_wait,
            due: None,
            cost: Cost::default(),
        }
    }
}

/// A request's caller as one host sees it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: Arc<str>,
    /// Its share against the host's other callers (at least 1).
    pub weight: u32,
    pub priority: Priority,
    /// Its requests in flight at this host at once (0: no cap); counted for the whole fleet
    /// when there is one, where a place held longer than `hold` (the host's request
    /// timeout) stops counting.
    pub cap: u32,
    pub hold: Duration,
    /// Callers this host tracks apart (the rest share `other`).
    pub max_per_host: usize,
    /// `name` is a configured client's (a bounded label set: metrics may name it).
    pub client: bool,
}

/// An admitted request's in-flight place; given back when dropped.
pub struct Permit {
    /// `None` for a host without a full cell (no in-flight count to keep).
    cell: Option<Arc<HostCell>>,
    /// Time spent waiting for the slot and the in-flight place.
    pub queued: Duration,
    /// The slot's time (ns on the admission clock) and the pause epoch it was taken in
    /// (0 in the compact table), for the look taken just before sending.
    slot: u64,
    epoch: u32,
    /// Its caller's place under a per-caller cap, on this node and in the fleet.
    _place: Option<CallerPlace>,
    _fleet_place: Option<FleetPlace>,
    /// The tokens charged to the host's budgets for it.
    charge: Option<Box<Charge>>,
    /// It was sent: its charge stands unless its answer settles it.
    sent: bool,
}

/// What a request admitted earlier does when it is about to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtSend {
    /// Send it now.
    Go,
    /// The host was paused since its admission: it is admitted again (after the pause).
    Paused,
}

impl Permit {
    /// The tokens charged to the host's budgets for it.
    pub fn charged(&self) -> Cost {
        self.charge.as_ref().map_or(Cost::default(), |c| c.cost())
    }

    /// It is being sent: from now on the upstream counts its tokens.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Not sent: its tokens go back (the charge's own drop).
        if let (true, Some(c)) = (self.sent, self.charge.take()) {
            (*c).keep();
        }
        if let Some(cell) = &self.cell {
            cell.leave();
        }
    }
}

impl Admission {
    /// `permit`'s answer told what the request used: the host's token budgets (this node's
    /// count and the fleet's) get back what was charged for it and take `used` instead.
    /// Returns what was charged.
    /// A request charged nothing (sent before its host had a budget) takes `used`.
    pub fn settle(&self, permit: &mut Permit, used: Cost) -> Cost {
        match (permit.charge.take(), &permit.cell) {
            (Some(c), _) => (*c).settle(used),
            (None, Some(cell)) => {
                let fleet = self.fleet.as_deref();
                settle_on(cell, &self.clock, fleet, Cost::default(), used);
                Cost::default()
            }
            (None, None) => Cost::default(),
        }
    }

    /// Wait for a slot at the host's pace and an in-flight place, as `ask` allows. Requests
    /// go at once while the host has a free slot; when it has none they wait in its fair
    /// queue (a host in the compact table gets a full cell for it).
    pub async fn acquire(&self, host: &Host, ask: &Ask<'_>) -> Result<Permit, Rejection> {
        let start = self.clock.now();
        let cell = match host {
            Host::Cell(cell) => cell.clone(),
            // A caller's cap needs a full cell (a configured cap keeps hosts out of the
            // compact table).
            Host::Light { key, .. } if ask.caller.is_some_and(|c| c.cap > 0) => {
                self.contended_cell(key)
            }
            Host::Light { fp, key } => loop {
                match self.light.reserve(*fp, start, 0) {
                    Some(Decision::Now) => {
                        return Ok(Permit {
                            cell: None,
                            queued: Duration::ZERO,
                            slot: start,
                            epoch: 0,
                            _place: None,
                            _fleet_place: None,
                            charge: None,
                            sent: false,
                        })
                    }
                    Some(_) => break self.contended_cell(key),
                    None => match self.cells.pin().get(key.as_str()) {
                        Some(c) => break c.clone(),
                        None => self.light.demote(*fp),
                    },
                }
            },
        };
        self.acquire_cell(&cell, start, ask).await
    }

    /// A slot at once, if the host has one free (the uncontended path: no lock, no queue).
    fn slot_now(&self, cell: &Arc<HostCell>, now: u64) -> bool {
        match &self.fleet {
            Some(fleet) => fleet.try_now(cell),
            None => cell.reserve(now, 0) == Decision::Now,
        }
    }

    async fn acquire_cell(
        &self,
        cell: &Arc<HostCell>,
        start: u64,
        ask: &Ask<'_>,
    ) -> Result<Permit, Rejection> {
        let cap = ask.caller.map_or(0, |c| c.cap);
        // A host's token budgets apply to requests that use tokens (others do not even look).
        let room = match ask.cost.is_zero() || !cell.counts_tokens() {
            true => None,
            false => cell.room_if_any(),
        };
        let tokens = room.as_deref().map(|r| &r.tokens);
        if let Some((budget, limit)) = tokens.and_then(|t| t.too_large(ask.cost)) {
            return Err(Rejection::OverBudget {
                budget,
                limit,
                estimate: ask.cost.of(budget),
            });
        }
        let max_wait = nanos(ask.max_wait);
        let deadline = start.saturating_add(max_wait);
        // In a fleet, the caller's place is taken from the fleet's count first.
        let fleet_place = match (&self.fleet, ask.caller) {
            (Some(fleet), Some(c)) if cap > 0 => {
                fleet.place(cell, &c.name, cap, c.hold, deadline).await?
            }
            _ => None,
        };
        let mut place = None;
        // Tokens at once only while nobody waits for them (they go in fair order).
        // Given back if this request does not go (its drop), whatever stops it.
        let mut charge = None;
        let tokens_now = match (tokens, &room) {
            (Some(t), Some(r)) => {
                if r.none_waiting() && t.try_take(ask.cost, start) {
                    let mut c = Charge::new(ask.cost, cell, &self.clock, None);
                    let free = match &self.fleet {
                        // And the fleet's count (unless its store is away: this node's holds).
                        Some(fleet) => {
                            match fleet
                                .take_tokens(cell, t.limits(ask.cost.model), ask.cost, None)
                                .await
                            {
                                Some(super::FleetTokens::Taken) => {
                                    c.shared_with(fleet);
                                    true
                                }
                                Some(_) => false,
                                None => true,
                            }
                        }
                        None => true,
                    };
                    if free {
                        charge = Some(c);
                    }
                    free
                } else {
                    false
                }
            }
            _ => true,
        };
        let at_once = tokens_now
            && if cap > 0 {
                let c = ask.caller.expect("a cap comes with a caller");
                let room = cell.room();
                let key = room.caller_key(&c.name, c.max_per_host);
                place = room.try_place(&key, cap);
                place.is_some() && self.slot_now(cell, start)
            } else {
                self.slot_now(cell, start)
            };
        let (slot, epoch) = if at_once {
            (start, cell.epoch())
        } else {
            drop(charge.take());
            drop(place.take());
            let latest = match ask.due.map(|d| nanos(d.slot_within())) {
                Some(d) if d < max_wait => start.saturating_add(d),
                _ => deadline,
            };
            let other: Arc<str> = Arc::from(OTHER);
            let wait = match ask.caller {
                Some(c) => Wait {
                    caller: &c.name,
                    weight: c.weight,
                    class: c.priority,
                    cap,
                    max_callers: c.max_per_host,
                    latest,
                    latest_by_wait: deadline,
                    cost: ask.cost,
                },
                None => Wait {
                    caller: &other,
                    weight: 1,
                    class: Priority::Normal,
                    cap: 0,
                    max_callers: 1,
                    latest,
                    latest_by_wait: deadline,
                    cost: ask.cost,
                },
            };
            let handed = cell
                .room()
                .wait(cell, &self.clock, &self.fleet, wait)
                .await?;
            place = handed.place;
            charge = handed.charge;
            (handed.slot, handed.epoch)
        };
        while !cell.try_enter() {
            let room = cell.room();
            let notified = room.gate.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if cell.try_enter() {
                break;
            }
            let left = deadline.saturating_sub(self.clock.now());
            if tokio::time::timeout(Duration::from_nanos(left), notified)
                .await
                .is_err()
            {
                return Err(Rejection::Concurrency {
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        Ok(Permit {
            cell: Some(cell.clone()),
            queued: Duration::from_nanos(self.clock.now().saturating_sub(start)),
            slot,
            epoch,
            _place: place,
            _fleet_place: fleet_place,
            charge,
            sent: false,
        })
    }

    /// The last look before an admitted request is sent (its connection in hand): it waits
    /// for its place among the host's sends, and it goes back to admission if the host was
    /// paused since it was admitted. Without it, a request admitted on time but sent late (its
    /// task starved of CPU, its connection slow) reached the upstream right before the next
    /// one, and a 429 learned meanwhile did not hold requests that had their slot already.
    /// A host in the compact table needs neither while its sends are on time; a late one
    /// moves it to a full cell, whose sends are then spaced by its send guard.
    pub async fn before_send(
        &self,
        host: &Host,
        permit: &Permit,
        generation: &Generation,
    ) -> AtSend {
        let now = self.clock.now();
        let cell = match host {
            Host::Cell(c) => c.clone(),
            Host::Light { fp, key } => {
                if self.light.holds(*fp) {
                    if now.saturating_sub(permit.slot) <= self.light.late_after() {
                        return AtSend::Go;
                    }
                    self.make_cell(key, 0, false, generation, 0)
                } else {
                    match self.cells.pin().get(key.as_str()) {
                        Some(c) => c.clone(),
                        None => return AtSend::Go,
                    }
                }
            }
        };
        if !cell.still_valid(permit.epoch) {
            return AtSend::Paused;
        }
        let at = cell.send_slot(now);
        if at > now {
            tokio::time::sleep(Duration::from_nanos(at - now)).await;
            if !cell.still_valid(permit.epoch) {
                return AtSend::Paused;
            }
        }
        AtSend::Go
    }
}

/// Wait for a slot at `cell`'s pace until `deadline` (ns on `clock`) at most; the pause epoch
/// the slot was taken in.
pub(crate) async fn pace_cell(
    cell: &HostCell,
    clock: &Clock,
    deadline: u64,
) -> Result<u32, Rejection> {
    loop {
        let now = clock.now();
        let epoch = cell.epoch();
        match cell.reserve(now, deadline.saturating_sub(now)) {
            Decision::Now => return Ok(epoch),
            Decision::At { at, epoch } => {
                tokio::time::sleep(Duration::from_nanos(at.saturating_sub(now))).await;
                if cell.still_valid(epoch) {
                    return Ok(epoch);
                }
            }
            Decision::Refuse { retry_after } => {
                let retry_after = Duration::from_nanos(retry_after);
                return Err(if cell.paused_until() > now {
                    Rejection::Paused { retry_after }
                } else {
                    Rejection::Pace { retry_after }
                });
            }
        }
    }
}
