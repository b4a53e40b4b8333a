//! `[callers]` and a request's class: how sluice tells apart the callers that wait at one
//! contended host, and in which order classes go.

use serde::{Deserialize, Serialize};

/// A request's class when callers wait at one host: higher classes go first, and a lower
/// class waiting is never starved outright.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High = 0,
    #[default]
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// `high`, `normal` or `low` (as `Sluice-Priority` carries it).
    pub fn parse(v: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == v)
    }
}

/// `[callers]`: who a request's caller is, for fair shares at a contended host.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Callers {
    /// `auto`: the authenticated client; without client authentication, the `Sluice-Caller`
    /// header, else the client's address. `address`: the client's address (the header is
    /// ignored). `none`: one caller for everyone (first come, first served).
    pub by: CallerBy,
    /// Callers tracked apart at one host; the rest share the caller `other`.
    pub max_per_host: usize,
}

impl Default for Callers {
    fn default() -> Self {
        Callers {
            by: CallerBy::Auto,
            max_per_host: 64,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CallerBy {
    #[default]
    Auto,
    Address,
    None,
}
