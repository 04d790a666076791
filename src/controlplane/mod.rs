//! The control plane, both sides: `client` is the sidecar's (and the CLI's)
//! one connection to it — the channel later capabilities extend (decision
//! records back, approvals and signals out) — and `server` + `store` are the
//! reference control plane, `arbiter control-plane`.

pub mod client;
pub mod journeys;
pub mod server;
pub mod store;
pub mod trail;

pub use client::{AdminClient, BundleClient, FetchError, Fetched, Validators};
