//! All SQL: the SQLite mirror of Apple's devices, the change events and the per-token
//! sync state. Event delivery's SQL (sink cursors, retention) is in `store/sinks.rs`.
//!
//! Key invariant: [`Store::apply_page`] (and [`Batch`]) write one page's device rows, the
//! events they cause and the cursor that follows the page in ONE transaction. The stored cursor
//! therefore never runs ahead of stored data: a crash at any instant leaves the store
//! equal to a prefix of Apple's truth, and the next run resumes from the last committed
//! page. Events are derived by comparing the stored row with the incoming record, so a
//! page applied twice (a re-fetch, or Apple repeating itself) emits nothing the second time.
//!
//! This code is synchronous rusqlite; async callers reach it through
//! `tokio::task::spawn_blocking` (see `syncer.rs`), never on the executor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::{Map, Value};

pub use crate::events::StoredEvent;
use crate::events::{decide, Decision, Known};
use crate::model::{Device, DeviceRecord, EventKind, Phase, DEVICE_FIELDS};

mod sinks;
pub use sinks::SinkState;

mod accounts;
pub use accounts::{StoredAccount, TokenFootprint};

/// Schema migrations, applied in order against `PRAGMA user_version`.
/// Never edit one that has shipped; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: devices, events, per-token sync state, sink cursors.
    r#"
    CREATE TABLE devices (
        -- Stable (an alias of the rowid survives VACUUM): fetch_seen refers to it.
        id                   INTEGER PRIMARY KEY,
        token_name           TEXT NOT NULL,
        serial_number        TEXT NOT NULL,
        model                TEXT,
        description          TEXT,
        color                TEXT,
        asset_tag            TEXT,
        profile_status       TEXT,
        profile_uuid         TEXT,
        profile_assign_time  TEXT,
        profile_push_time    TEXT,
        device_assigned_date TEXT,
        device_assigned_by   TEXT,
        os                   TEXT,
        device_family        TEXT,
        -- Apple fields beyond the named columns, as sent (NULL when none). Together with
        -- the columns this is the device's raw JSON.
        extra_json           TEXT,
        -- op_date of the newest sync record applied; older records are ignored.
        last_op_date         TEXT,
        first_seen_at        TEXT NOT NULL,
        updated_at           TEXT NOT NULL,
        deleted_at           TEXT,
        -- A rowid table with the key in its own index: Apple's serials arrive in random
        -- order, and random inserts into a small index are far cheaper than into a
        -- WITHOUT ROWID table whose B-tree holds whole rows (measured: 2.4x, BENCHMARKS.md).
        UNIQUE (token_name, serial_number)
    );
    CREATE INDEX devices_alive ON devices (token_name, deleted_at);

    -- Which devices the current full fetch of a token has returned so far: a bitmap of
    -- device ids, 16,384 per chunk. A completed fetch marks every other device of the
    -- token deleted (reconciliation) and clears the token's chunks. A bitmap rather than a
    -- mark on each device row: a re-fetch of a million unchanged devices then rewrites
    -- about 60 small rows per page instead of a thousand random device rows (BENCHMARKS.md).
    CREATE TABLE fetch_seen (
        token_name TEXT NOT NULL,
        fetch_run  INTEGER NOT NULL,
        chunk      INTEGER NOT NULL,
        bits       BLOB NOT NULL,
        UNIQUE (token_name, fetch_run, chunk)
    );

    CREATE TABLE events (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        token_name    TEXT NOT NULL,
        serial_number TEXT NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('added', 'modified', 'deleted')),
        -- `modified` events: {"field": [old, new]} for the changed fields. NULL for
        -- `added`/`deleted`, whose changes are every field of device_json ([null, value]
        -- and [value, null]) and are derived from it when read: storing them twice
        -- doubled the size of a first fetch's events (BENCHMARKS.md).
        changes       TEXT,
        occurred_at   TEXT NOT NULL,
        -- The device the event describes, as stored right after it (for `deleted`, the
        -- last record before it left): [serial_number, the named columns in order,
        -- extra_json], so an event delivered or replayed days later carries the record it
        -- describes, not a later one.
        device_json   TEXT NOT NULL
    );
    -- By token only: per-token inserts land at the end of the index. An index on the serial
    -- number would take a random insert per event (the events of a page touch hundreds of
    -- index pages); a device's history scans its token's events instead.
    CREATE INDEX events_token ON events (token_name);

    CREATE TABLE sync_state (
        token_name      TEXT PRIMARY KEY,
        phase           TEXT NOT NULL DEFAULT 'fetch' CHECK (phase IN ('fetch', 'sync')),
        cursor          TEXT,
        cursor_at       TEXT,
        fetch_run       INTEGER NOT NULL DEFAULT 1,
        fetched_until   TEXT,
        last_run_at     TEXT,
        last_success_at TEXT,
        last_error      TEXT,
        last_error_kind TEXT,
        last_error_at   TEXT
    );

    -- Per token: the MDM server Apple's GET /account reports (the server_uuid guards
    -- against mixing two servers' devices under one name), and which token-expiry
    -- warning was last logged, so each threshold is logged once (see account.rs).
    CREATE TABLE accounts (
        token_name         TEXT PRIMARY KEY,
        server_name        TEXT,
        server_uuid        TEXT,
        org_name           TEXT,
        org_type           TEXT,    -- Apple's value: 'org' (ABM) or 'edu' (ASM)
        org_id             TEXT,
        admin_id           TEXT,
        page_limit_max     INTEGER, -- smallest urls[].limit.maximum of fetch and sync
        consumer_key       TEXT,    -- identifies the server's token; not a secret
        checked_at         TEXT,    -- when GET /account last answered
        token_expiry       TEXT,    -- expiry of the token the warning below is about
        expiry_warned_days INTEGER  -- last threshold (30, 14, 7, 3, 1) warned about
    );

    CREATE TABLE sink_cursors (
        sink_name     TEXT PRIMARY KEY,
        last_event_id INTEGER NOT NULL DEFAULT 0,
        -- Delivery health, for `adesync sinks`, `status` and /metrics (see sinks/mod.rs).
        last_delivered_at TEXT,
        last_error        TEXT,
        last_error_at     TEXT,
        -- Set when the receiver refused a batch for good (a 4xx): the sink waits, so
        -- nothing is skipped, until `adesync sinks resume` clears it.
        parked_at         TEXT,
        -- The receiver's Retry-After: no delivery to this sink before then.
        retry_at          TEXT
    );
    "#,
];

