//! One sync pass for one token: Apple's fetch/sync cursor protocol as a state machine.
//!
//! `cursor::next_step` is the pure decision (tested as a table); [`run_token`] drives it: it
//! downloads pages on the async side while a blocking writer thread commits them in order —
//! each page's rows, events and the following cursor in the same transaction, several
//! consecutive pages per commit when they are ready (group commit). The download of page
//! N+1 overlaps the writing of page N, and the cursor stored never runs ahead of the rows
//! stored, because it is part of the same commit.
//!
//! Protocol rules (docs/apple-dep-api.md §5): fetch pages until `more_to_follow` is false, then sync from the
//! cursor; `EXHAUSTED_CURSOR` on fetch → sync with the same cursor; `EXPIRED_CURSOR`,
//! `INVALID_CURSOR`, `CURSOR_REQUIRED` → a new full fetch whose completion reconciles
//! (devices it did not return are deleted); Apple returning the cursor it was sent with
//! `more_to_follow: true` stops the pass (never spin) and the next run continues.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::apple::{ApiError, AppleClient, ClientSettings, CursorError, DevicePage};
use crate::config::{Config, TokenConfig};
use crate::model::{dedupe_latest, format_time, ErrorKind, Phase};
use crate::store::{CursorState, PageStats, Store, StoreError, SyncState};
use crate::token::TokenError;

mod assign;
mod checks;
mod cursor;
mod org;
mod writer;

pub use assign::{
    assign_token, assign_token_on, dry_run, plan, rule_matches, rules_for, AssignError,
    AssignSummary, Planned, MAX_SERIALS_PER_CALL,
};
pub use org::{org_client_settings, run_account, run_account_with, OrgRunSummary, OrgSyncError};

pub(crate) use cursor::{next_step, Next, Outcome, Then};
use writer::{writer_loop, WriterMsg};

/// A failed pass. Each variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The token file is unusable or expired.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Apple refused or could not be reached.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Apple rejected even a brand-new fetch cursor.
    #[error("Apple rejected the cursor of a fresh full fetch ({0:?}); retrying next run")]
    CursorLoop(CursorError),
    /// The writer thread died.
    #[error("internal error: the database writer stopped: {0}")]
    Writer(String),
    /// The daemon is shutting down; committed pages are kept.
    #[error("stopped by shutdown; the next run continues from the last committed page")]
    Cancelled,
    /// The token now belongs to another MDM server than the stored devices came from.
    #[error("token \"{token}\" now belongs to another MDM server: Apple reports {new_server}, but the devices stored for \"{token}\" came from {stored_server}; nothing was synced, so the two servers' devices are not mixed. If the token file was replaced by mistake, put back a token of {stored_server} (Apple Business/School Manager → Preferences → that server → Download Token, then `adesync token import --name {token} FILE`). If that server's stored devices are no longer wanted, run `adesync token forget {token} --purge` and sync again, or configure the new token under a new name")]
    ServerChanged {
        /// The token's configured name.
        token: String,
        /// The stored server, as "name (uuid)".
        stored_server: String,
        /// The server Apple reports now, as "name (uuid)".
        new_server: String,
    },
}

