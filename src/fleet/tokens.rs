//! A host's token budgets counted for the whole fleet (`tokens_per_minute` and the like with
//! `[shared] backend = "redis"`): one bucket per budget in the store, taken from when a
//! request is handed its slot, settled when its answer tells what it used, lowered to what
//! the upstream says is left. Each node keeps its own count as well: it orders the node's
//! waiting requests, and holds alone while the store is unavailable.

use super::store::TokenOp;
use super::{Fleet, Op};
use crate::admission::{FleetTokens, HostCell, TokenChange, TokenCost, TokenLimits};
use std::time::Duration;

fn amounts(cost: TokenCost) -> [i64; 3] {
    crate::admission::TokenBudget::ALL.map(|b| i64::try_from(cost.of(b)).unwrap_or(i64::MAX))
}

/// The store's buckets that apply: the host's configured ones (`tokens`) and the model's
/// learned ones (`tokens:<model id>`), each with its limits.
fn buckets(limits: &TokenLimits, lower: bool) -> Vec<(String, [u64; 3])> {
    let mut out = Vec::with_capacity(2);
    // What the upstream says is left is the model's (the host's configured count is
    // sluice's own), unless no budget was learned for it.
    if !(lower && limits.model.is_some()) && limits.host != [0; 3] {
        out.push(("tokens".to_string(), limits.host));
    }
    if let Some((id, l)) = limits.model {
        out.push((format!("tokens:{id:x}"), l));
    }
    out
}

impl Fleet {
    /// Take `cost` of `cell`'s host's budgets in the store, now or (`reserve_within`) as a
    /// reservation; `None` when the store is unavailable.
    pub(super) async fn take_tokens_shared(
        &self,
        cell: &HostCell,
        limits: TokenLimits,
        cost: TokenCost,
        reserve_within: Option<Duration>,
    ) -> Option<FleetTokens> {
        let (host, store) = (self.host(cell)?, self.store.get().cloned()?);
        if !self.allow(self.clock.now()) {
            return None;
        }
        let op = match reserve_within {
            Some(d) => TokenOp::Reserve(d),
            None => TokenOp::Take,
        };
        let keys = buckets(&limits, false);
        if keys.is_empty() {
            return Some(FleetTokens::Taken);
        }
        let call = || store.tokens(&host.key, op, &keys, amounts(cost));
        let wait_ms = self.call(Op::Tokens, call).await.ok()?;
        let ms = |v: i64| Duration::from_millis(v.unsigned_abs().min(3_600_000));
        Some(match wait_ms {
            0 => FleetTokens::Taken,
            v if v > 0 => FleetTokens::Reserved(ms(v)),
            v => FleetTokens::NotWithin(ms(v)),
        })
    }

    /// Change the store's count in the background (no request waits for it).
    pub(super) fn tokens_changed_shared(
        &self,
        cell: &HostCell,
        limits: TokenLimits,
        change: TokenChange,
    ) {
        let (Some(host), Some(store)) = (self.host(cell), self.store.get().cloned()) else {
            return;
        };
        let (op, amounts) = match change {
            TokenChange::Adjust(a) if a == [0; 3] => return,
            TokenChange::Adjust(a) => (TokenOp::Adjust, a),
            TokenChange::Lower(a) => (TokenOp::Lower, a),
        };
        let keys = buckets(&limits, op == TokenOp::Lower);
        if keys.is_empty() {
            return;
        }
        if !self.allow(self.clock.now()) {
            return;
        }
        let (Ok(runtime), Some(fleet)) = (tokio::runtime::Handle::try_current(), self.me.upgrade())
        else {
            return;
        };
        runtime.spawn(async move {
            let call = || store.tokens(&host.key, op, &keys, amounts);
            if let Err(e) = fleet.call(Op::Tokens, call).await {
                tracing::debug!(host = &*host.key, error = %e, "a token count not shared");
            }
        });
    }
}
