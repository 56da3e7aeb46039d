//! adesync's integration tests: one binary, scenarios in modules.
//!
//! - `assign`: enrollment profile assignment against the simulator and wiremock.
//! - `backends`: the storage conformance battery, on SQLite and on PostgreSQL.
//! - `client`: the Apple client against wiremock (session, re-auth, rotation, errors, retries).
//! - `sync`: whole sync passes against the bundled Apple simulator on 127.0.0.1.
//! - `cli`: the built `adesync` binary, including a process killed mid-sync.
//! - `sinks`: event delivery to a signed-webhook receiver, a program and a file: outages,
//!   retries, parking, a process killed mid-delivery, replay, the event schema.
//! - `daemon`: the service as a process: signals, /metrics, `status`, unit files.
//! - `org_client`: the organisation API client against wiremock (assertion, token cache,
//!   401, 429, redirects, cursors).
//! - `org`: organisation walks against the bundled simulator.
//! - `story`: each event's reason from a simulator scenario, protocol-10 columns,
//!   replacement details.
//! - `layout`: the module layering, read from the source (no cycles, no CLI in the library).
//! - `tokens`: `.p7m` tokens (made here with OpenSSL), `token` and `account` commands,
//!   the same-server guard, expiry warnings, renewal without restart, purge.

mod assign;
mod backends;
mod cli;
mod client;
mod common;
mod daemon;
mod layout;
mod org;
mod org_client;
mod sinks;
mod story;
mod sync;
mod tokens;