/// A storage failure. Names the database file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database {path}: {action}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The database is newer than this program.
    #[error("database {path} has schema version {found}, newer than this adesync knows ({known}); upgrade adesync")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        known: i64,
    },
    /// The database was created by a pre-release build whose first schema differed.
    #[error("database {path} was created by a pre-release adesync with an older layout that this version cannot upgrade; deliver any pending events with that build (adesync run --once), then move the file aside: the next run rebuilds the mirror with a full fetch from Apple")]
    PreRelease {
        /// The database file.
        path: PathBuf,
    },
    /// The parent folder could not be created.
    #[error("cannot create the folder for database {path}: {source}")]
    CreateDir {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

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
}

/// One page to write.
#[derive(Debug)]
pub struct PageWrite<'a> {
    /// Token the page belongs to.
    pub token: &'a str,
    /// Fetch or sync page.
    pub kind: Phase,
    /// Records, already de-duplicated by serial (see `model::dedupe_latest`).
    pub records: &'a [DeviceRecord],
    /// The cursor state to store with the page.
    pub next: CursorState,
    /// Apple's `fetched_until`.
    pub fetched_until: Option<&'a str>,
    /// The page completes a full fetch: devices the fetch did not return are deleted.
    pub completes_fetch: bool,
    /// Timestamp for rows and events.
    pub now: &'a str,
}

/// What a page changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    /// `added` events written.
    pub added: u64,
    /// `modified` events written.
    pub modified: u64,
    /// `deleted` events written.
    pub deleted: u64,
    /// Records that changed nothing.
    pub unchanged: u64,
    /// Sync records older than what is stored, ignored.
    pub stale: u64,
}

impl PageStats {
    /// Adds another page's counts.
    pub fn add(&mut self, o: PageStats) {
        self.added += o.added;
        self.modified += o.modified;
        self.deleted += o.deleted;
        self.unchanged += o.unchanged;
        self.stale += o.stale;
    }
    /// Events written.
    pub fn events(&self) -> u64 {
        self.added + self.modified + self.deleted
    }
}

/// A stored device with its bookkeeping.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredDevice {
    /// Token it belongs to.
    pub token_name: String,
    /// Apple's fields.
    pub device: Device,
    /// When adesync first stored it.
    pub first_seen_at: String,
    /// When a field last changed.
    pub updated_at: String,
    /// When it was removed from the server (None while assigned).
    pub deleted_at: Option<String>,
}

/// Filters for [`Store::devices`].
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    /// Only this token.
    pub token: Option<String>,
    /// Only this serial number.
    pub serial: Option<String>,
    /// Include deleted devices (`Some(true)`: only deleted).
    pub deleted: Option<bool>,
    /// Only this `profile_status`.
    pub profile_status: Option<String>,
    /// Only this model (case-insensitive).
    pub model: Option<String>,
    /// Only this `device_family` (case-insensitive).
    pub family: Option<String>,
    /// At most this many.
    pub limit: Option<u64>,
}

/// The SQLite store. One per connection; open one per thread that needs it.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// An open write transaction holding whole pages, in cursor order.
///
/// Each page's rows, events and the cursor that follows it are written together, so
/// whatever commits is a prefix of Apple's answer that ends on a page boundary with its
/// cursor. Several consecutive pages may share one commit (group commit): Apple's serials
/// arrive in random order, so each commit rewrites hundreds of index pages, and sharing
/// them between pages is the largest saving on a large fetch (BENCHMARKS.md). A crash
/// loses at most the uncommitted pages, and their cursor with them; the next run fetches
/// them again.
pub struct Batch<'a> {
    tx: rusqlite::Transaction<'a>,
    path: &'a Path,
}

impl Batch<'_> {
    fn wrap(&self, action: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.to_owned(),
            action,
            source,
        }
    }

    /// Writes one page: device rows, their events and the next cursor.
    pub fn apply_page(&self, page: &PageWrite<'_>) -> Result<PageStats, StoreError> {
        write_page(&self.tx, page).map_err(self.wrap("write page"))
    }

    /// Stores a cursor transition that comes with no page (see [`Store::set_cursor`]).
    pub fn set_cursor(&self, token: &str, next: &CursorState, now: &str) -> Result<(), StoreError> {
        upsert_state(&self.tx, token, next, None, now).map_err(self.wrap("store cursor"))
    }

    /// Commits every page written to this batch.
    pub fn commit(self) -> Result<(), StoreError> {
        let path = self.path.to_owned();
        self.tx.commit().map_err(|source| StoreError::Sqlite {
            path,
            action: "commit pages",
            source,
        })
    }
}

const DEVICE_COLUMNS: &str =
    "serial_number, model, description, color, asset_tag, profile_status, \
    profile_uuid, profile_assign_time, profile_push_time, device_assigned_date, \
    device_assigned_by, os, device_family, extra_json";

impl Store {
    /// Opens the database when it exists; `None` when there is none yet (nothing synced).
    pub fn open_if_exists(path: &Path) -> Result<Option<Self>, StoreError> {
        if !path.exists() {
            return Ok(None);
        }
        Self::open(path).map(Some)
    }

