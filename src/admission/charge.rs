//! Tokens charged to a host's budgets for one request, held from its admission to its answer.
//! A charge is given back when it is dropped before the request was sent (a refusal, a
//! cancelled wait, a pause that sends the request back to admission, a connect that failed),
//! kept once the request was sent (the upstream counts it), and settled against the usage its
//! answer reports.

use super::tokens::Cost;
use super::{Clock, FleetSeam, HostCell, TokenChange};
use std::sync::Arc;

pub struct Charge {
    cost: Cost,
    cell: Arc<HostCell>,
    clock: Arc<Clock>,
    /// The fleet, when its count was charged too.
    fleet: Option<Arc<dyn FleetSeam>>,
}

impl Charge {
    pub(super) fn new(
        cost: Cost,
        cell: &Arc<HostCell>,
        clock: &Arc<Clock>,
        fleet: Option<&Arc<dyn FleetSeam>>,
    ) -> Box<Charge> {
        Box::new(Charge {
            cost,
            cell: cell.clone(),
            clock: clock.clone(),
            fleet: fleet.cloned(),
        })
    }

    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// The answer told what the request used: the charge is given back and `used` taken.
    pub(super) fn settle(mut self, used: Cost) -> Cost {
        let cost = std::mem::take(&mut self.cost);
        settle_on(&self.cell, &self.clock, self.fleet.as_deref(), cost, used);
        cost
    }

    /// The request was sent and its answer told nothing of its usage: the estimate stands.
    pub(super) fn keep(mut self) {
        self.cost = Cost::default();
    }

    /// The fleet's count was charged too.
    pub(super) fn shared_with(&mut self, fleet: &Arc<dyn FleetSeam>) {
        self.fleet = Some(fleet.clone());
    }

    /// Given back to this node's count only (the fleet's is settled elsewhere).
    pub(super) fn local_only(&mut self) {
        self.fleet = None;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if !self.cost.is_zero() {
            let cost = std::mem::take(&mut self.cost);
            settle_on(
                &self.cell,
                &self.clock,
                self.fleet.as_deref(),
                cost,
                Cost::default(),
            );
        }
    }
}

/// Give back `charged` to `cell`'s budgets (this node's and, with `fleet`, the fleet's) and
/// take `used` instead; the first waiting request may go sooner.
pub(super) fn settle_on(
    cell: &HostCell,
    clock: &Clock,
    fleet: Option<&dyn FleetSeam>,
    charged: Cost,
    used: Cost,
) {
    let Some(room) = cell.room_if_any().filter(|r| r.tokens.active()) else {
        return;
    };
    room.tokens.settle(charged, used, clock.now());
    if let Some(f) = fleet {
        f.tokens_changed(
            cell,
            room.tokens.limits(charged.model),
            TokenChange::settle(charged, used),
        );
    }
    room.poke();
}
