//! What the daemon knows about each token while it runs, shared by the scheduler (which
//! writes it), the `/metrics` and `/healthz` listener and systemd's STATUS= line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::syncer::RunSummary;

/// What the daemon knows about one token, for `/healthz`, `/metrics` and STATUS=.
#[derive(Clone, Debug, Default)]
pub struct TokenHealth {
    /// Token name.
    pub name: String,
    /// A run is in progress.
    pub running: bool,
    /// Failed runs in a row.
    pub consecutive_failures: u32,
    /// Set while parked: the error that needs a person.
    pub parked: Option<String>,
    /// The last run's error, if it failed.
    pub last_error: Option<String>,
    /// When the last run succeeded.
    pub last_success: Option<SystemTime>,
    /// The last successful run's summary.
    pub last_summary: Option<RunSummary>,
    /// Errors by kind since start.
    pub errors_by_kind: HashMap<String, u64>,
    /// Events written since start.
    pub events_written: u64,
    /// Device records Apple sent that could not be stored, since start.
    pub records_refused: u64,
    /// Runs since start, successful or not.
    pub runs: u64,
}

/// Shared health of all tokens.
pub type Health = Arc<Mutex<HashMap<String, TokenHealth>>>;
