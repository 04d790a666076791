//! The sidecar's connection to the control plane (or to any HTTP server or
//! object store that serves bundles): the one client that later capabilities
//! extend — decision records flow back over it, approvals and session signals
//! flow out. It knows HTTP, timeouts and limits, nothing of policy.

pub mod client;

pub use client::{BundleClient, FetchError, Fetched, Validators};
