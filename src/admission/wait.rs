//! Waiting for admission: a slot at the host's pace and an in-flight place (`acquire`, FIFO
//! per host), the permit that holds the place, and the last look before a request is sent
//! (`before_send`: the send guard and a pause learned since).

use super::{Admission, Clock, Decision, Host, HostCell, Rejection};
use crate::generation::Generation;
use std::sync::Arc;
use std::time::Duration;

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
}

/// What a request admitted earlier does when it is about to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtSend {
    /// Send it now.
    Go,
    /// The host was paused since its admission: it is admitted again (after the pause).
    Paused,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(cell) = &self.cell {
            cell.leave();
        }
    }
}

impl Admission {
    /// Wait for a slot at the host's pace and an in-flight place, at most `max_wait`.
    pub async fn acquire(&self, host: &Host, max_wait: Duration) -> Result<Permit, Rejection> {
        let start = self.clock.now();
        let deadline = start.saturating_add(max_wait.as_nanos() as u64);
        let (fp, key) = match host {
            Host::Cell(cell) => return self.acquire_cell(cell, start, deadline).await,
            Host::Light { fp, key } => (*fp, key.as_str()),
        };
        loop {
            let now = self.clock.now();
            let permit = |slot| Permit {
                cell: None,
                queued: Duration::from_nanos(self.clock.now().saturating_sub(start)),
                slot,
                epoch: 0,
            };
            match self.light.reserve(fp, now, deadline.saturating_sub(now)) {
                Some(Decision::Now) => return Ok(permit(now)),
                Some(Decision::At { at, .. }) => {
                    tokio::time::sleep(Duration::from_nanos(at.saturating_sub(now))).await;
                    // A host promoted while this request waited may have been paused since
                    // (even a pause already over: it restarted the pace after its end). A
                    // full cell made by promotion starts at epoch 0 and every pause bumps
                    // it, so a reservation made here stands while the epoch is 0; otherwise
                    // it is void and the request takes a slot of the full cell.
                    let stands = self.light.holds(fp)
                        || self.cells.pin().get(key).is_none_or(|c| c.still_valid(0));
                    if stands {
                        return Ok(permit(at));
                    }
                }
                Some(Decision::Refuse { retry_after }) => {
                    return Err(Rejection::Pace {
                        retry_after: Duration::from_nanos(retry_after),
                    })
                }
                None => {
                    let cell = self.cells.pin().get(key).cloned();
                    match cell {
                        Some(cell) => return self.acquire_cell(&cell, start, deadline).await,
                        None => self.light.demote(fp),
                    }
                }
            }
        }
    }

    async fn acquire_cell(
        &self,
        cell: &Arc<HostCell>,
        start: u64,
        deadline: u64,
    ) -> Result<Permit, Rejection> {
        match &self.fleet {
            Some(fleet) => fleet.pace(cell, deadline).await?,
            None => pace_cell(cell, &self.clock, deadline).await?,
        }
        // Paced: the slot is now, in the epoch now (a pause from here on voids it).
        let (slot, epoch) = (self.clock.now(), cell.epoch());
        while !cell.try_enter() {
            let gate = cell.gate();
            let notified = gate.notified();
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

/// Wait for a slot at `cell`'s pace until `deadline` (ns on `clock`) at most.
pub(crate) async fn pace_cell(
    cell: &HostCell,
    clock: &Clock,
    deadline: u64,
) -> Result<(), Rejection> {
    loop {
        let now = clock.now();
        match cell.reserve(now, deadline.saturating_sub(now)) {
            Decision::Now => return Ok(()),
            Decision::At { at, epoch } => {
                tokio::time::sleep(Duration::from_nanos(at.saturating_sub(now))).await;
                if cell.still_valid(epoch) {
                    return Ok(());
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