impl SyncError {
    /// A short stable name for the stored last error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SyncError::Token(TokenError::Expired { .. }) => ErrorKind::TokenExpired,
            SyncError::Token(e) if e.is_local_resource() => ErrorKind::LocalResource,
            SyncError::Token(_) => ErrorKind::TokenFile,
            SyncError::Api(e) => e.kind(),
            SyncError::Store(_) => ErrorKind::Database,
            SyncError::CursorLoop(_) => ErrorKind::Cursor,
            SyncError::Writer(_) => ErrorKind::Internal,
            SyncError::Cancelled => ErrorKind::Cancelled,
            SyncError::ServerChanged { .. } => ErrorKind::ServerChanged,
        }
    }

    /// Whether a person must act (token, terms, access, server) before a retry can
    /// succeed: the one rule, [`ErrorKind::needs_admin`].
    pub fn needs_admin(&self) -> bool {
        self.kind().needs_admin()
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSummary {
    /// Token name.
    pub token: String,
    /// Pages received (fetch + sync).
    pub pages: u64,
    /// Device records received.
    pub records: u64,
    /// Events written, by kind, and unchanged/stale records.
    pub stats: PageStats,
    /// A full (re-)fetch ran.
    pub fetched: bool,
    /// Device records Apple sent that could not be stored (no usable serial number, a
    /// field of the wrong type), skipped with a warning.
    pub refused: u64,
    /// The pass began a full re-fetch (`--full` or the `full_fetch` schedule).
    pub full_refetch: bool,
    /// The pass stopped on Apple's repeated-cursor bug.
    pub stopped_on_same_cursor: bool,
    /// Replacement devices whose details were read.
    pub replacements: u64,
    /// What profile assignment did after the sync.
    pub assigned: AssignSummary,
    /// Why profile assignment failed, if it did.
    pub assign_error: Option<String>,
    /// Wall time.
    pub duration: Duration,
    /// Nothing was done: another replica syncs this token now (who, as the database
    /// reports it). Not a failure; this replica tries again on its next run.
    pub held_by: Option<String>,
}

/// Progress callback for a terminal: (token, pages, records) so far in this run.
pub type Progress = std::sync::Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Why a full re-fetch starts in this run, if one does: `adesync run --once --full`, or
/// the token's `full_fetch` schedule came due since the last completed full fetch. A
/// fetch already in progress simply continues.
fn full_fetch_due(
    token: &TokenConfig,
    state: &SyncState,
    force: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<&'static str> {
    if state.cursor.phase != Phase::Sync {
        return None;
    }
    if force {
        return Some("requested");
    }
    let last = state
        .last_full_fetch_at
        .as_deref()
        .or(state.last_success_at.as_deref())
        .and_then(crate::model::parse_time)?;
    token
        .full_fetch
        .as_ref()
        .is_some_and(|f| f.due(last, now))
        .then_some("scheduled by full_fetch")
}

/// Settings for the Apple client of one token.
pub fn client_settings(config: &Config, token: &TokenConfig) -> ClientSettings {
    ClientSettings {
        base_url: token.api_url.clone(),
        user_agent: token.user_agent.clone(),
        protocol_version: token.protocol_version,
        timeout: config.request_timeout,
        retry: config.retry.clone(),
        max_response_bytes: config.max_response_bytes,
    }
}

/// Runs one pass for one token and records its outcome in the store.
pub async fn run_token(
    config: &Config,
    token: &TokenConfig,
    progress: Option<Progress>,
) -> Result<RunSummary, SyncError> {
    run_token_cancellable(config, token, progress, &CancellationToken::new()).await
}

/// [`run_token`] that stops between pages when `cancel` fires: pages already handed to
/// the writer are committed, the request in flight is dropped, and the run ends with
/// [`SyncError::Cancelled`] (not recorded as a failure).
pub async fn run_token_cancellable(
    config: &Config,
    token: &TokenConfig,
    progress: Option<Progress>,
    cancel: &CancellationToken,
) -> Result<RunSummary, SyncError> {
    run_token_with(config, token, progress, cancel, false).await
}

/// [`run_token_cancellable`], with `force_full`: start a full re-fetch now (unless one
/// is already in progress), whatever the token's `full_fetch` schedule says.
pub async fn run_token_with(
    config: &Config,
    token: &TokenConfig,
    progress: Option<Progress>,
    cancel: &CancellationToken,
    force_full: bool,
) -> Result<RunSummary, SyncError> {
    let started = Instant::now();
    let db = config.database.clone();
    let name = token.name.clone();
    // The connection that holds the token (PostgreSQL) once the pass is over, so the
    // outcome is recorded while this replica still owns the token.
    let mut owner: Option<Store> = None;
    let result = run_inner(
        config, token, progress, started, cancel, force_full, &mut owner,
    )
    .await;
    if matches!(result, Err(SyncError::Cancelled))
        || matches!(&result, Ok(s) if s.held_by.is_some())
    {
        return result;
    }
    // Record the outcome; a failure to record is logged, not allowed to mask the result.
    let outcome = result
        .as_ref()
        .err()
        .map(|e| (e.kind().as_str().to_owned(), e.to_string()));
    let recorded = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        let mut store = match owner {
            Some(store) => store,
            None => Store::open(&db)?,
        };
        let now = format_time(chrono::Utc::now());
        store.record_run_end(
            &name,
            outcome.as_ref().map(|(k, m)| (k.as_str(), m.as_str())),
            &now,
        )
    })
    .await;
    match recorded {
        Ok(Err(e)) => {
            tracing::error!(token = %token.name, error = %e, "cannot record the run's outcome")
        }
        Err(e) => {
            tracing::error!(token = %token.name, error = %e, "cannot record the run's outcome")
        }
        Ok(Ok(())) => {}
    }
    result
}

