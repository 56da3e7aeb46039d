//! adesync's integration tests: one binary, scenarios in modules.
//!
//! - `client`: the Apple client against wiremock (session, re-auth, rotation, errors, retries).
//! - `sync`: whole sync passes against the bundled Apple simulator on 127.0.0.1.
//! - `cli`: the built `adesync` binary, including a process killed mid-sync.

mod cli;
mod client;
mod common;
mod sync;
