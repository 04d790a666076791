//! Subcommands other than `serve`: tools for policy authors and CI.

pub mod check;
