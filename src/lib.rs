//! Arbiter: a policy decision point that runs as a sidecar next to each
//! workload and answers "may this subject do this action on this resource?"
//! in microseconds, from a Cedar policy bundle held in memory.
//!
//! ```text
//!  caller ──gRPC arbiter.v1.Authorizer──▶ api::grpc ─┐
//!  ops    ──HTTP /metrics /readyz──────▶ api::http  │   (adapters: convert only)
//!                                                   ▼
//!                                      decision::Decider ──▶ telemetry::Metrics
//!                                        │ ArcSwap<Active>     DecisionSink (trail)
//!                                        ▼
//!                     policy::Engine (schema-typed conversion, index, Cedar,
//!                                     annotations → outcome)
//!                                        ▲
//!                     bundle::Bundle (directory: manifest, *.cedar, schema, entities)
//! ```
//!
//! - [`bundle`]: reads a bundle from disk.
//! - [`policy`]: compiles a bundle into an [`policy::Engine`] and decides.
//! - [`policytest`]: the policy tests a bundle carries (`tests/*.json`).
//! - [`decision`]: the decision vocabulary and the service every adapter calls.
//! - [`decision_log`]: the decision trail: masked, hash-chained records, spooled
//!   and shipped to the control plane (and optionally OTLP).
//! - [`api`]: gRPC and HTTP adapters and the generated protobuf code.
//! - [`config`]: typed, validated configuration.
//! - [`controlplane`]: the sidecar's client of the control plane and the
//!   reference control plane (bundles, decision records).
//! - [`distribution`]: pulling, verifying and activating bundles.
//! - [`telemetry`]: metrics and logs.
//! - [`server`]: the composition root of `arbiter serve`.
//! - [`cli`]: the offline and client subcommands (`check`, `bundle`, `log`).
//! - [`bench`]: the load generator and its echo baseline.

pub mod api;
pub mod bench;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod controlplane;
pub mod decision;
pub mod decision_log;
pub mod distribution;
pub mod policy;
pub mod policytest;
pub mod server;
pub mod sessions;
pub mod telemetry;