async fn run_inner(
    config: &Config,
    token: &TokenConfig,
    progress: Option<Progress>,
    started: Instant,
    cancel: &CancellationToken,
    force_full: bool,
    owner_slot: &mut Option<Store>,
) -> Result<RunSummary, SyncError> {
    // The writer's connection takes the token first: on PostgreSQL another replica may be
    // syncing it, and then this one does nothing (not a failure).
    let db = config.database.clone();
    let name = token.name.clone();
    let (mut store, held_by) = blocking(move || -> Result<(Store, Option<String>), StoreError> {
        let mut store = Store::open(&db)?;
        let held_by = store.own_token(&name)?;
        Ok((store, held_by))
    })
    .await??;
    if let Some(holder) = held_by {
        return Ok(RunSummary {
            token: token.name.clone(),
            held_by: Some(holder),
            duration: started.elapsed(),
            ..RunSummary::default()
        });
    }
    // Re-read the token file every run, so a renewed token takes effect without a restart;
    // refuse an expired token before any call to Apple.
    let server_token = token.load_token()?;
    server_token.check_not_expired(&token.name, &token.token_file, chrono::Utc::now())?;
    let client = AppleClient::new(server_token.clone(), client_settings(config, token))?;
    // Expiry warnings, GET /account, the same-server guard; caps the page size.
    // Every wait is cancellable: a slow GET /account must not hold up a shutdown.
    let page_size = tokio::select! {
        r = checks::check(&client, &config.database, token, &server_token) => r?,
        _ = cancel.cancelled() => return Err(SyncError::Cancelled),
    };
    let token = &TokenConfig {
        page_size,
        ..token.clone()
    };

    let name = token.name.clone();
    let (store, state, has_devices) =
        blocking(move || -> Result<(Store, SyncState, bool), StoreError> {
            store.record_run_start(&name, &format_time(chrono::Utc::now()))?;
            let state = store.sync_state(&name)?;
            let has_devices = store.has_devices(&name)?;
            Ok((store, state, has_devices))
        })
        .await??;
    let mut initial = state.cursor.clone();
    let refetch = full_fetch_due(token, &state, force_full, chrono::Utc::now());

    // Two pages in flight at most: one being committed, one downloaded ahead.
    let (tx, rx) = writer::pipe(has_devices);
    let writer_token = token.name.clone();
    let writer = tokio::task::spawn_blocking(move || writer_loop(store, &writer_token, rx));

    let mut summary = RunSummary {
        token: token.name.clone(),
        ..RunSummary::default()
    };
    if let Some(why) = refetch {
        // A new full fetch from the beginning; its completion reconciles, as after an
        // expired cursor, and the changes it finds are what the sync cursor had missed.
        initial = CursorState {
            phase: Phase::Fetch,
            cursor: None,
            fetch_run: initial.fetch_run + 1,
        };
        tracing::info!(token = %token.name, reason = why,
            "full re-fetch: every device is read again and compared with the mirror; what the sync cursor missed is corrected and counted");
        tx.send(WriterMsg::Cursor(initial.clone())).await?;
        summary.full_refetch = true;
    }
    let driven = drive(
        &client,
        token,
        initial,
        &tx,
        &mut summary,
        progress.as_ref(),
        cancel,
    )
    .await;
    drop(tx);
    let written = writer.await.map_err(|e| SyncError::Writer(e.to_string()))?;
    // A writer error is the root cause when both failed (the driver saw a closed channel).
    let (stats, owner) = written?;
    summary.stats = stats;
    driven?;
    // Replacement details and profile assignment write through the connection that holds
    // the token, so a replica that lost it can write nothing more.
    let pass = PassStore::owned(config.database.clone(), owner);
    if token.protocol_version >= 10 {
        summary.replacements = replacements(&client, token, cancel, &pass).await;
    }
    if !rules_for(config, &token.name).is_empty() && !cancel.is_cancelled() {
        // Assignment never fails the sync: its error is logged and the pass runs again
        // after the next sync.
        match assign_token_on(config, token, &client, pass.clone()).await {
            Ok(a) => summary.assigned = a,
            Err(e) => {
                tracing::error!(token = %token.name, error = %e, "profile assignment failed; it runs again after the next sync");
                summary.assign_error = Some(e.to_string());
            }
        }
    }
    summary.duration = started.elapsed();
    // The token stays this replica's until its outcome is recorded.
    *owner_slot = pass.into_owner();
    Ok(summary)
}

