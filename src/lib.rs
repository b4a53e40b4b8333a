//! sluice: an egress proxy that paces, shares and routes outbound API calls.

pub mod access;
pub mod admin;
pub mod admission;
pub mod app;
pub mod cidr;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod fleet;
pub mod framing;
pub mod front;
pub mod gate;
pub mod generation;
pub mod intercept;
pub mod jobs;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod regions;
pub mod reload;
pub mod resolve;
pub mod state;
pub mod sweeper;
pub mod target;
pub mod tunnel;
pub mod upstream;
