//! Token budgets: what each host named in `[hosts]` has left, and how the estimates of
//! requests' tokens compare with what their answers said they used (so an operator can see
//! when the estimate is off). Label sets are bounded: `host` is a `[hosts]` entry (its
//! `host:port` for the gauges), `budget` one of three, `model` one of the at most 16 models a
//! host learns budgets for (empty for the host's configured budgets).

use crate::admission::{HostCell, TokenCost};
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct TokenMetrics {
    /// `sluice_host_tokens_remaining{host,budget}`: tokens sluice counts as left now.
    pub remaining: GaugeVec,
    /// `sluice_host_tokens_limit{host,budget}`: the budget per minute, configured or learned.
    pub limit: IntGaugeVec,
    /// `sluice_tokens_estimated_total{host}` and `sluice_tokens_used_total{host}`: input and
    /// output tokens together, of requests whose answers reported their usage.
    pub estimated: IntCounterVec,
    pub used: IntCounterVec,
}

impl TokenMetrics {
    pub fn new(registry: &Registry) -> Result<TokenMetrics, prometheus::Error> {
        let remaining = GaugeVec::new(
            Opts::new(
                "sluice_host_tokens_remaining",
                "Tokens left now in a host's budget, of hosts named in [hosts] (below 0: used beyond the estimates)",
            ),
            &["host", "budget", "model"],
        )?;
        let limit = IntGaugeVec::new(
            Opts::new(
                "sluice_host_tokens_limit",
                "A host's token budget per minute, configured or learned, of hosts named in [hosts]",
            ),
            &["host", "budget", "model"],
        )?;
        let estimated = IntCounterVec::new(
            Opts::new(
                "sluice_tokens_estimated_total",
                "Tokens estimated before sending, of requests whose answers reported usage",
            ),
            &["host"],
        )?;
        let used = IntCounterVec::new(
            Opts::new(
                "sluice_tokens_used_total",
                "Tokens answers reported used (the same requests as sluice_tokens_estimated_total)",
            ),
            &["host"],
        )?;
        registry.register(Box::new(remaining.clone()))?;
        registry.register(Box::new(limit.clone()))?;
        registry.register(Box::new(estimated.clone()))?;
        registry.register(Box::new(used.clone()))?;
        Ok(TokenMetrics {
            remaining,
            limit,
            estimated,
            used,
        })
    }

    /// A request's estimate and what its answer said it used.
    pub fn settled(&self, host: &str, estimated: TokenCost, used: TokenCost) {
        let total = |c: TokenCost| c.input.saturating_add(c.output);
        self.estimated
            .with_label_values(&[host])
            .inc_by(total(estimated));
        self.used.with_label_values(&[host]).inc_by(total(used));
    }

    /// Set the budgets of the named hosts' cells, when scraped.
    pub fn refresh<'a>(&self, cells: impl Iterator<Item = (&'a str, &'a HostCell)>, now: u64) {
        self.remaining.reset();
        self.limit.reset();
        for (host, cell) in cells {
            for v in cell.token_views(now) {
                let labels = [host, v.budget.as_str(), v.model.as_deref().unwrap_or("")];
                self.remaining
                    .with_label_values(&labels)
                    .set(v.available.floor());
                self.limit
                    .with_label_values(&labels)
                    .set(i64::try_from(v.limit_per_minute).unwrap_or(i64::MAX));
            }
        }
    }
}