    /// Opens (creating if missing) and migrates the database.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                path: path.to_owned(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Sqlite {
            path: path.to_owned(),
            action: "open",
            source,
        })?;
        let mut store = Store {
            conn,
            path: path.to_owned(),
        };
        store.configure()?;
        store.migrate()?;
        Ok(store)
    }

    fn err(&self, action: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            action,
            source,
        }
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        // Room for every statement a page write prepares (see write_page), so none is
        // re-prepared per page.
        self.conn.set_prepared_statement_cache_capacity(32);
        // WAL lets readers (the CLI) run beside the writer. synchronous=NORMAL in WAL mode
        // keeps the database consistent on power loss; the last commits may be lost, and
        // they are re-fetched from Apple because the cursor commits with them.
        self.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA cache_size = -32768;
                 PRAGMA wal_autocheckpoint = 65536;
                 PRAGMA temp_store = MEMORY;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 30000;",
            )
            .map_err(self.err("configure"))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err("read schema version"))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path,
                found: version,
                known,
            });
        }
        // Migration 1 changed before the first release (devices.id, fetch_seen, events'
        // snapshots); a database made by an earlier build says version 1 but lacks them.
        if version >= 1 {
            let current: bool = self
                .conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'fetch_seen')",
                    [],
                    |r| r.get(0),
                )
                .map_err(self.err("read schema"))?;
            if !current {
                return Err(StoreError::PreRelease { path });
            }
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    action: "migrate",
                    source,
                })?;
            // Another process opening the same new database (the daemon and a CLI
            // command at once) may have applied it while this one waited for the lock.
            let current: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    action: "migrate",
                    source,
                })?;
            if current > i as i64 {
                continue;
            }
            tx.execute_batch(sql)
                .and_then(|_| tx.pragma_update(None, "user_version", (i + 1) as i64))
                .and_then(|_| tx.commit())
                .map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    action: "migrate",
                    source,
                })?;
        }
        Ok(())
    }

    /// Forces committed transactions to disk (a WAL checkpoint syncs the log first).
    pub fn make_durable(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(self.err("flush to disk"))
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err("read schema version"))
    }

    /// The token's sync state; a fresh one if never synced.
    pub fn sync_state(&self, token: &str) -> Result<SyncState, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT phase, cursor, fetch_run, cursor_at, fetched_until, last_run_at,
                        last_success_at, last_error, last_error_kind, last_error_at
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
                    })
                },
            )
            .optional()
            .map_err(self.err("read sync state"))?;
        Ok(row.unwrap_or_else(|| SyncState {
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
        }))
    }

    /// Every token with stored state, by name.
    pub fn sync_states(&self) -> Result<Vec<SyncState>, StoreError> {
        let names: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT token_name FROM sync_state ORDER BY token_name")
                .map_err(self.err("list sync state"))?;
            let rows = stmt
                .query_map([], |r| r.get(0))
                .and_then(|it| it.collect::<Result<Vec<String>, _>>());
            rows.map_err(self.err("list sync state"))?
        };
        names.iter().map(|n| self.sync_state(n)).collect()
    }

    /// Stores a cursor transition that comes with no page (e.g. EXHAUSTED_CURSOR → sync,
    /// or an expired cursor → start a new full fetch).
    pub fn set_cursor(
        &mut self,
        token: &str,
        next: &CursorState,
        now: &str,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        upsert_state(&self.conn, token, next, None, now).map_err(|source| StoreError::Sqlite {
            path,
            action: "store cursor",
            source,
        })
    }

    /// Records the start of a run.
    pub fn record_run_start(&mut self, token: &str, now: &str) -> Result<(), StoreError> {
        self.conn
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
        let result = match error {
            None => self.conn.execute(
                "INSERT INTO sync_state (token_name, last_success_at) VALUES (?1, ?2)
                 ON CONFLICT (token_name) DO UPDATE SET last_success_at = excluded.last_success_at,
                     last_error = NULL, last_error_kind = NULL, last_error_at = NULL",
                params![token, now],
            ),
            Some((kind, message)) => self.conn.execute(
                "INSERT INTO sync_state (token_name, last_error, last_error_kind, last_error_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (token_name) DO UPDATE SET last_error = excluded.last_error,
                     last_error_kind = excluded.last_error_kind, last_error_at = excluded.last_error_at",
                params![token, message, kind, now],
            ),
        };
        result.map(drop).map_err(self.err("record run result"))
    }

    /// Writes one page: device rows, their events and the next cursor, atomically.
    pub fn apply_page(&mut self, page: &PageWrite<'_>) -> Result<PageStats, StoreError> {
        let batch = self.batch()?;
        let stats = batch.apply_page(page)?;
        batch.commit()?;
        Ok(stats)
    }

    /// Opens a write transaction that takes one or more consecutive pages (group commit,
    /// see [`Batch`]). Dropping it uncommitted rolls every page in it back.
    pub fn batch(&mut self) -> Result<Batch<'_>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                action: "begin a write",
                source,
            })?;
        Ok(Batch {
            tx,
            path: &self.path,
        })
    }

    /// Stored devices matching `filter`, by token then serial.
    pub fn devices(&self, filter: &DeviceFilter) -> Result<Vec<StoredDevice>, StoreError> {
        let mut sql = format!(
            "SELECT token_name, {DEVICE_COLUMNS}, first_seen_at, updated_at, deleted_at FROM devices WHERE 1=1"
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(t) = &filter.token {
            args.push(t.clone().into());
            sql.push_str(&format!(" AND token_name = ?{}", args.len()));
        }
        if let Some(s) = &filter.serial {
            args.push(s.clone().into());
            sql.push_str(&format!(" AND serial_number = ?{}", args.len()));
        }
        if let Some(s) = &filter.profile_status {
            args.push(s.clone().into());
            sql.push_str(&format!(" AND profile_status = ?{}", args.len()));
        }
        if let Some(s) = &filter.model {
            args.push(s.clone().into());
            sql.push_str(&format!(" AND model = ?{} COLLATE NOCASE", args.len()));
        }
        if let Some(s) = &filter.family {
            args.push(s.clone().into());
            sql.push_str(&format!(
                " AND device_family = ?{} COLLATE NOCASE",
                args.len()
            ));
        }
        match filter.deleted {
            None => sql.push_str(" AND deleted_at IS NULL"),
            Some(true) => sql.push_str(" AND deleted_at IS NOT NULL"),
            Some(false) => {}
        }
        sql.push_str(" ORDER BY token_name, serial_number");
        if let Some(l) = filter.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let mut stmt = self.conn.prepare(&sql).map_err(self.err("list devices"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| {
                Ok(StoredDevice {
                    token_name: r.get(0)?,
                    device: device_from_row(r, 1)?,
                    first_seen_at: r.get(15)?,
                    updated_at: r.get(16)?,
                    deleted_at: r.get(17)?,
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("list devices"))
    }

    /// Events with `id > after`, oldest first, each with the device as stored when the
    /// event was written (its snapshot; the current row if there is none).
    pub fn events_after(
        &self,
        after: i64,
        token: Option<&str>,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = "SELECT id, token_name, serial_number, kind, changes, occurred_at, device_json
             FROM events WHERE id > ?1 AND (?2 IS NULL OR token_name = ?2)
             ORDER BY id LIMIT ?3";
        let mut stmt = self
            .conn
            .prepare_cached(sql)
            .map_err(self.err("read events"))?;
        let rows = stmt
            .query_map(params![after, token, limit as i64], |r| {
                let kind_text: String = r.get(3)?;
                let kind = EventKind::parse(&kind_text).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        3,
                        rusqlite::types::Type::Text,
                        format!("unknown event kind {kind_text:?}").into(),
                    )
                })?;
                let changes: Option<String> = r.get(4)?;
                let device = sinks::decode_snapshot(&r.get::<_, String>(6)?);
                let changes = match (changes, &device, kind) {
                    (Some(text), _, _) => serde_json::from_str(&text).unwrap_or(Value::Null),
                    (None, Some(d), EventKind::Added) => crate::events::addition_changes(d),
                    (None, Some(d), EventKind::Deleted) => crate::events::removal_changes(d),
                    (None, _, _) => Value::Null,
                };
                Ok(StoredEvent {
                    id: r.get(0)?,
                    token_name: r.get(1)?,
                    serial_number: r.get(2)?,
                    kind,
                    changes,
                    occurred_at: r.get(5)?,
                    device,
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read events"))
    }

    /// Counts of stored devices per token: (assigned, deleted).
    pub fn device_counts(&self, token: &str) -> Result<(u64, u64), StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FILTER (WHERE deleted_at IS NULL), COUNT(*) FILTER (WHERE deleted_at IS NOT NULL)
                 FROM devices WHERE token_name = ?1",
                [token],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(self.err("count devices"))
    }

    /// Assigned devices by (token, profile_status); a missing status counts as "unknown".
    pub fn profile_status_counts(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT token_name, COALESCE(profile_status, 'unknown'), COUNT(*) FROM devices
                 WHERE deleted_at IS NULL GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .map_err(self.err("count devices"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("count devices"))
    }

    /// Events per token.
    pub fn event_counts_by_token(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT token_name, COUNT(*) FROM events GROUP BY 1 ORDER BY 1")
            .map_err(self.err("count events"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("count events"))
    }

    /// Number of events, optionally per kind, for a token.
    pub fn event_count(&self, token: Option<&str>) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM events WHERE (?1 IS NULL OR token_name = ?1)",
                [token],
                |r| r.get::<_, i64>(0).map(|n| n as u64),
            )
            .map_err(self.err("count events"))
    }

    /// The highest event id (0 when none).
    pub fn max_event_id(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))
            .map_err(self.err("read events"))
    }
}

fn upsert_state(
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
             fetched_until = COALESCE(excluded.fetched_until, sync_state.fetched_until)",
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

/// The stored state of one device, as needed to diff against an incoming record.
struct Existing {
    id: i64,
    /// The stored device; None when it equals the incoming record's device (compared in
    /// place while reading, so an unchanged device — most of a re-fetch — is never
    /// decoded).
    device: Option<Device>,
    last_op_date: Option<String>,
    deleted: bool,
}

impl Existing {
    /// The stored device (`incoming` when they are equal).
    fn device<'a>(&'a self, incoming: &'a Device) -> &'a Device {
        self.device.as_ref().unwrap_or(incoming)
    }
}

fn device_from_row(r: &rusqlite::Row<'_>, start: usize) -> rusqlite::Result<Device> {
    let mut d = Device {
        serial_number: r.get(start)?,
        ..Device::default()
    };
    for (i, f) in d.fields_mut().into_iter().enumerate() {
        *f = r.get(start + 1 + i)?;
    }
    let extra: Option<String> = r.get(start + 13)?;
    if let Some(text) = extra {
        if let Ok(Value::Object(m)) = serde_json::from_str(&text) {
            d.extra = m;
        }
    }
    Ok(d)
}

fn write_page(tx: &rusqlite::Transaction<'_>, page: &PageWrite<'_>) -> rusqlite::Result<PageStats> {
    let mut stats = PageStats::default();
    let existing = load_existing(tx, page.token, page.records)?;
    // Ids of the devices this page shows to be on the server, for reconciliation.
    let mut seen: Vec<i64> = Vec::new();
    // New devices: inserted together at the end of the page (see insert_many), with ids
    // given here so the page can record them as seen.
    let mut new_devices: Vec<(i64, &DeviceRecord, Option<String>)> = Vec::new();
    let mut next_id: Option<i64> = None;
    // By id (read with the stored row): no second index lookup. Two statements so that a
    // change to an assigned device does not rewrite its `devices_alive` entry.
    const SET_FIELDS: &str = "model = ?2, description = ?3, color = ?4, asset_tag = ?5,
             profile_status = ?6, profile_uuid = ?7, profile_assign_time = ?8,
             profile_push_time = ?9, device_assigned_date = ?10, device_assigned_by = ?11,
             os = ?12, device_family = ?13, extra_json = ?14,
             last_op_date = COALESCE(?15, last_op_date), updated_at = ?16";
    let mut update =
        tx.prepare_cached(&format!("UPDATE devices SET {SET_FIELDS} WHERE id = ?1"))?;
    let mut revive = tx.prepare_cached(&format!(
        "UPDATE devices SET {SET_FIELDS}, deleted_at = NULL WHERE id = ?1"
    ))?;
    let mut touch = tx.prepare_cached("UPDATE devices SET last_op_date = ?2 WHERE id = ?1")?;
    let mut mark_deleted = tx.prepare_cached(
        "UPDATE devices SET deleted_at = ?2, updated_at = ?2, last_op_date = COALESCE(?3, last_op_date)
         WHERE id = ?1",
    )?;
    let mut events = PageEvents::default();

    for rec in page.records {
        let serial = rec.device.serial_number.as_str();
        let old = existing.get(serial);
        let known = old.map(|o| Known {
            device: o.device.as_ref(),
            last_op_date: o.last_op_date.as_deref(),
            deleted: o.deleted,
        });
        // A record that changes nothing still brings a newer op_date to remember.
        let mut note_op_date = |o: &Existing| match &rec.op_date {
            Some(date) if Some(date) != o.last_op_date.as_ref() => {
                touch.execute(params![o.id, date]).map(drop)
            }
            _ => Ok(()),
        };
        let changes = match decide(known, rec) {
            Decision::Stale => {
                stats.stale += 1;
                continue;
            }
            Decision::AlreadyGone => {
                if let Some(o) = old {
                    note_op_date(o)?;
                }
                stats.unchanged += 1;
                continue;
            }
            Decision::Unchanged => {
                if let Some(o) = old {
                    note_op_date(o)?;
                    seen.push(o.id);
                }
                stats.unchanged += 1;
                continue;
            }
            Decision::Deleted => {
                if let Some(o) = old {
                    mark_deleted.execute(params![o.id, page.now, rec.op_date])?;
                    let stored = o.device(&rec.device);
                    events.push(
                        serial,
                        EventKind::Deleted,
                        None,
                        stored,
                        extra_json(stored).as_deref(),
                    );
                    stats.deleted += 1;
                }
                continue;
            }
            // `added` events store no changes: they are every field of the snapshot.
            Decision::Added { .. } => None,
            Decision::Modified(diff) => Some(Value::Object(diff).to_string()),
        };
        let kind = if changes.is_some() {
            EventKind::Modified
        } else {
            EventKind::Added
        };
        let d = &rec.device;
        let f = d.fields();
        let extra = extra_json(d);
        events.push(serial, kind, changes, d, extra.as_deref());
        let id = match old {
            None => {
                let id = match next_id {
                    Some(id) => id,
                    None => {
                        tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM devices", [], |r| {
                            r.get(0)
                        })?
                    }
                };
                next_id = Some(id + 1);
                new_devices.push((id, rec, extra));
                id
            }
            Some(o) => {
                let stmt = if o.deleted { &mut revive } else { &mut update };
                let values: Vec<&dyn rusqlite::ToSql> = [&o.id as &dyn rusqlite::ToSql]
                    .into_iter()
                    .chain(f.iter().map(|v| *v as &dyn rusqlite::ToSql))
                    .chain([&extra as &dyn rusqlite::ToSql, &rec.op_date, &page.now])
                    .collect();
                stmt.execute(rusqlite::params_from_iter(values))?;
                o.id
            }
        };
        seen.push(id);
        match kind {
            EventKind::Added => stats.added += 1,
            _ => stats.modified += 1,
        }
    }

    let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(new_devices.len() * 19);
    for (id, rec, extra) in &new_devices {
        values.extend([
            id as &dyn rusqlite::ToSql,
            &page.token,
            &rec.device.serial_number,
        ]);
        values.extend(rec.device.fields().map(|v| v as &dyn rusqlite::ToSql));
        values.extend([
            extra as &dyn rusqlite::ToSql,
            &rec.op_date,
            &page.now,
            &page.now,
        ]);
    }
    insert_many(
        tx,
        "devices (id, token_name, serial_number, model, description, color, asset_tag,
             profile_status, profile_uuid, profile_assign_time, profile_push_time,
             device_assigned_date, device_assigned_by, os, device_family, extra_json,
             last_op_date, first_seen_at, updated_at)",
        19,
        &values,
    )?;
    if page.kind == Phase::Fetch {
        mark_seen(tx, page.token, page.next.fetch_run, seen)?;
    }
    if page.completes_fetch {
        // Reconcile: the completed full fetch is Apple's whole membership; a device it did
        // not return left while we were not looking (e.g. during an expired cursor).
        let returned = load_seen(tx, page.token, page.next.fetch_run)?;
        let gone: Vec<i64> = tx
            .prepare_cached("SELECT id FROM devices WHERE token_name = ?1 AND deleted_at IS NULL")?
            .query_map([page.token], |r| r.get::<_, i64>(0))?
            .filter(|id| id.as_ref().map_or(true, |id| !returned.contains(*id)))
            .collect::<Result<_, _>>()?;
        let mut read = tx.prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
        ))?;
        for id in gone {
            let d = read.query_row([id], |r| device_from_row(r, 0))?;
            mark_deleted.execute(params![id, page.now, Option::<String>::None])?;
            events.push(
                &d.serial_number,
                EventKind::Deleted,
                None,
                &d,
                extra_json(&d).as_deref(),
            );
            stats.deleted += 1;
        }
        tx.execute("DELETE FROM fetch_seen WHERE token_name = ?1", [page.token])?;
    }

    events.insert(tx, page.token, page.now)?;
    upsert_state(tx, page.token, &page.next, page.fetched_until, page.now)?;
    Ok(stats)
}