/// The connection a pass writes through after its pages: the one that holds the token
/// (on PostgreSQL its lock is the fence, see `Store::own_token`), or a fresh one per write
/// when there is none (a pass started outside a sync, e.g. by a test).
#[derive(Clone)]
pub struct PassStore {
    db: crate::config::Database,
    owner: Option<std::sync::Arc<std::sync::Mutex<Store>>>,
}

impl PassStore {
    /// Writes through `owner`, the connection holding the token.
    pub fn owned(db: crate::config::Database, owner: Store) -> Self {
        PassStore {
            db,
            owner: Some(std::sync::Arc::new(std::sync::Mutex::new(owner))),
        }
    }

    /// Opens a connection for each write.
    pub fn fresh(db: crate::config::Database) -> Self {
        PassStore { db, owner: None }
    }

    /// Runs `f` on the store (call it from a blocking thread).
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &self.owner {
            Some(s) => f(&mut s.lock().unwrap_or_else(|e| e.into_inner())),
            None => f(&mut Store::open(&self.db)?),
        }
    }

    /// The owning connection back, when this is the last handle to it.
    pub fn into_owner(self) -> Option<Store> {
        let owner = std::sync::Arc::try_unwrap(self.owner?).ok()?;
        Some(owner.into_inner().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Most replacement devices asked about per run; the rest wait for the next run.
const MAX_REPLACEMENT_LOOKUPS: usize = 200;

/// Asks Apple once what each new replacement device replaced (protocol 10,
/// docs/apple-dep-api.md §4.8) and stores the link. Best effort: a failure is logged and
/// the devices are asked about on the next run; it never fails the sync.
async fn replacements(
    client: &AppleClient,
    token: &TokenConfig,
    cancel: &CancellationToken,
    pass: &PassStore,
) -> u64 {
    let (c, name) = (pass.clone(), token.name.clone());
    let due = match blocking(move || c.with(|s| s.replacements_due(&name, MAX_REPLACEMENT_LOOKUPS)))
        .await
    {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::warn!(token = %token.name, error = %e, "cannot read replacement devices");
            return 0;
        }
        Err(e) => {
            tracing::warn!(token = %token.name, error = %e, "cannot read replacement devices");
            return 0;
        }
    };
    let mut done = 0;
    for serial in due {
        let details = tokio::select! {
            r = client.replacement_details(&serial) => r,
            _ = cancel.cancelled() => return done,
        };
        let details = match details {
            Ok(d) => d,
            // Refused for this device: not asked again, so it does not hold up the others.
            Err(e @ ApiError::Http { .. }) => {
                tracing::warn!(token = %token.name, serial = %crate::model::printable(&serial), error = %e,
                    "Apple refused a replacement device's details; it is not asked again");
                None
            }
            Err(e) => {
                tracing::warn!(token = %token.name, serial = %crate::model::printable(&serial), error = %e,
                    "cannot read a replacement device's details; asked again next run");
                return done;
            }
        };
        let (c, name) = (pass.clone(), token.name.clone());
        let saved = blocking(move || {
            let original = details.as_ref().and_then(|d| {
                d.original_device_serial_number
                    .as_deref()
                    .map(|o| (o, d.replacement_date.as_deref()))
            });
            c.with(|s| {
                s.save_replacement(&name, &serial, original, &format_time(chrono::Utc::now()))
            })
        })
        .await;
        if !matches!(saved, Ok(Ok(()))) {
            tracing::warn!(token = %token.name, "cannot store a replacement device's details");
            return done;
        }
        done += 1;
    }
    done
}

async fn drive(
    client: &AppleClient,
    token: &TokenConfig,
    mut state: CursorState,
    tx: &writer::Pipe,
    summary: &mut RunSummary,
    progress: Option<&Progress>,
    cancel: &CancellationToken,
) -> Result<(), SyncError> {
    let limit = token.page_size;
    let mut restarted = false;
    // A full fetch completed in this pass (a sync's EXHAUSTED_CURSOR then means "done").
    let mut fetch_done = false;
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    summary.fetched = state.phase == Phase::Fetch;
    loop {
        if cancel.is_cancelled() {
            return Err(SyncError::Cancelled);
        }
        let (kind, result): (Phase, Result<DevicePage, ApiError>) =
            match (&state.phase, &state.cursor) {
                (Phase::Fetch, c) => (
                    Phase::Fetch,
                    tokio::select! {
                        r = client.fetch_devices(c.as_deref(), limit) => r,
                        _ = cancel.cancelled() => return Err(SyncError::Cancelled),
                    },
                ),
                (Phase::Sync, Some(c)) => (
                    Phase::Sync,
                    tokio::select! {
                        r = client.sync_devices(c, limit) => r,
                        _ = cancel.cancelled() => return Err(SyncError::Cancelled),
                    },
                ),
                // A sync state without a cursor cannot be resumed: fetch.
                (Phase::Sync, None) => (
                    Phase::Sync,
                    Err(ApiError::Cursor {
                        endpoint: crate::apple::Endpoint::SyncDevices,
                        kind: CursorError::Required,
                    }),
                ),
            };
        let (next, page) = match result {
            Ok(page) => {
                // A cursor seen earlier in this pass with more_to_follow is a loop (the
                // known same-cursor bug, or a longer cycle): stop like the same-cursor case.
                let repeated = page.more_to_follow && !seen.insert(page.cursor.clone());
                let sent = if repeated {
                    Some(page.cursor.as_str())
                } else {
                    state.cursor.as_deref()
                };
                let outcome = Outcome::Page {
                    sent,
                    cursor: &page.cursor,
                    more: page.more_to_follow,
                };
                (
                    next_step(&state, kind, outcome, restarted, fetch_done),
                    Some(page),
                )
            }
            Err(ApiError::Cursor { kind: e, .. }) => {
                if e == CursorError::Exhausted && kind == Phase::Fetch {
                    tracing::debug!(token = %token.name, "fetch cursor exhausted; the fetch is complete, switching to sync");
                }
                let outcome = Outcome::CursorError(e);
                (
                    next_step(&state, kind, outcome, restarted, fetch_done),
                    None,
                )
            }
            Err(e) => return Err(e.into()),
        };
        let (s, completes_fetch, then) = match next {
            Next::StorePage {
                state: s,
                completes_fetch,
                then,
            } => (s, completes_fetch, then),
            Next::Transition { state: s, restart } => {
                if restart {
                    tracing::warn!(token = %token.name,
                        "Apple rejected the stored cursor; starting a full re-fetch (devices it does not return will be marked deleted)");
                    restarted = true;
                    summary.fetched = true;
                }
                tx.send(WriterMsg::Cursor(s.clone())).await?;
                state = s;
                continue;
            }
            Next::GiveUp(e) => return Err(SyncError::CursorLoop(e)),
            Next::Finish => return Ok(()),
        };
        let (records, fetched_until, unreadable) = match page {
            Some(page) => {
                summary.pages += 1;
                summary.records += page.devices.len() as u64;
                if let Some(p) = progress {
                    p(&token.name, summary.pages, summary.records);
                }
                tracing::debug!(token = %token.name, ?kind, devices = page.devices.len(), more = page.more_to_follow, "page received");
                if !page.refused.is_empty() {
                    summary.refused += page.refused.len() as u64;
                    tracing::warn!(token = %token.name, refused = page.refused.len(), first = %page.refused[0],
                        "Apple sent device records that cannot be stored; they were skipped and the rest of the page was stored. If a device is missing, check it in Apple Business/School Manager");
                }
                (
                    dedupe_latest(page.devices),
                    page.fetched_until,
                    page.unreadable_serials,
                )
            }
            None => (Vec::new(), None, Vec::new()),
        };
        fetch_done |= completes_fetch;
        tx.send(WriterMsg::Page {
            kind,
            prepared: tx.prepare(kind, &records),
            records,
            state: s.clone(),
            fetched_until,
            completes_fetch,
            unreadable,
        })
        .await?;
        state = s;
        match then {
            Then::Continue => continue,
            Then::Done => return Ok(()),
            Then::StopSameCursor => {
                tracing::warn!(token = %token.name,
                    "Apple returned a cursor it had already returned, with more_to_follow=true (a known Apple bug); stopping this pass, the next run continues from the stored cursor");
                summary.stopped_on_same_cursor = true;
                return Ok(());
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SyncError::Writer(e.to_string()))
}

/// Result of syncing every configured token once.
#[derive(Debug, Default)]
pub struct OnceReport {
    /// Successful passes.
    pub ok: Vec<RunSummary>,
    /// Failed passes: token name and error.
    pub failed: Vec<(String, SyncError)>,
    /// Organisation accounts walked.
    pub org_ok: Vec<OrgRunSummary>,
    /// Organisation accounts that failed: name and error.
    pub org_failed: Vec<(String, OrgSyncError)>,
}

impl OnceReport {
    /// Tokens and accounts that ran.
    pub fn ran(&self) -> usize {
        self.ok.len() + self.failed.len() + self.org_ok.len() + self.org_failed.len()
    }

    /// Tokens and accounts that failed.
    pub fn failures(&self) -> usize {
        self.failed.len() + self.org_failed.len()
    }
}

/// How many tokens sync at the same time, in `run --once` and in the daemon.
pub(crate) const MAX_CONCURRENT_TOKENS: usize = 4;

/// Syncs every token once, concurrently (bounded); one failing token never stops the others.
pub async fn run_all_once(config: &Config, progress: Option<Progress>) -> OnceReport {
    run_all_once_with(config, progress, &OnceOptions::default()).await
}

/// What `adesync run --once` was asked for besides the config.
#[derive(Clone, Debug, Default)]
pub struct OnceOptions {
    /// Only this token (`--token`).
    pub only: Option<String>,
    /// A full re-fetch of each token now (`--full`).
    pub full: bool,
    /// Stops every pass between pages (SIGTERM); committed pages are kept.
    pub cancel: CancellationToken,
}

/// [`run_all_once`] with options. A pass stopped by `cancel` is reported as failed with
/// [`SyncError::Cancelled`].
pub async fn run_all_once_with(
    config: &Config,
    progress: Option<Progress>,
    options: &OnceOptions,
) -> OnceReport {
    use futures_util::stream::{self, StreamExt};
    // Create and migrate the database before the passes run side by side: two first opens
    // of a new file at once would race to set it up (WAL mode, the schema). A failure is
    // left for each pass to report.
    let db = config.database.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || Store::open(&db).map(drop)).await {
        tracing::debug!(error = %e, "opening the database before the passes failed");
    }
    let tokens = config
        .tokens
        .iter()
        .filter(|t| options.only.as_deref().is_none_or(|o| o == t.name));
    let token_runs = stream::iter(tokens)
        .map(|t| {
            let progress = progress.clone();
            async move {
                let r = run_token_with(config, t, progress, &options.cancel, options.full).await;
                (t.name.clone(), r)
            }
        })
        .buffer_unordered(MAX_CONCURRENT_TOKENS)
        .collect::<Vec<(String, Result<RunSummary, SyncError>)>>();
    let accounts = config
        .org_accounts
        .iter()
        .filter(|a| options.only.as_deref().is_none_or(|o| o == a.name));
    let account_runs = stream::iter(accounts)
        .map(|a| async move {
            (
                a.name.clone(),
                run_account(config, a, &options.cancel).await,
            )
        })
        .buffer_unordered(MAX_CONCURRENT_TOKENS)
        .collect::<Vec<(String, Result<OrgRunSummary, OrgSyncError>)>>();
    let (results, org_results) = tokio::join!(token_runs, account_runs);
    let mut report = OnceReport::default();
    for (name, r) in org_results {
        match r {
            Ok(s) => report.org_ok.push(s),
            Err(e) => {
                tracing::error!(account = %name, error = %e, "organisation walk failed");
                report.org_failed.push((name, e));
            }
        }
    }
    report.org_ok.sort_by(|a, b| a.account.cmp(&b.account));
    report.org_failed.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, r) in results {
        match r {
            Ok(s) => {
                log_summary(&s);
                report.ok.push(s);
            }
            Err(e) => {
                tracing::error!(token = %name, error = %e, "sync failed");
                report.failed.push((name, e));
            }
        }
    }
    report.ok.sort_by(|a, b| a.token.cmp(&b.token));
    report.failed.sort_by(|a, b| a.0.cmp(&b.0));
    report
}

/// The one summary line per token run.
pub(crate) fn log_summary(s: &RunSummary) {
    if let Some(holder) = &s.held_by {
        tracing::info!(token = %s.token, held_by = %holder, "another replica is syncing this token; skipped");
        return;
    }
    tracing::info!(
        token = %s.token,
        pages = s.pages,
        devices = s.records,
        added = s.stats.added,
        modified = s.stats.modified,
        deleted = s.stats.deleted,
        full_fetch = s.fetched,
        duration_ms = s.duration.as_millis() as u64,
        "sync complete"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_unreadable_for_want_of_file_descriptors_is_not_a_job_for_an_admin() {
        let read = |errno| {
            SyncError::Token(TokenError::Read {
                path: "/etc/adesync/acme.json".into(),
                source: std::io::Error::from_raw_os_error(errno),
            })
        };
        let emfile = read(24);
        assert_eq!(emfile.kind(), ErrorKind::LocalResource);
        assert!(
            !emfile.needs_admin(),
            "too many open files heals without a new token"
        );
        let missing = read(2);
        assert_eq!(missing.kind(), ErrorKind::TokenFile);
        assert!(missing.needs_admin());
    }
}
