//! Subcommands other than `serve`: tools for policy authors and CI.

pub mod bundle;
pub mod check;
pub mod journeys;
pub mod log;