/// A page's events, in record order; inserted together at the end of the page (see
/// [`insert_many`]), so ids follow record order.
#[derive(Default)]
struct PageEvents {
    /// (serial_number, kind, changes, device_json)
    rows: Vec<(String, EventKind, Option<String>, String)>,
}

impl PageEvents {
    /// `extra` is `d`'s `extra_json`, which the caller has already made.
    fn push(
        &mut self,
        serial: &str,
        kind: EventKind,
        changes: Option<String>,
        d: &Device,
        extra: Option<&str>,
    ) {
        let snapshot = sinks::encode_snapshot(d, extra);
        self.rows.push((serial.to_owned(), kind, changes, snapshot));
    }

    fn insert(
        self,
        tx: &rusqlite::Transaction<'_>,
        token: &str,
        now: &str,
    ) -> rusqlite::Result<()> {
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(self.rows.len() * 6);
        let kinds: Vec<&str> = self.rows.iter().map(|r| r.1.as_str()).collect();
        for ((serial, _, changes, snapshot), kind) in self.rows.iter().zip(&kinds) {
            values.extend([
                &token as &dyn rusqlite::ToSql,
                serial,
                kind,
                changes,
                &now,
                snapshot,
            ]);
        }
        insert_many(
            tx,
            "events (token_name, serial_number, kind, changes, occurred_at, device_json)",
            6,
            &values,
        )
    }
}

