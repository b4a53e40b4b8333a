//! A caller's places among its requests in flight at a host, counted for the whole fleet
//! (`max_concurrent_per_caller` with `[shared] backend = "redis"`): taken from the store before
//! the node's own count, asked again while the cap is reached, given back when the request
//! ends.

use super::{Fleet, Op};
use crate::admission::{FleetPlace, HostCell, Rejection};
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

/// Longest pause between two asks for a caller's fleet place while its cap is reached.
const PLACE_ASK_MAX: Duration = Duration::from_millis(200);

/// A caller's place at a host, taken from the fleet; given back (in the background) when
/// dropped. Armed from the moment it is asked for until the store says no: a request dropped
/// while its ask was under way gives back what the store may have given it.
struct HeldPlace {
    fleet: Weak<Fleet>,
    host: Box<str>,
    caller: Box<str>,
    holder: String,
    armed: bool,
}

impl Drop for HeldPlace {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (Some(fleet), Ok(runtime)) =
            (self.fleet.upgrade(), tokio::runtime::Handle::try_current())
        else {
            // Shutting down: the place ends with its ttl.
            return;
        };
        let Some(store) = fleet.store.get().cloned() else {
            return;
        };
        let (host, caller, holder) = (
            std::mem::take(&mut self.host),
            std::mem::take(&mut self.caller),
            std::mem::take(&mut self.holder),
        );
        runtime.spawn(async move {
            let call = || store.give_place(&host, &caller, &holder);
            if let Err(e) = fleet.call(Op::Place, call).await {
                tracing::debug!(host = &*host, error = %e, "a fleet place not given back (it ends with its ttl)");
            }
        });
    }
}

impl Fleet {
    /// One of `caller`'s `cap` places at `cell`'s host, for the fleet: asked again, a little
    /// later each time, while the cap is reached, until `deadline`. `None` when the store is
    /// unavailable (the node's own count of the caller's places holds meanwhile).
    pub(super) async fn place_shared(
        &self,
        cell: &HostCell,
        caller: &str,
        cap: u32,
        hold: Duration,
        deadline: u64,
    ) -> Result<Option<FleetPlace>, Rejection> {
        let (Some(host), Some(store)) = (self.host(cell), self.store.get().cloned()) else {
            return Ok(None);
        };
        let n = self.places.fetch_add(1, Ordering::Relaxed);
        let mut held = HeldPlace {
            fleet: self.me.clone(),
            host: host.key.clone(),
            caller: caller.into(),
            holder: format!("{}:{n}", self.node_id),
            armed: false,
        };
        let mut pause = Duration::from_millis(10);
        loop {
            if !self.allow(self.clock.now()) {
                return Ok(None);
            }
            held.armed = true;
            let holder = held.holder.clone();
            let call = || store.take_place(&host.key, caller, &holder, cap, hold);
            match self.call(Op::Place, call).await {
                Ok(true) => return Ok(Some(Box::new(held))),
                Ok(false) => held.armed = false,
                // Unknown whether the store gave one: `held` gives it back.
                Err(_) => return Ok(None),
            }
            let now = self.clock.now();
            if now.saturating_add(pause.as_nanos() as u64) > deadline {
                return Err(Rejection::Concurrency {
                    retry_after: Duration::from_secs(1),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PLACE_ASK_MAX);
        }
    }
}
