//! adesync keeps a complete, queryable SQLite mirror of the devices Apple Business Manager
//! or Apple School Manager assigns to a device-management server, and records every change
//! as an event.
//!
//! # Layout
//!
//! - [`config`]: the TOML file → a validated [`config::Config`]; errors name the key.
//! - [`token`]: the server token (OAuth credentials), expiry, secret redaction; a `.p7m`
//!   token file is decrypted through [`p7m`] (CMS EnvelopedData, BER, RSA + AES/3DES).
//! - [`tokens`]: token management for admins: key pair, import, expiry list, forget.
//! - [`account`]: Apple's `GET /account` per token; start-of-run checks (expiry warnings,
//!   same-server guard, page-size cap) and `adesync account`.
//! - [`http_client`]: the HTTP client setup (one TLS configuration per process).
//! - [`apple`]: everything that speaks Apple's HTTP — OAuth 1.0a, the session, one method
//!   per endpoint, Apple's errors parsed once.
//! - [`model`]: devices and records with Apple's field names; de-duplication by `op_date`.
//! - [`store`]: all SQL. A page's rows, events and cursor in one transaction (group commit).
//! - [`events`]: the diff that makes events, and their JSON (`schema/event.schema.json`).
//! - [`sinks`]: delivery of events to other systems (jsonl, signed webhooks, commands),
//!   at least once and in order, each sink with its own cursor; retention.
//! - [`syncer`]: one pass for one token — the cursor state machine and the page pipeline.
//! - [`daemon`]: the long-running service: per-token schedules, failure policy, signals, systemd.
//! - [`http`]: the optional `/metrics` and `/healthz` listener.
//! - [`cli`]: the command line; words for people.
//! - [`demo`]: the one-command demo against the bundled Apple simulator.
//!
//! Rule of thumb: HTTP bytes → `apple`; meaning → `model`; SQL → `store`; decisions →
//! `syncer` / `events`; time and loops → `daemon`; words for people → `cli`.

pub mod account;
pub mod apple;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod events;
pub mod http;
pub mod http_client;
pub mod model;
pub mod p7m;
pub mod report;
pub mod sinks;
pub mod store;
pub mod syncer;
pub mod token;
pub mod tokens;