/// Bound values per multi-row INSERT (SQLite allows 32,766).
const VALUES_PER_INSERT: usize = 1_200;

/// `INSERT INTO {into} VALUES (..), (..), ..`: `values` holds whole rows of `width` values
/// each, many rows per statement. A page's rows inserted this way cost far less than one
/// statement per row (and an AUTOINCREMENT table updates its counter once per statement).
/// `OR ROLLBACK`: a failure undoes the whole transaction (the caller returns the error and
/// drops it anyway), so SQLite keeps no statement journal for a multi-row statement.
fn insert_many(
    tx: &rusqlite::Transaction<'_>,
    into: &str,
    width: usize,
    values: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<()> {
    let row = format!("({})", vec!["?"; width].join(", "));
    for chunk in values.chunks(VALUES_PER_INSERT / width * width) {
        let rows = vec![row.as_str(); chunk.len() / width].join(", ");
        tx.prepare_cached(&format!("INSERT OR ROLLBACK INTO {into} VALUES {rows}"))?
            .execute(rusqlite::params_from_iter(chunk))?;
    }
    Ok(())
}

/// Device ids per `fetch_seen` chunk (2 KiB of bits).
const SEEN_CHUNK_IDS: i64 = 16_384;

/// Records `ids` as returned by full fetch `run` of `token`.
fn mark_seen(
    tx: &rusqlite::Transaction<'_>,
    token: &str,
    run: i64,
    mut ids: Vec<i64>,
) -> rusqlite::Result<()> {
    ids.sort_unstable();
    let mut read = tx.prepare_cached(
        "SELECT bits FROM fetch_seen WHERE token_name = ?1 AND fetch_run = ?2 AND chunk = ?3",
    )?;
    let mut write = tx.prepare_cached(
        "INSERT INTO fetch_seen (token_name, fetch_run, chunk, bits) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (token_name, fetch_run, chunk) DO UPDATE SET bits = excluded.bits",
    )?;
    for group in ids.chunk_by(|a, b| a / SEEN_CHUNK_IDS == b / SEEN_CHUNK_IDS) {
        let chunk = group[0] / SEEN_CHUNK_IDS;
        let mut bits: Vec<u8> = read
            .query_row(params![token, run, chunk], |r| r.get(0))
            .optional()?
            .unwrap_or_default();
        bits.resize((SEEN_CHUNK_IDS / 8) as usize, 0);
        for id in group {
            let bit = (id % SEEN_CHUNK_IDS) as usize;
            bits[bit / 8] |= 1 << (bit % 8);
        }
        write.execute(params![token, run, chunk, bits])?;
    }
    Ok(())
}

/// The device ids full fetch `run` of `token` has returned (bounded: one bit per id).
struct SeenIds(HashMap<i64, Vec<u8>>);

impl SeenIds {
    fn contains(&self, id: i64) -> bool {
        let bit = (id % SEEN_CHUNK_IDS) as usize;
        self.0
            .get(&(id / SEEN_CHUNK_IDS))
            .and_then(|bits| bits.get(bit / 8))
            .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
    }
}

fn load_seen(tx: &rusqlite::Transaction<'_>, token: &str, run: i64) -> rusqlite::Result<SeenIds> {
    let mut stmt = tx.prepare_cached(
        "SELECT chunk, bits FROM fetch_seen WHERE token_name = ?1 AND fetch_run = ?2",
    )?;
    let chunks = stmt
        .query_map(params![token, run], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(SeenIds(chunks))
}

/// `extra_json` for a device: its extra fields as a JSON object, None when it has none.
fn extra_json(d: &Device) -> Option<String> {
    (!d.extra.is_empty()).then(|| Value::Object(d.extra.clone()).to_string())
}

/// Reads the stored rows for a page's serials in one statement.
fn load_existing(
    tx: &rusqlite::Transaction<'_>,
    token: &str,
    records: &[DeviceRecord],
) -> rusqlite::Result<HashMap<String, Existing>> {
    let incoming: HashMap<&str, &Device> = records
        .iter()
        .map(|r| (r.device.serial_number.as_str(), &r.device))
        .collect();
    let serials = serde_json::to_string(&incoming.keys().collect::<Vec<_>>())
        .expect("strings always serialise");
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS}, last_op_date, deleted_at, id FROM devices
         WHERE token_name = ?1 AND serial_number IN (SELECT value FROM json_each(?2))"
    ))?;
    let mut map = HashMap::with_capacity(records.len());
    let mut rows = stmt.query(params![token, serials])?;
    while let Some(r) = rows.next()? {
        let serial = r.get_ref(0)?.as_str()?;
        let same = match incoming.get(serial) {
            Some(d) => stored_equals(r, d)?,
            None => false,
        };
        let e = Existing {
            device: if same {
                None
            } else {
                Some(device_from_row(r, 0)?)
            },
            last_op_date: r.get(14)?,
            deleted: r.get_ref(15)? != rusqlite::types::ValueRef::Null,
            id: r.get(16)?,
        };
        map.insert(serial.to_owned(), e);
    }
    Ok(map)
}

