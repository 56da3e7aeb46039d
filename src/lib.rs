//! adesync keeps a complete, queryable SQLite mirror of the devices Apple Business Manager
//! or Apple School Manager assigns to a device-management server, and records every change
//! as an event.
//!
//! # Layout
//!
//! Each module imports only modules listed below it (a test checks this), so there are no
//! import cycles, and nothing in the library reaches the command line (`src/cli/`, part
//! of the binary only: every word for people and every exit code).
//!
//! - [`daemon`]: the long-running service: per-token schedules, failure policy, signals,
//!   systemd, the `/metrics` and `/healthz` listener.
//! - [`syncer`]: one pass for one token: the cursor state machine, the writer thread, the
//!   start-of-run checks.
//! - [`sinks`]: delivery of events to other systems (jsonl, webhooks signed per Standard
//!   Webhooks, commands; adesync's event object or CloudEvents), at least once and in
//!   order, each sink with its own cursor; retention.
//! - [`status`]: the rules shared by every surface that reports on tokens: attention,
//!   expiry, overdue, durations for people.
//! - [`store`]: all SQL, one file per table family; a page's rows, events and cursor in one
//!   transaction (group commit).
//! - [`events`]: the pure decision (stored row, incoming record) → event, and event JSON
//!   (`schema/event.schema.json`).
//! - [`apple`]: everything that speaks Apple's HTTP: OAuth 1.0a, the session, one method
//!   per endpoint, Apple's errors parsed once.
//! - [`orgapi`]: everything that speaks the Apple School Manager and Apple Business API:
//!   the ES256 client assertion, the access-token cache, the per-account request budget,
//!   the JSON:API lists, resources turned into rows.
//! - [`token`]: the server token (JSON or `.p7m` + key), its expiry, key/cert
//!   administration that returns data.
//! - [`config`]: the TOML file → a validated [`config::Config`] of paths and values (never
//!   decrypted secrets); errors name the key.
//! - [`model`]: devices and records with Apple's field names; the enums every layer shares
//!   (phase, event kind, sink state, error kind).
//! - `http_client`: the outbound HTTP client setup (one TLS configuration per process) and
//!   the one way an answer is read (no redirect, a capped body).
//!
//! Rule of thumb: HTTP bytes → `apple`; meaning → `model`/`events`; SQL → `store`;
//! decisions → `syncer`/`events`/`status`; time and loops → `daemon`; words for people →
//! the binary's `cli`.

// Top to bottom: each module imports only modules below it (tests/layout.rs).
pub mod daemon;

pub mod syncer;

pub mod sinks;

pub mod status;

pub mod store;

pub mod events;

pub mod apple;

pub mod orgapi;

pub mod token;

pub mod config;

pub mod model;

pub(crate) mod http_client;
