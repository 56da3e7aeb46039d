//! Per-token sync state: where each token stands in Apple's cursor protocol, and the
//! history of its runs (`sync_state` table).

use rusqlite::{params, Connection, OptionalExtension};

use super::{Store, StoreError};
use crate::model::Phase;

/// Where a token stands in Apple's cursor protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorState {
    /// Fetch or sync.
    pub phase: Phase,
    /// The cursor to send next (`None`: start a fetch from the beginning).
    pub cursor: Option<String>,
    /// Number of the current/last full fetch; the devices it returns are recorded under
    /// it in `fetch_seen`.
    pub fetch_run: i64,
}

/// A token's stored sync state and history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncState {
    /// The token's name.
    pub token_name: String,
    /// The cursor position.
    pub cursor: CursorState,
    /// When the cursor was stored (its age matters: Apple expires cursors after 7 days).
    pub cursor_at: Option<String>,
    /// Apple's progress marker from the last page.
    pub fetched_until: Option<String>,
    /// When the last run started.
    pub last_run_at: Option<String>,
    /// When the last successful run ended.
    pub last_success_at: Option<String>,
    /// The last run's error, if it failed.
    pub last_error: Option<String>,
    /// A stable name for the last error's kind.
    pub last_error_kind: Option<String>,
    /// When it failed.
    pub last_error_at: Option<String>,
    /// When the last full fetch completed.
    pub last_full_fetch_at: Option<String>,
    /// How many changes (events) that full fetch found.
    pub last_full_fetch_changes: Option<i64>,
}

impl SyncState {
    /// The state of a token never synced: a full fetch from the beginning.
    pub(super) fn new(token: &str) -> Self {
        SyncState {
            token_name: token.to_owned(),
            cursor: CursorState {
                phase: Phase::Fetch,
                cursor: None,
                fetch_run: 1,
            },
            cursor_at: None,
            fetched_until: None,
            last_run_at: None,
            last_success_at: None,
            last_error: None,
            last_error_kind: None,
            last_error_at: None,
            last_full_fetch_at: None,
            last_full_fetch_changes: None,
        }
    }
}

pub(super) fn upsert_state(
    conn: &Connection,
    token: &str,
    next: &CursorState,
    fetched_until: Option<&str>,
    now: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO sync_state (token_name, phase, cursor, fetch_run, cursor_at, fetched_until)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (token_name) DO UPDATE SET phase = excluded.phase, cursor = excluded.cursor,
             fetch_run = excluded.fetch_run, cursor_at = excluded.cursor_at,
             fetched_until = COALESCE(excluded.fetched_until, sync_state.fetched_until),
             -- A fetch starting from the beginning starts its count of changes afresh.
             fetch_changes = CASE WHEN excluded.phase = 'fetch' AND excluded.cursor IS NULL
                                  THEN 0 ELSE sync_state.fetch_changes END",
    )?
    .execute(params![
        token,
        next.phase.as_str(),
        next.cursor,
        next.fetch_run,
        now,
        fetched_until
    ])
    .map(drop)
}

impl Store {
    /// The token's sync state; a fresh one if never synced.
    pub fn sync_state(&self, token: &str) -> Result<SyncState, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.sync_state(token);
        }
        let row = self
            .conn()?
            .query_row(
                "SELECT phase, cursor, fetch_run, cursor_at, fetched_until, last_run_at,
                        last_success_at, last_error, last_error_kind, last_error_at,
                        last_full_fetch_at, last_full_fetch_changes
                 FROM sync_state WHERE token_name = ?1",
                [token],
                |r| {
                    Ok(SyncState {
                        token_name: token.to_owned(),
                        cursor: CursorState {
                            phase: Phase::parse(&r.get::<_, String>(0)?),
                            cursor: r.get(1)?,
                            fetch_run: r.get(2)?,
                        },
                        cursor_at: r.get(3)?,
                        fetched_until: r.get(4)?,
                        last_run_at: r.get(5)?,
                        last_success_at: r.get(6)?,
                        last_error: r.get(7)?,
                        last_error_kind: r.get(8)?,
                        last_error_at: r.get(9)?,
                        last_full_fetch_at: r.get(10)?,
                        last_full_fetch_changes: r.get(11)?,
                    })
                },
            )
            .optional()
            .map_err(self.err("read sync state"))?;
        Ok(row.unwrap_or_else(|| SyncState::new(token)))
    }

    /// Every token with stored state, by name.
    pub fn sync_states(&self) -> Result<Vec<SyncState>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.sync_states();
        }
        let names: Vec<String> = {
            let mut stmt = self
                .conn()?
                .prepare("SELECT token_name FROM sync_state ORDER BY token_name")
                .map_err(self.err("list sync state"))?;
            let rows = stmt
                .query_map([], |r| r.get(0))
                .and_then(|it| it.collect::<Result<Vec<String>, _>>());
            rows.map_err(self.err("list sync state"))?
        };
        names.iter().map(|n| self.sync_state(n)).collect()
    }

    /// Records the start of a run.
    pub fn record_run_start(&mut self, token: &str, now: &str) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.record_run_start(token, now);
        }
        self.conn()?
            .execute(
                "INSERT INTO sync_state (token_name, last_run_at) VALUES (?1, ?2)
                 ON CONFLICT (token_name) DO UPDATE SET last_run_at = excluded.last_run_at",
                params![token, now],
            )
            .map(drop)
            .map_err(self.err("record run start"))
    }

    /// Records the outcome of a run: `error` is `None` on success.
    pub fn record_run_end(
        &mut self,
        token: &str,
        error: Option<(&str, &str)>,
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.record_run_end(token, error, now);
        }
        let result = match error {
            None => self.conn()?.execute(
                "INSERT INTO sync_state (token_name, last_success_at) VALUES (?1, ?2)
                 ON CONFLICT (token_name) DO UPDATE SET last_success_at = excluded.last_success_at,
                     last_error = NULL, last_error_kind = NULL, last_error_at = NULL",
                params![token, now],
            ),
            Some((kind, message)) => self.conn()?.execute(
                "INSERT INTO sync_state (token_name, last_error, last_error_kind, last_error_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (token_name) DO UPDATE SET last_error = excluded.last_error,
                     last_error_kind = excluded.last_error_kind, last_error_at = excluded.last_error_at",
                params![token, message, kind, now],
            ),
        };
        result.map(drop).map_err(self.err("record run result"))
    }
}

/// Counts a fetch page's changes into the fetch in progress; when the page completes the
/// fetch, records its time and total (reconciliation's deletions included).
pub(super) fn count_fetch_changes(
    conn: &Connection,
    token: &str,
    changes: u64,
    completes: bool,
    now: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE sync_state SET fetch_changes = fetch_changes + ?2 WHERE token_name = ?1",
    )?
    .execute(params![token, changes as i64])?;
    if completes {
        conn.prepare_cached(
            // Only a fetch over a mirror that had completed one before counts its changes
            // as missed by the cursor (the first fetch's devices are the mirror's start).
            "UPDATE sync_state SET last_full_fetch_at = ?2,
                 last_full_fetch_changes = CASE WHEN last_full_fetch_at IS NULL THEN NULL
                                                ELSE fetch_changes END,
                 fetch_changes = 0
             WHERE token_name = ?1",
        )?
        .execute(params![token, now])?;
    }
    Ok(())
}