/// Whether a stored row (serial, the named columns, extra_json) holds exactly `d`,
/// compared in place.
fn stored_equals(r: &rusqlite::Row<'_>, d: &Device) -> rusqlite::Result<bool> {
    for (i, field) in d.fields().into_iter().enumerate() {
        if r.get_ref(1 + i)?.as_str_or_null()? != field.as_deref() {
            return Ok(false);
        }
    }
    // extra_json is written by `extra_json`, so equal extras have equal text.
    let stored = r.get_ref(13)?.as_str_or_null()?;
    Ok(match stored {
        None => d.extra.is_empty(),
        Some(text) => extra_json(d).as_deref() == Some(text),
    })
}

/// The device fields as a JSON object map, named columns and extras together.
pub fn device_map(d: &Device) -> Map<String, Value> {
    match d.to_json() {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Names of the stored columns that mirror Apple's fields, for docs and exports.
pub fn apple_columns() -> impl Iterator<Item = &'static str> {
    std::iter::once("serial_number").chain(DEVICE_FIELDS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::OpType;

    fn rec(serial: &str, op: Option<OpType>, date: Option<&str>, color: &str) -> DeviceRecord {
        DeviceRecord {
            op_type: op,
            op_date: date.map(str::to_owned),
            device: Device {
                serial_number: serial.into(),
                model: Some("iPad".into()),
                color: Some(color.into()),
                ..Device::default()
            },
        }
    }

    fn page<'a>(
        records: &'a [DeviceRecord],
        kind: Phase,
        cursor: &str,
        run: i64,
        completes: bool,
    ) -> PageWrite<'a> {
        PageWrite {
            token: "acme",
            kind,
            records,
            next: CursorState {
                phase: if completes || kind == Phase::Sync {
                    Phase::Sync
                } else {
                    Phase::Fetch
                },
                cursor: Some(cursor.into()),
                fetch_run: run,
            },
            fetched_until: None,
            completes_fetch: completes,
            now: "2026-01-01T00:00:00.000Z",
        }
    }

    #[test]
    fn a_batch_commits_its_pages_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let p1 = [rec("A", None, None, "BLACK")];
        let p2 = [rec("B", None, None, "BLUE")];
        let alive = |s: &Store| s.devices(&DeviceFilter::default()).unwrap().len();

        // Dropped uncommitted (a crash): neither page, nor its cursor, nor its events.
        let b = s.batch().unwrap();
        b.apply_page(&page(&p1, Phase::Fetch, "c1", 1, false))
            .unwrap();
        b.apply_page(&page(&p2, Phase::Fetch, "c2", 1, false))
            .unwrap();
        drop(b);
        assert_eq!(alive(&s), 0);
        assert_eq!(s.event_count(None).unwrap(), 0);
        assert_eq!(s.sync_state("acme").unwrap().cursor.cursor, None);

        // Committed: both pages, in order, and the cursor after the last one.
        let b = s.batch().unwrap();
        let a = b
            .apply_page(&page(&p1, Phase::Fetch, "c1", 1, false))
            .unwrap();
        let c = b
            .apply_page(&page(&p2, Phase::Fetch, "c2", 1, false))
            .unwrap();
        b.commit().unwrap();
        assert_eq!((a.added, c.added), (1, 1));
        assert_eq!(alive(&s), 2);
        assert_eq!(s.event_count(None).unwrap(), 2);
        assert_eq!(
            s.sync_state("acme").unwrap().cursor.cursor.as_deref(),
            Some("c2")
        );
    }

    #[test]
    fn migrations_run_twice_are_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        let s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(s);
        let s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        drop(Store::open(&p).unwrap());
        let c = Connection::open(&p).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            Store::open(&p),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn a_database_from_a_pre_release_layout_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        let c = Connection::open(&p).unwrap();
        c.execute_batch(
            "CREATE TABLE devices (token_name TEXT, serial_number TEXT, fetch_run INTEGER,
                 PRIMARY KEY (token_name, serial_number));
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(c);
        let err = Store::open(&p).unwrap_err();
        assert!(matches!(err, StoreError::PreRelease { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("pre-release") && text.contains("move the file aside"),
            "{text}"
        );
    }

    #[test]
    fn page_events_follow_the_diff() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let p1 = [rec("A", None, None, "red"), rec("B", None, None, "blue")];
        let st = s
            .apply_page(&page(&p1, Phase::Fetch, "c1", 1, true))
            .unwrap();
        assert_eq!((st.added, st.modified, st.deleted), (2, 0, 0));
        // Same data again: nothing.
        let st = s
            .apply_page(&page(&p1, Phase::Fetch, "c2", 2, true))
            .unwrap();
        assert_eq!(st.events(), 0);
        // One modified, one deleted, one new.
        let p3 = [
            rec(
                "A",
                Some(OpType::Modified),
                Some("2026-01-01T00:00:00Z"),
                "green",
            ),
            rec(
                "B",
                Some(OpType::Deleted),
                Some("2026-01-01T00:00:00Z"),
                "blue",
            ),
            rec(
                "C",
                Some(OpType::Added),
                Some("2026-01-01T00:00:00Z"),
                "gold",
            ),
        ];
        let st = s
            .apply_page(&page(&p3, Phase::Sync, "c3", 2, false))
            .unwrap();
        assert_eq!((st.added, st.modified, st.deleted), (1, 1, 1));
        let evs = s.events_after(0, None, 100).unwrap();
        let m = evs.iter().find(|e| e.kind == EventKind::Modified).unwrap();
        assert_eq!(m.changes, serde_json::json!({"color": ["red", "green"]}));
        // An older record for A is ignored.
        let stale = [rec(
            "A",
            Some(OpType::Modified),
            Some("2025-12-01T00:00:00Z"),
            "red",
        )];
        let st = s
            .apply_page(&page(&stale, Phase::Sync, "c4", 2, false))
            .unwrap();
        assert_eq!((st.stale, st.events()), (1, 0));
        assert_eq!(
            s.sync_state("acme").unwrap().cursor.cursor.as_deref(),
            Some("c4")
        );
        // B was deleted; it comes back as added.
        let back = [rec(
            "B",
            Some(OpType::Added),
            Some("2026-01-02T00:00:00Z"),
            "blue",
        )];
        let st = s
            .apply_page(&page(&back, Phase::Sync, "c5", 2, false))
            .unwrap();
        assert_eq!(st.added, 1);
    }

    #[test]
    fn a_completed_fetch_reconciles_devices_it_did_not_return() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let all = [
            rec("A", None, None, "r"),
            rec("B", None, None, "r"),
            rec("C", None, None, "r"),
        ];
        s.apply_page(&page(&all, Phase::Fetch, "c1", 1, true))
            .unwrap();
        // Re-fetch (run 2) over two pages that no longer contain B.
        let p1 = [rec("A", None, None, "r")];
        let st = s
            .apply_page(&page(&p1, Phase::Fetch, "f1", 2, false))
            .unwrap();
        assert_eq!(st.events(), 0);
        let p2 = [rec("C", None, None, "r")];
        let st = s
            .apply_page(&page(&p2, Phase::Fetch, "f2", 2, true))
            .unwrap();
        assert_eq!((st.deleted, st.added, st.modified), (1, 0, 0));
        let gone = s
            .devices(&DeviceFilter {
                deleted: Some(true),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].device.serial_number, "B");
    }

    #[test]
    fn reconciliation_spans_bitmap_chunks_commits_and_abandoned_fetches() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        // More devices than one fetch_seen chunk holds, so ids span two chunks.
        let n = SEEN_CHUNK_IDS as usize + 4_000;
        let all: Vec<DeviceRecord> = (0..n)
            .map(|i| rec(&format!("S{i:06}"), None, None, "r"))
            .collect();
        let (first, second) = all.split_at(n / 2);
        s.apply_page(&page(first, Phase::Fetch, "a1", 1, false))
            .unwrap();
        let st = s
            .apply_page(&page(second, Phase::Fetch, "a2", 1, true))
            .unwrap();
        assert_eq!((st.added, st.deleted), (second.len() as u64, 0));
        assert_eq!(s.event_count(None).unwrap(), n as u64);

        // Run 2 is abandoned after one page; its marks must not count for run 3.
        s.apply_page(&page(first, Phase::Fetch, "b1", 2, false))
            .unwrap();
        // Run 3, in two commits, returns everything but two devices, one per chunk.
        let keep = |r: &&DeviceRecord| {
            r.device.serial_number != "S000005"
                && r.device.serial_number != format!("S{:06}", n - 3)
        };
        let p1: Vec<DeviceRecord> = first.iter().filter(keep).cloned().collect();
        let p2: Vec<DeviceRecord> = second.iter().filter(keep).cloned().collect();
        let st = s
            .apply_page(&page(&p2, Phase::Fetch, "c1", 3, false))
            .unwrap();
        assert_eq!(st.events(), 0);
        let st = s
            .apply_page(&page(&p1, Phase::Fetch, "c2", 3, true))
            .unwrap();
        assert_eq!((st.deleted, st.added, st.modified), (2, 0, 0));
        let mut gone: Vec<String> = s
            .devices(&DeviceFilter {
                deleted: Some(true),
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|d| d.device.serial_number)
            .collect();
        gone.sort();
        assert_eq!(gone, ["S000005".to_owned(), format!("S{:06}", n - 3)]);
        // A completed fetch leaves no marks behind.
        let marks: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM fetch_seen", [], |r| r.get(0))
            .unwrap();
        assert_eq!(marks, 0);
    }

    #[test]
    fn extra_fields_round_trip_and_are_diffed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let mut r = rec("A", None, None, "r");
        r.device
            .extra
            .insert("imei".into(), serde_json::json!(["1"]));
        s.apply_page(&page(std::slice::from_ref(&r), Phase::Fetch, "c1", 1, true))
            .unwrap();
        let stored = s.devices(&DeviceFilter::default()).unwrap();
        assert_eq!(stored[0].device, r.device);
        r.device
            .extra
            .insert("imei".into(), serde_json::json!(["2"]));
        let st = s
            .apply_page(&page(std::slice::from_ref(&r), Phase::Fetch, "c2", 2, true))
            .unwrap();
        assert_eq!(st.modified, 1);
        let ev = s.events_after(1, None, 10).unwrap();
        assert_eq!(ev[0].changes, serde_json::json!({"imei": [["1"], ["2"]]}));
    }
}
