//! Everything that speaks Apple's HTTP: OAuth signing, the session, one method per
//! endpoint, and the parsing of Apple's errors. The protocol facts each part relies on are
//! in `docs/apple-dep-api.md`, with their sources.

pub mod client;
pub mod error;
pub(crate) mod oauth1;

pub use client::{
    Account, AccountLimit, AccountUrl, AppleClient, AssignResult, ClientSettings, DevicePage,
    ReplacementDetails, DEFAULT_MAX_RESPONSE_BYTES,
};
pub use error::{ApiError, CursorError, Endpoint};
