//! All SQL: the SQLite mirror of Apple's devices, the change events and the per-token
//! sync state. Event delivery's SQL (sink cursors, retention) is in `store/sink_cursors.rs`.
//!
//! Key invariant: [`Store::apply_page`] (and the group-commit `Batch`) write one page's device rows, the
//! events they cause and the cursor that follows the page in ONE transaction. The stored cursor
//! therefore never runs ahead of stored data: a crash at any instant leaves the store
//! equal to a prefix of Apple's truth, and the next run resumes from the last committed
//! page. Events are derived by comparing the stored row with the incoming record, so a
//! page applied twice (a re-fetch, or Apple repeating itself) emits nothing the second time.
//!
//! This code is synchronous rusqlite; async callers reach it through
//! `tokio::task::spawn_blocking` (see `syncer/`), never on the executor.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, TransactionBehavior};

mod accounts;
mod assign;
mod cursors;
mod device_row;
mod devices;
mod events;
mod org;
mod pg;
mod schema;
mod sink_cursors;

pub use crate::config::{Database, PgTarget};
pub use crate::events::StoredEvent;
pub use accounts::{StoredAccount, TokenFootprint};
pub use assign::{
    AssignDevice, AssignInputs, AssignOutcome, AssignState, Assignment, ProfileDefinition,
};
pub use cursors::{CursorState, SyncState};
pub use devices::{
    apple_columns, device_map, prepare, DeviceFilter, PageStats, PageWrite, Prepared, StoredDevice,
};
pub use org::{OrgCounts, OrgDeviceFilter, OrgPageStats, OrgWalk, StoredOrgDevice, WalkPhase};
pub use pg::CopyReport;
pub use sink_cursors::SinkCursor;

use cursors::upsert_state;
use devices::write_page;

/// A storage failure. Names the database file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database {path}: {action}: {source}{}", advice(.source))]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// PostgreSQL failed.
    #[error("database {url}: {action}{}", pg::advice(.source))]
    Postgres {
        /// The database URL (no password).
        url: String,
        /// What was being done.
        action: &'static str,
        /// The client's error.
        source: postgres::Error,
    },
    /// The PostgreSQL settings cannot be used.
    #[error("database {url}: {reason}")]
    PostgresConfig {
        /// The database URL (no password).
        url: String,
        /// Why, and what to do.
        reason: String,
    },
    /// An operation the PostgreSQL backend does not offer yet.
    #[error("{what} is not available with a PostgreSQL database yet; keep the mirror in an SQLite file (database = \"/var/lib/adesync/adesync.db\") to use it")]
    NotOnPostgres {
        /// What was asked for.
        what: &'static str,
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
    /// A read-only open found a database that needs a migration first.
    #[error("database {path} was made by an earlier adesync and must be upgraded before it can be read; run `adesync run --once` (as the service user, which may write it) once")]
    NeedsUpgrade {
        /// The database file.
        path: PathBuf,
    },
    /// The file belongs to another application; it was left untouched.
    #[error("{path} is not an adesync database ({}); adesync left it untouched — set `database` in the config to a file of adesync's own, e.g. /var/lib/adesync/adesync.db", match .example_table { Some(t) => format!("it holds another application's tables, such as \"{t}\""), None => "it is another program's file".to_owned() })]
    Foreign {
        /// The database file.
        path: PathBuf,
        /// One of its tables, to recognise it by (escaped).
        example_table: Option<String>,
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

/// Advice for the SQLite errors a person can act on, appended to the message.
fn advice(e: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::DatabaseCorrupt | C::NotADatabase) => "; the file is damaged: restore it from a backup, or move it aside — the next run rebuilds the mirror with a full fetch from Apple (events not yet delivered to sinks go with it)",
        Some(C::DatabaseBusy | C::DatabaseLocked) => "; another program holds a lock on it (an open `sqlite3` shell, a backup tool, or another adesync): close it and try again",
        Some(C::ReadOnly) => "; this user may not write it: run as the service user (e.g. `sudo -u adesync adesync …`) or fix the file's owner",
        Some(C::CannotOpen | C::PermissionDenied) => "; check that the folder exists and this user may read (and, to sync, write) it and the file",
        Some(C::DiskFull) => "; the disk is full: free space, then run again (nothing half-written was kept)",
        _ => "",
    }
}

/// A file that exists, is not empty and does not start with SQLite's header is another
/// program's file, not a damaged database: refuse it untouched with that said.
fn refuse_non_sqlite(path: &Path) -> Result<(), StoreError> {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return Ok(()); // missing (created next) or unreadable (SQLite says why)
    };
    let mut head = [0u8; 16];
    let n = f.read(&mut head).unwrap_or(0);
    if n == 0 || head.starts_with(b"SQLite format 3\0") {
        return Ok(());
    }
    Err(StoreError::Foreign {
        path: path.to_owned(),
        example_table: None,
    })
}

/// The page size of a new SQLite database (see `Store::configure`).
const PAGE_SIZE: u32 = 8192;

/// How much the WAL holds before it is checkpointed (see `Store::configure`).
const WAL_CHECKPOINT_BYTES: i64 = 256 << 20;

/// `PRAGMA application_id` of an adesync database ("ADES"): how adesync tells its own
/// file from another application's before writing anything.
pub(crate) const APPLICATION_ID: i32 = 0x4144_4553;

/// The store: an SQLite file or a PostgreSQL database. One per connection; open one per
/// thread that needs it.
pub struct Store {
    db: Backend,
    /// The SQLite file, or the PostgreSQL URL without its password (for messages).
    path: PathBuf,
}

enum Backend {
    Sqlite(Connection),
    Postgres(Box<std::cell::RefCell<pg::Pg>>),
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
pub(crate) enum Batch<'a> {
    Sqlite {
        tx: rusqlite::Transaction<'a>,
        path: &'a Path,
    },
    Postgres(pg::PgBatch<'a>),
}

impl Batch<'_> {
    fn wrap<'p>(
        path: &'p Path,
        action: &'static str,
    ) -> impl FnOnce(rusqlite::Error) -> StoreError + 'p {
        move |source| StoreError::Sqlite {
            path: path.to_owned(),
            action,
            source,
        }
    }

    /// Writes one page: device rows, their events and the next cursor.
    pub(crate) fn apply_page(&mut self, page: &PageWrite<'_>) -> Result<PageStats, StoreError> {
        match self {
            Batch::Sqlite { tx, path } => {
                write_page(tx, page).map_err(Self::wrap(path, "write page"))
            }
            Batch::Postgres(b) => b.apply_page(page),
        }
    }

    /// Stores a cursor transition that comes with no page (see [`Store::set_cursor`]).
    pub(crate) fn set_cursor(
        &mut self,
        token: &str,
        next: &CursorState,
        now: &str,
    ) -> Result<(), StoreError> {
        match self {
            Batch::Sqlite { tx, path } => {
                upsert_state(tx, token, next, None, now).map_err(Self::wrap(path, "store cursor"))
            }
            Batch::Postgres(b) => b.set_cursor(token, next, now),
        }
    }

    /// Commits every page written to this batch.
    pub(crate) fn commit(self) -> Result<(), StoreError> {
        match self {
            Batch::Sqlite { tx, path } => tx.commit().map_err(Self::wrap(path, "commit pages")),
            Batch::Postgres(b) => b.commit(),
        }
    }
}

impl Store {
    /// Opens the database when it exists; `None` when there is none yet (nothing synced).
    pub fn open_if_exists(db: impl Into<Database>) -> Result<Option<Self>, StoreError> {
        match db.into() {
            Database::Sqlite(path) if !path.exists() => Ok(None),
            db => Self::open(db).map(Some),
        }
    }

    /// Opens the database for reading when it holds a mirror: None when there is none yet
    /// (no SQLite file, or a PostgreSQL database adesync has never set up).
    pub fn open_read_only_if_exists(db: impl Into<Database>) -> Result<Option<Self>, StoreError> {
        match db.into() {
            Database::Sqlite(path) if !path.exists() => Ok(None),
            Database::Sqlite(path) => Self::open_sqlite_read_only(&path).map(Some),
            Database::Postgres(target) => Ok(pg::Pg::open_read_only(&target)?.map(|pg| Store {
                db: Backend::Postgres(Box::new(std::cell::RefCell::new(pg))),
                path: target.shown().into(),
            })),
        }
    }

    /// Opens (creating if missing) and migrates the database: an SQLite file, or a
    /// PostgreSQL database (migrated under an advisory lock).
    pub fn open(db: impl Into<Database>) -> Result<Self, StoreError> {
        match db.into() {
            Database::Sqlite(path) => Self::open_sqlite(&path),
            Database::Postgres(target) => Ok(Store {
                db: Backend::Postgres(Box::new(std::cell::RefCell::new(pg::Pg::open(&target)?))),
                path: target.shown().into(),
            }),
        }
    }

    /// Takes `token` for this connection, so no other replica syncs it while this store
    /// is open: None when taken, else who holds it. On PostgreSQL a session advisory lock
    /// on the connection that commits the pages (the server frees it when the connection
    /// ends); on SQLite always taken (one process syncs a file: `lock_database`).
    pub fn own_token(&mut self, token: &str) -> Result<Option<String>, StoreError> {
        match &mut self.db {
            Backend::Postgres(pg) => pg.get_mut().own_token(token),
            Backend::Sqlite(_) => Ok(None),
        }
    }

    /// Takes `sink` for this connection, so no other replica delivers to it while this
    /// store is open (see [`Store::own_token`]): None when taken, else who holds it.
    pub fn own_sink(&mut self, sink: &str) -> Result<Option<String>, StoreError> {
        match &mut self.db {
            Backend::Postgres(pg) => pg.get_mut().own_sink(sink),
            Backend::Sqlite(_) => Ok(None),
        }
    }

    /// Takes organisation account `account` for this connection, so no other replica walks
    /// it while this store is open (see [`Store::own_token`]): None when taken, else who
    /// holds it.
    pub fn own_account(&mut self, account: &str) -> Result<Option<String>, StoreError> {
        match &mut self.db {
            Backend::Postgres(pg) => pg.get_mut().own_account(account),
            Backend::Sqlite(_) => Ok(None),
        }
    }

    /// Which replica walks each of `accounts` now (PostgreSQL; empty on SQLite).
    pub fn account_holders(
        &self,
        accounts: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        match self.pg() {
            Some(mut pg) => pg.account_holders(accounts),
            None => Ok(Vec::new()),
        }
    }

    /// Which replica syncs each of `tokens` now (PostgreSQL; empty on SQLite).
    pub fn token_holders(&self, tokens: &[String]) -> Result<Vec<(String, String)>, StoreError> {
        match self.pg() {
            Some(mut pg) => pg.token_holders(tokens),
            None => Ok(Vec::new()),
        }
    }

    /// Copies this SQLite mirror into `target`, an empty PostgreSQL database, in one
    /// transaction on each side (a consistent snapshot of this one; all or nothing there).
    pub fn copy_to(&self, target: &mut Store) -> Result<CopyReport, StoreError> {
        let from = self.conn()?;
        let Backend::Postgres(pg) = &mut target.db else {
            return Err(StoreError::PostgresConfig {
                url: target.path.display().to_string(),
                reason: "is not a PostgreSQL database; give a postgres:// URL".into(),
            });
        };
        let snapshot = |sql: &str| {
            from.execute_batch(sql)
                .map_err(self.err("read the mirror to copy"))
        };
        snapshot("BEGIN")?;
        let copied = pg.get_mut().copy_from_sqlite(from, &self.path);
        let _ = snapshot("COMMIT");
        copied
    }

    /// Whether this store is a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(self.db, Backend::Postgres(_))
    }

    /// The SQLite connection; an operation not yet offered on PostgreSQL says so.
    fn conn(&self) -> Result<&Connection, StoreError> {
        match &self.db {
            Backend::Sqlite(c) => Ok(c),
            Backend::Postgres(_) => Err(StoreError::NotOnPostgres {
                what: "this operation",
            }),
        }
    }

    fn conn_mut(&mut self) -> Result<&mut Connection, StoreError> {
        match &mut self.db {
            Backend::Sqlite(c) => Ok(c),
            Backend::Postgres(_) => Err(StoreError::NotOnPostgres {
                what: "this operation",
            }),
        }
    }

    /// The PostgreSQL connection, if that is the backend.
    fn pg(&self) -> Option<std::cell::RefMut<'_, pg::Pg>> {
        match &self.db {
            Backend::Postgres(p) => Some(p.borrow_mut()),
            Backend::Sqlite(_) => None,
        }
    }

    fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                path: path.to_owned(),
                source,
            })?;
        }
        refuse_non_sqlite(path)?;
        let conn = Connection::open(path).map_err(|source| StoreError::Sqlite {
            path: path.to_owned(),
            action: "open",
            source,
        })?;
        let mut store = Store {
            db: Backend::Sqlite(conn),
            path: path.to_owned(),
        };
        // Wait for another process's lock (a migration in progress) before reading
        // anything; this is a connection setting and writes nothing to the file.
        store
            .conn()?
            .busy_timeout(std::time::Duration::from_secs(30))
            .map_err(store.err("configure"))?;
        let adopt = store.check_identity()?;
        store.configure()?;
        store.migrate()?;
        if adopt {
            store
                .conn()?
                .pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(store.err("mark the database as adesync's"))?;
        }
        Ok(store)
    }

    /// Refuses another application's database before anything is written to it. Returns
    /// whether the file still needs adesync's mark: a new, empty file, or one made by an
    /// earlier adesync (recognised by its tables), is adopted; anything else is foreign.
    fn check_identity(&self) -> Result<bool, StoreError> {
        let id: i32 = self
            .conn()?
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(self.err("read the file"))?;
        if id == APPLICATION_ID {
            return Ok(false);
        }
        let tables: Vec<String> = self
            .conn()?
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .and_then(|mut st| {
                st.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(self.err("read the file"))?;
        let ours = [
            "devices",
            "events",
            "sync_state",
            "fetch_seen",
            "accounts",
            "sink_cursors",
        ];
        // An earlier adesync's file: a `devices` table keyed by adesync's `token_name`.
        let earlier_adesync = tables.iter().any(|t| t == "devices")
            && self
                .conn()?
                .query_row(
                    "SELECT COUNT(*) FROM pragma_table_info('devices') WHERE name = 'token_name'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(self.err("read the file"))?
                > 0;
        if id == 0 && (tables.is_empty() || earlier_adesync) {
            return Ok(true);
        }
        Err(StoreError::Foreign {
            path: self.path.clone(),
            example_table: tables
                .iter()
                .find(|t| !ours.contains(&t.as_str()))
                .map(|t| crate::model::printable(t).chars().take(64).collect()),
        })
    }

    /// Opens an existing database for reading only: nothing is created, migrated or
    /// marked, so a user who may read but not write the file (an auditor, a monitoring
    /// check) can query it. A database that still needs a migration says so.
    pub fn open_read_only(db: impl Into<Database>) -> Result<Self, StoreError> {
        match db.into() {
            Database::Sqlite(path) => Self::open_sqlite_read_only(&path),
            db => {
                let url = db.display().to_string();
                Self::open_read_only_if_exists(db)?.ok_or(StoreError::PostgresConfig {
                    url,
                    reason: "holds no adesync mirror yet; run `adesync run --once` first".into(),
                })
            }
        }
    }

    fn open_sqlite_read_only(path: &Path) -> Result<Self, StoreError> {
        use rusqlite::OpenFlags;
        refuse_non_sqlite(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Sqlite {
            path: path.to_owned(),
            action: "open for reading",
            source,
        })?;
        let store = Store {
            db: Backend::Sqlite(conn),
            path: path.to_owned(),
        };
        store
            .conn()?
            .execute_batch("PRAGMA busy_timeout = 30000; PRAGMA query_only = ON;")
            .map_err(store.err("configure"))?;
        store.check_identity()?;
        let version = store.schema_version()?;
        let known = schema::MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_owned(),
                found: version,
                known,
            });
        }
        if version < known {
            return Err(StoreError::NeedsUpgrade {
                path: path.to_owned(),
            });
        }
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
        self.conn()?.set_prepared_statement_cache_capacity(32);
        // A new database gets 8 KiB pages (SQLite's default is 4 KiB): a first fetch of a
        // million devices writes half as many pages and WAL frames, about 7% faster, and
        // the file is 2% smaller; an incremental sync was no slower (BENCHMARKS.md). This
        // only applies while the file is empty; an existing database keeps its page size.
        self.conn()?
            .execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE};"))
            .map_err(self.err("configure"))?;
        // WAL lets readers (the CLI) run beside the writer. synchronous=NORMAL in WAL mode
        // keeps the database consistent on power loss; the last commits may be lost, and
        // they are re-fetched from Apple because the cursor commits with them. A 24 MiB page
        // cache keeps a sync of a million devices under 64 MB (32 MiB was no faster:
        // BENCHMARKS.md).
        self.conn()?
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA cache_size = -24576;
                 PRAGMA temp_store = MEMORY;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 30000;",
            )
            .map_err(self.err("configure"))?;
        // The WAL is checkpointed into the database once it holds 256 MiB (whatever the
        // page size): long enough that group commits rarely wait on a checkpoint.
        let page_size: i64 = self
            .conn()?
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(self.err("configure"))?;
        self.conn()?
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = {};",
                WAL_CHECKPOINT_BYTES / page_size.max(512)
            ))
            .map_err(self.err("configure"))
    }

    /// Forces committed transactions to disk (a WAL checkpoint syncs the log first).
    pub(crate) fn make_durable(&self) -> Result<(), StoreError> {
        if self.is_postgres() {
            // A PostgreSQL commit is durable when it returns.
            return Ok(());
        }
        self.conn()?
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(self.err("flush to disk"))
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.schema_version();
        }
        self.conn()?
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err("read schema version"))
    }

    /// Stores a cursor transition that comes with no page (e.g. EXHAUSTED_CURSOR → sync,
    /// or an expired cursor → start a new full fetch).
    pub fn set_cursor(
        &mut self,
        token: &str,
        next: &CursorState,
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.set_cursor(token, next, now);
        }
        let path = self.path.clone();
        upsert_state(self.conn()?, token, next, None, now).map_err(|source| StoreError::Sqlite {
            path,
            action: "store cursor",
            source,
        })
    }

    /// Writes one page: device rows, their events and the next cursor, atomically.
    pub fn apply_page(&mut self, page: &PageWrite<'_>) -> Result<PageStats, StoreError> {
        let mut batch = self.batch()?;
        let stats = batch.apply_page(page)?;
        batch.commit()?;
        Ok(stats)
    }

    /// Runs `f` in one write transaction and commits it.
    pub(super) fn in_tx<T>(
        &mut self,
        action: &'static str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            action,
            source,
        };
        let tx = self
            .conn_mut()?
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(wrap)?;
        let out = f(&tx).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(out)
    }

    /// Opens a write transaction that takes one or more consecutive pages (group commit,
    /// see [`Batch`]). Dropping it uncommitted rolls every page in it back.
    pub(crate) fn batch(&mut self) -> Result<Batch<'_>, StoreError> {
        match &mut self.db {
            Backend::Postgres(pg) => Ok(Batch::Postgres(pg.get_mut().batch()?)),
            Backend::Sqlite(conn) => {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(|source| StoreError::Sqlite {
                        path: self.path.clone(),
                        action: "begin a write",
                        source,
                    })?;
                Ok(Batch::Sqlite {
                    tx,
                    path: &self.path,
                })
            }
        }
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
    insert_many_or(tx, "ROLLBACK", into, width, values)
}

/// [`insert_many`] with another conflict clause (`INSERT OR {conflict}`).
fn insert_many_or(
    tx: &rusqlite::Transaction<'_>,
    conflict: &str,
    into: &str,
    width: usize,
    values: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<()> {
    let row = format!("({})", vec!["?"; width].join(", "));
    let statement = |rows: usize| {
        let rows = vec![row.as_str(); rows].join(", ");
        tx.prepare_cached(&format!("INSERT OR {conflict} INTO {into} VALUES {rows}"))
    };
    // Every full chunk through one statement, taken from the cache once per call: looking
    // it up and handing it back (which clears its bindings) for each chunk cost a first
    // fetch about 5% of its samples.
    let per_chunk = (VALUES_PER_INSERT / width).max(1) * width;
    let mut chunks = values.chunks_exact(per_chunk);
    if chunks.len() > 0 {
        let mut full = statement(per_chunk / width)?;
        for chunk in chunks.by_ref() {
            full.execute(rusqlite::params_from_iter(chunk))?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        statement(rest.len() / width)?.execute(rusqlite::params_from_iter(rest))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::devices::SEEN_CHUNK_IDS;
    use super::schema::MIGRATIONS;
    use super::*;
    use crate::model::{Device, DeviceRecord, EventKind, OpType, Phase};

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

    /// `rec` with protocol-10 fields of every shape.
    fn rec10(serial: &str, op: Option<OpType>, date: Option<&str>, color: &str) -> DeviceRecord {
        let mut r = rec(serial, op, date, color);
        let extra = serde_json::json!({
            "imei": ["1", "2"], "eid": "E1", "wifi_mac_address": ["aa"],
            "is_replacement_device": true, "mdm_migration_deadline": "2026-01-01T00:00:00Z",
            "released_by_replacement": false, "future_field": {"x": 1}
        });
        if let serde_json::Value::Object(m) = extra {
            r.device.extra = m;
        }
        r
    }

    /// A database at schema `version` (the first `version` migrations) holding `rows`.
    fn database_at(path: &Path, version: usize, rows: &str) {
        let conn = Connection::open(path).unwrap();
        for m in &MIGRATIONS[..version] {
            conn.execute_batch(m).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64)
            .unwrap();
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        conn.execute_batch(rows).unwrap();
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
            unreadable: &[],
            expect_new: false,
            prepared: None,
        }
    }

    #[test]
    fn a_batch_commits_its_pages_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        let p1 = [rec("A", None, None, "BLACK")];
        let p2 = [rec("B", None, None, "BLUE")];
        let alive = |s: &Store| s.devices(&DeviceFilter::default()).unwrap().len();

        // Dropped uncommitted (a crash): neither page, nor its cursor, nor its events.
        let mut b = s.batch().unwrap();
        b.apply_page(&page(&p1, Phase::Fetch, "c1", 1, false))
            .unwrap();
        b.apply_page(&page(&p2, Phase::Fetch, "c2", 1, false))
            .unwrap();
        drop(b);
        assert_eq!(alive(&s), 0);
        assert_eq!(s.event_count(None).unwrap(), 0);
        assert_eq!(s.sync_state("acme").unwrap().cursor.cursor, None);

        // Committed: both pages, in order, and the cursor after the last one.
        let mut b = s.batch().unwrap();
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

    /// Rows inserted many to a statement all arrive, in order, whether they fill whole
    /// statements, leave a remainder, or are fewer than one statement holds.
    #[test]
    fn multi_row_inserts_store_every_row_in_order() {
        let per_statement = VALUES_PER_INSERT / 7;
        for n in [3, per_statement, 2 * per_statement, 2 * per_statement + 5] {
            let mut conn = Connection::open_in_memory().unwrap();
            conn.execute_batch("CREATE TABLE t (a INTEGER, b TEXT, c, d, e, f, g)")
                .unwrap();
            let rows: Vec<(i64, String)> = (0..n as i64).map(|i| (i, format!("r{i}"))).collect();
            let mut values: Vec<&dyn rusqlite::ToSql> = Vec::new();
            for (a, b) in &rows {
                values.extend([a as &dyn rusqlite::ToSql, b, a, b, a, b, a]);
            }
            let tx = conn.transaction().unwrap();
            insert_many(&tx, "t", 7, &values).unwrap();
            tx.commit().unwrap();
            let stored: Vec<(i64, String, i64)> = conn
                .prepare("SELECT a, b, g FROM t ORDER BY rowid")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let expected: Vec<(i64, String, i64)> =
                rows.iter().map(|(a, b)| (*a, b.clone(), *a)).collect();
            assert_eq!(stored, expected, "{n} rows");
        }
    }

    /// A new database takes PAGE_SIZE pages; one made with SQLite's default (every mirror
    /// made before) keeps its pages and goes on taking pages and answering queries.
    #[test]
    fn a_new_database_has_its_page_size_and_an_older_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |s: &Store| -> i64 {
            s.conn()
                .unwrap()
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        let checkpoint_at = |s: &Store| -> i64 {
            s.conn()
                .unwrap()
                .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
                .unwrap()
        };
        let s = Store::open(dir.path().join("new.db")).unwrap();
        assert_eq!(page_size(&s), i64::from(PAGE_SIZE));
        assert_eq!(checkpoint_at(&s) * page_size(&s), WAL_CHECKPOINT_BYTES);

        // An older mirror as it is on disk: 4 KiB pages, in WAL mode.
        let old = dir.path().join("old.db");
        Connection::open(&old)
            .unwrap()
            .execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL;")
            .unwrap();
        database_at(&old, MIGRATIONS.len(), "");
        let mut s = Store::open(&old).unwrap();
        assert_eq!(page_size(&s), 4096);
        assert_eq!(checkpoint_at(&s), 65536, "the same 256 MiB of WAL");
        let records: Vec<DeviceRecord> = (0..500)
            .map(|i| rec(&format!("S{i:04}"), None, None, "BLACK"))
            .collect();
        s.apply_page(&page(&records, Phase::Fetch, "c1", 1, true))
            .unwrap();
        drop(s);
        let s = Store::open(&old).unwrap();
        assert_eq!(page_size(&s), 4096, "reopened");
        assert_eq!(s.device_counts("acme").unwrap(), (500, 0));
        let one = s
            .devices(&DeviceFilter {
                serial: Some("S0250".into()),
                ..DeviceFilter::default()
            })
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].device.color.as_deref(), Some("BLACK"));
    }

    #[test]
    fn another_applications_database_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crm.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);
                             INSERT INTO customers (name) VALUES ('Acme');",
            )
            .unwrap();
        }
        let before = std::fs::read(&p).unwrap();
        let err = Store::open(&p).unwrap_err();
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("not an adesync database")
                && text.contains("\"customers\"")
                && text.contains("untouched"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1, "one sentence, no schema dump");
        assert_eq!(std::fs::read(&p).unwrap(), before, "not a byte changed");
        assert!(
            !dir.path().join("crm.db-wal").exists(),
            "not switched to WAL"
        );
        // Another application's mark is refused even without tables.
        let q = dir.path().join("other.db");
        Connection::open(&q)
            .unwrap()
            .pragma_update(None, "application_id", 42)
            .unwrap();
        assert!(matches!(Store::open(&q), Err(StoreError::Foreign { .. })));
    }

    #[test]
    fn a_database_from_an_earlier_adesync_without_the_mark_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        let id = |s: &Store| -> i32 {
            s.conn()
                .unwrap()
                .query_row("PRAGMA application_id", [], |r| r.get(0))
                .unwrap()
        };
        let s = Store::open(&p).unwrap();
        assert_eq!(id(&s), APPLICATION_ID, "a new database is marked");
        s.conn()
            .unwrap()
            .pragma_update(None, "application_id", 0)
            .unwrap();
        drop(s);
        let s = Store::open(&p).unwrap();
        assert_eq!(
            id(&s),
            APPLICATION_ID,
            "an unmarked adesync database is adopted"
        );
    }

    #[test]
    fn a_read_only_open_writes_nothing_and_asks_for_an_upgrade_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        drop(Store::open(&p).unwrap());
        let r = Store::open_read_only(&p).unwrap();
        assert_eq!(r.device_counts("acme").unwrap(), (0, 0));
        assert!(
            r.conn()
                .unwrap()
                .execute("DELETE FROM devices", [])
                .is_err(),
            "the connection cannot write"
        );
        drop(r);
        // A database one migration behind is not migrated by a reader.
        Connection::open(&p)
            .unwrap()
            .pragma_update(None, "user_version", 1)
            .unwrap();
        let err = Store::open_read_only(&p).err().unwrap();
        assert!(matches!(err, StoreError::NeedsUpgrade { .. }), "{err}");
        let v: i64 = Connection::open(&p)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 1, "left as it was");
        assert!(Store::open_read_only(dir.path().join("missing.db")).is_err());
    }

    #[test]
    fn a_damaged_file_gets_advice() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        drop(Store::open(&p).unwrap());
        // Keep SQLite's header, damage what follows.
        let mut bytes = std::fs::read(&p).unwrap();
        for b in &mut bytes[16..100] {
            *b = 0xff;
        }
        std::fs::write(&p, &bytes).unwrap();
        let err = Store::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("restore it from a backup") && err.contains("full fetch"),
            "{err}"
        );
        // Not SQLite at all: another program's file, left as it is.
        let q = dir.path().join("notes.db");
        std::fs::write(&q, "meeting notes\n").unwrap();
        let err = Store::open(&q).unwrap_err();
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
        assert!(err.to_string().contains("another program's file"), "{err}");
        assert_eq!(std::fs::read_to_string(&q).unwrap(), "meeting notes\n");
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
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
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

    /// The first column of every row `sql` returns.
    fn column<T: rusqlite::types::FromSql>(s: &Store, sql: &str) -> Vec<T> {
        s.conn()
            .unwrap()
            .prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// (device_json, color in the event's device) of every event, oldest first.
    fn event_snapshots(s: &Store) -> Vec<(String, Option<String>)> {
        let raw: Vec<String> = column(s, "SELECT device_json FROM events ORDER BY id");
        let read = s.events_after(0, None, 100).unwrap();
        assert_eq!(raw.len(), read.len());
        raw.into_iter()
            .zip(read)
            .map(|(json, e)| (json, e.device.and_then(|d| d.color)))
            .collect()
    }

    #[test]
    fn an_added_event_reads_its_row_until_the_row_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        let p1 = [rec("A", None, None, "red"), rec10("B", None, None, "blue")];
        s.apply_page(&page(&p1, Phase::Fetch, "c1", 1, true))
            .unwrap();
        // Both `added` events defer to their rows: no snapshot stored, the rows name them.
        let snaps = event_snapshots(&s);
        assert_eq!(
            snaps,
            vec![
                (String::new(), Some("red".into())),
                (String::new(), Some("blue".into()))
            ]
        );
        let named: Vec<(String, Option<i64>, bool)> = s
            .conn().unwrap()
            .prepare("SELECT serial_number, snapshot_event_id, content_hash IS NOT NULL FROM devices ORDER BY 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            named,
            vec![("A".into(), Some(1), true), ("B".into(), Some(2), true)]
        );
        // A changes: its `added` event gets the old row before the row changes, and still
        // says red; the `modified` event carries green. B is untouched.
        let p2 = [rec(
            "A",
            Some(OpType::Modified),
            Some("2026-01-01T00:00:00Z"),
            "green",
        )];
        s.apply_page(&page(&p2, Phase::Sync, "c2", 1, false))
            .unwrap();
        // ...kept with the `modified` event that changed the row (the row names it), so
        // the change appends and never rewrites the old event.
        let snaps = event_snapshots(&s);
        assert_eq!(snaps[0], (String::new(), Some("red".into())));
        let (kept, source): (String, i64) = s
            .conn()
            .unwrap()
            .query_row(
                "SELECT e.previous_json, d.snapshot_source_id FROM events e, devices d
                 WHERE e.id = 3 AND d.serial_number = 'A'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert!(kept.starts_with(r#"["A","iPad",null,"red""#), "{kept}");
        assert_eq!(source, 3);
        assert_eq!(snaps[1], (String::new(), Some("blue".into())));
        assert!(!snaps[2].0.is_empty());
        assert_eq!(snaps[2].1.as_deref(), Some("green"));
        // B leaves and comes back purple: its first `added` keeps blue, the `deleted`
        // carries blue, the second `added` reads the row (purple).
        let p3 = [rec(
            "B",
            Some(OpType::Deleted),
            Some("2026-01-02T00:00:00Z"),
            "blue",
        )];
        s.apply_page(&page(&p3, Phase::Sync, "c3", 1, false))
            .unwrap();
        let p4 = [rec10(
            "B",
            Some(OpType::Added),
            Some("2026-01-03T00:00:00Z"),
            "purple",
        )];
        s.apply_page(&page(&p4, Phase::Sync, "c4", 1, false))
            .unwrap();
        let colors: Vec<Option<String>> = event_snapshots(&s).into_iter().map(|e| e.1).collect();
        let want = ["red", "blue", "green", "blue", "purple"];
        assert_eq!(colors, want.map(|c| Some(c.to_owned())).to_vec());
        let deferred: Vec<i64> = column(
            &s,
            "SELECT id FROM events WHERE device_json = '' ORDER BY id",
        );
        // B's first `added` got its snapshot when B was added again; A's and B's latest
        // still defer.
        assert_eq!(deferred, vec![1, 5]);
        // The view gives every event its snapshot in the stored form, the deferred one too.
        let via_view: Vec<String> =
            column(&s, "SELECT device_json FROM events_with_device ORDER BY id");
        let read = s.events_after(0, None, 100).unwrap();
        assert_eq!(via_view.len(), read.len());
        for (json, e) in via_view.iter().zip(&read) {
            assert_eq!(
                events::decode_snapshot(json).as_ref(),
                e.device.as_ref(),
                "{json}"
            );
        }
        let stored: String = s
            .conn()
            .unwrap()
            .query_row("SELECT device_json FROM events WHERE id = 3", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(via_view[2], stored);
        assert_eq!(via_view[0], kept);
    }

    /// A deletion that changes its row (released by a replacement) keeps the row's old
    /// content with its own event, as a modification does: the deferred `added` event is
    /// never rewritten, and still reads the device as it was added.
    #[test]
    fn a_deletion_that_changes_its_row_appends_and_never_rewrites_the_added_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        let p1 = [rec("A", None, None, "red"), rec("B", None, None, "blue")];
        s.apply_page(&page(&p1, Phase::Fetch, "c1", 1, true))
            .unwrap();
        let mut gone = rec(
            "A",
            Some(OpType::Deleted),
            Some("2026-01-02T00:00:00Z"),
            "red",
        );
        gone.device
            .extra
            .insert("released_by_replacement".into(), serde_json::json!(true));
        s.apply_page(&page(&[gone], Phase::Sync, "c2", 1, false))
            .unwrap();
        let flag = |e: &StoredEvent| {
            e.device
                .as_ref()
                .and_then(|d| d.v10("released_by_replacement").cloned())
        };
        let evs = s.events_after(0, None, 10).unwrap();
        let seen: Vec<_> = evs
            .iter()
            .map(|e| (e.serial_number.as_str(), e.kind, flag(e)))
            .collect();
        assert_eq!(
            seen,
            [
                ("A", EventKind::Added, None),
                ("B", EventKind::Added, None),
                ("A", EventKind::Deleted, Some(serde_json::json!(true))),
            ]
        );
        assert_eq!(evs[2].reason, Some(crate::model::Reason::Replaced));
        // Both `added` events still defer; A's row names the deletion as the event that
        // keeps what it was.
        let deferred: Vec<i64> = column(
            &s,
            "SELECT id FROM events WHERE device_json = '' ORDER BY id",
        );
        assert_eq!(deferred, vec![1, 2]);
        let named: Vec<(i64, i64)> = s
            .conn()
            .unwrap()
            .prepare("SELECT snapshot_event_id, snapshot_source_id FROM devices WHERE serial_number = 'A'")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(named, vec![(1, 3)]);
        // A comes back: its first `added` event gets what the deletion kept.
        let back = [rec(
            "A",
            Some(OpType::Added),
            Some("2026-01-03T00:00:00Z"),
            "pink",
        )];
        s.apply_page(&page(&back, Phase::Sync, "c3", 1, false))
            .unwrap();
        let evs = s.events_after(0, None, 10).unwrap();
        let seen: Vec<_> = evs
            .iter()
            .map(|e| {
                let color = e.device.as_ref().and_then(|d| d.color.clone());
                (e.kind, color.unwrap(), flag(e))
            })
            .collect();
        let t = Some(serde_json::json!(true));
        assert_eq!(
            seen,
            [
                (EventKind::Added, "red".to_owned(), None),
                (EventKind::Added, "blue".to_owned(), None),
                (EventKind::Deleted, "red".to_owned(), t),
                (EventKind::Added, "pink".to_owned(), None),
            ]
        );
        // The view agrees with the events as read.
        let via_view: Vec<String> =
            column(&s, "SELECT device_json FROM events_with_device ORDER BY id");
        for (json, e) in via_view.iter().zip(&evs) {
            assert_eq!(
                events::decode_snapshot(json).as_ref(),
                e.device.as_ref(),
                "{json}"
            );
        }
    }

    #[test]
    fn odd_protocol_10_shapes_read_back_the_same_through_rows_events_and_the_view() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        let with = |serial: &str, extra: serde_json::Value| {
            let mut r = rec(serial, None, None, "red");
            if let serde_json::Value::Object(m) = extra {
                r.device.extra = m;
            }
            r
        };
        // Shapes whose row reads back the same (the event defers to it) and ones that do
        // not (a number for a boolean or for text, "1" for a boolean, a string that is a
        // JSON list: the event keeps its own).
        let p = [
            with(
                "A",
                serde_json::json!({"imei": "", "meid": "[x", "eid": "E",
                "is_replacement_device": false, "ethernet_mac_address": ["a", "b"]}),
            ),
            with(
                "B",
                serde_json::json!({"is_replacement_device": 1, "eid": 7}),
            ),
            with("C", serde_json::json!({"wifi_mac_address": "[\"q\"]"})),
            with("D", serde_json::json!({"released_by_replacement": "1"})),
        ];
        s.apply_page(&page(&p, Phase::Fetch, "c1", 1, true))
            .unwrap();
        let raw: Vec<String> = column(&s, "SELECT device_json FROM events ORDER BY id");
        assert_eq!(raw[0], "", "A's row reads back exactly: deferred");
        assert!(raw[1..].iter().all(|j| !j.is_empty()), "{raw:?}");
        let read = s.events_after(0, None, 10).unwrap();
        for (e, r) in read.iter().zip(&p) {
            assert_eq!(
                e.device.as_ref(),
                Some(&r.device),
                "event of {}",
                e.serial_number
            );
        }
        let via_view: Vec<String> =
            column(&s, "SELECT device_json FROM events_with_device ORDER BY id");
        for (json, e) in via_view.iter().zip(&read) {
            assert_eq!(
                events::decode_snapshot(json).as_ref(),
                e.device.as_ref(),
                "{json}"
            );
        }
    }

    #[test]
    fn a_new_tokens_pages_go_in_without_lookups_and_a_repeated_serial_still_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        assert!(!s.has_devices("acme").unwrap());
        fn fresh(p: PageWrite<'_>) -> PageWrite<'_> {
            PageWrite {
                expect_new: true,
                prepared: None,
                ..p
            }
        }
        let p1 = [rec("A", None, None, "red"), rec("B", None, None, "blue")];
        // Page 2 repeats A (changed) and B (unchanged) between new devices; page 3, in the
        // same transaction, repeats A again.
        let p2 = [
            rec("C", None, None, "gold"),
            rec("A", None, None, "green"),
            rec("B", None, None, "blue"),
            rec("D", None, None, "grey"),
        ];
        let p3 = [rec("A", None, None, "pink"), rec("E", None, None, "black")];
        let st = s
            .apply_page(&fresh(page(&p1, Phase::Fetch, "c1", 1, false)))
            .unwrap();
        assert_eq!((st.added, st.modified), (2, 0));
        let mut batch = s.batch().unwrap();
        let st2 = batch
            .apply_page(&fresh(page(&p2, Phase::Fetch, "c2", 1, false)))
            .unwrap();
        let st3 = batch
            .apply_page(&fresh(page(&p3, Phase::Fetch, "c3", 1, true)))
            .unwrap();
        batch.commit().unwrap();
        assert_eq!((st2.added, st2.modified, st2.unchanged), (2, 1, 1));
        assert_eq!((st3.added, st3.modified, st3.deleted), (1, 1, 0));
        // One row per serial, the latest record of each.
        let all = s.devices(&DeviceFilter::default()).unwrap();
        let colors: Vec<(String, Option<String>)> = all
            .iter()
            .map(|d| (d.device.serial_number.clone(), d.device.color.clone()))
            .collect();
        let want = [
            ("A", "pink"),
            ("B", "blue"),
            ("C", "gold"),
            ("D", "grey"),
            ("E", "black"),
        ];
        assert_eq!(
            colors,
            want.map(|(s, c)| (s.to_owned(), Some(c.to_owned())))
                .to_vec()
        );
        // Events in record order, ids growing, each with the device as it was then.
        let evs = s.events_after(0, None, 100).unwrap();
        let seen: Vec<(String, EventKind, Option<String>)> = evs
            .iter()
            .map(|e| {
                let color = e.device.as_ref().and_then(|d| d.color.clone());
                (e.serial_number.clone(), e.kind, color)
            })
            .collect();
        let want = [
            ("A", EventKind::Added, "red"),
            ("B", EventKind::Added, "blue"),
            ("C", EventKind::Added, "gold"),
            ("A", EventKind::Modified, "green"),
            ("D", EventKind::Added, "grey"),
            ("A", EventKind::Modified, "pink"),
            ("E", EventKind::Added, "black"),
        ];
        assert_eq!(
            seen,
            want.map(|(s, k, c)| (s.to_owned(), k, Some(c.to_owned())))
                .to_vec()
        );
        assert!(evs.windows(2).all(|w| w[0].id < w[1].id));
        // The completed fetch saw every device: nothing reconciled away.
        assert_eq!(s.device_counts("acme").unwrap(), (5, 0));
        assert!(s.has_devices("acme").unwrap());
        // A deletion on a fetch page of a new token is not inserted.
        let gone = [rec("Z", Some(OpType::Deleted), None, "red")];
        let st = s
            .apply_page(&fresh(page(&gone, Phase::Fetch, "c4", 2, false)))
            .unwrap();
        assert_eq!((st.added, st.events()), (0, 0));
        assert_eq!(
            s.devices(&DeviceFilter {
                serial: Some("Z".into()),
                deleted: Some(false),
                ..Default::default()
            })
            .unwrap()
            .len(),
            0
        );
    }

    /// A new token's fetch pages make their `added` events from the rows they insert
    /// (`PageEvents::added_from_rows`); the events must be the ones the lookup path writes:
    /// same order, kinds, reasons, stored snapshots, and the same device for each.
    #[test]
    fn a_new_tokens_events_made_from_its_rows_match_the_lookup_paths() {
        let dir = tempfile::tempdir().unwrap();
        // A record whose protocol-10 list is a string that reads as a JSON list does not
        // read back exactly, so its event carries its own snapshot.
        let mut odd = rec10("N", None, None, "teal");
        odd.device
            .extra
            .insert("imei".into(), serde_json::json!("[\"35\"]"));
        let p1 = [
            rec10("A", None, None, "red"),
            odd,
            rec("B", None, None, "blue"),
            rec("Z", Some(OpType::Deleted), None, "red"),
            rec("C", None, None, "gold"),
        ];
        // Page 2 repeats A (changed) among new devices, in the same transaction, and F
        // comes as a sync-style record (with an op_type), which goes the lookup way.
        let p2 = [
            rec("D", None, None, "grey"),
            rec10("A", None, None, "green"),
            rec(
                "F",
                Some(OpType::Added),
                Some("2026-01-01T00:00:00Z"),
                "white",
            ),
            rec("E", None, None, "black"),
        ];
        let write = |name: &str, expect_new: bool| {
            let mut s = Store::open(dir.path().join(name)).unwrap();
            let mut batch = s.batch().unwrap();
            for (records, cursor, completes) in [(&p1[..], "c1", false), (&p2[..], "c2", true)] {
                batch
                    .apply_page(&PageWrite {
                        expect_new,
                        ..page(records, Phase::Fetch, cursor, 1, completes)
                    })
                    .unwrap();
            }
            batch.commit().unwrap();
            s
        };
        let (made, looked_up) = (write("made.db", true), write("looked.db", false));
        let rows = |s: &Store| -> Vec<Vec<Option<String>>> {
            let mut q = s
                .conn()
                .unwrap()
                .prepare(
                    "SELECT token_name, serial_number, kind, changes, occurred_at, device_json,
                            previous_json, reason, scope
                       FROM events ORDER BY id",
                )
                .unwrap();
            q.query_map([], |r| (0..9).map(|i| r.get(i)).collect())
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let made_rows = rows(&made);
        assert_eq!(made_rows, rows(&looked_up));
        // Six added (A, N, B, C, D, E), A modified; the deletion of an unknown device none.
        let kinds: Vec<_> = made_rows
            .iter()
            .map(|r| {
                (
                    r[1].clone().unwrap(),
                    r[2].clone().unwrap(),
                    r[7].clone().unwrap(),
                )
            })
            .collect();
        let want = [
            ("A", "added", "assigned"),
            ("N", "added", "assigned"),
            ("B", "added", "assigned"),
            ("C", "added", "assigned"),
            ("D", "added", "assigned"),
            ("A", "modified", "updated"),
            ("F", "added", "assigned"),
            ("E", "added", "assigned"),
        ];
        assert_eq!(
            kinds,
            want.map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
                .to_vec()
        );
        // N carries its own snapshot; the other added events defer theirs to the row.
        let deferred: Vec<bool> = made_rows
            .iter()
            .map(|r| r[5].as_deref() == Some(""))
            .collect();
        assert_eq!(deferred, [true, false, true, true, true, false, true, true]);
        // Each event resolves to the same device either way, and each deferring event is
        // the one its row names.
        let events = |s: &Store| s.events_after(0, None, 100).unwrap();
        let devices = |evs: Vec<StoredEvent>| -> Vec<_> {
            evs.into_iter()
                .map(|e| (e.serial_number, e.device, e.reason))
                .collect()
        };
        let made_events = events(&made);
        let colors: Vec<_> = made_events
            .iter()
            .map(|e| e.device.as_ref().and_then(|d| d.color.clone()).unwrap())
            .collect();
        let want = [
            "red", "teal", "blue", "gold", "grey", "green", "white", "black",
        ];
        assert_eq!(colors, want);
        assert_eq!(devices(made_events), devices(events(&looked_up)));
        let named: i64 = made
            .conn()
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM devices d JOIN events e ON e.id = d.snapshot_event_id
                  WHERE e.serial_number = d.serial_number AND e.kind = 'added'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        // A too: its row changed later, and the modifying event keeps what the row was.
        assert_eq!(named, 6, "A, B, C, D, E and F name their added events");
    }

    #[test]
    fn a_refetch_page_read_by_id_range_matches_its_rows_by_token_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        let serials: Vec<String> = (0..150).map(|i| format!("S{i:03}")).collect();
        let recs = |range: std::ops::Range<usize>, color: &str| -> Vec<DeviceRecord> {
            range.map(|i| rec(&serials[i], None, None, color)).collect()
        };
        // acme's first 80 devices, then another token with the same serials (its rows sit
        // between acme's), then acme's other 70.
        let (a1, other, a2) = (
            recs(0..80, "red"),
            recs(0..80, "blue"),
            recs(80..150, "red"),
        );
        s.apply_page(&page(&a1, Phase::Fetch, "c1", 1, false))
            .unwrap();
        s.apply_page(&PageWrite {
            token: "other",
            ..page(&other, Phase::Fetch, "o1", 1, true)
        })
        .unwrap();
        s.apply_page(&page(&a2, Phase::Fetch, "c2", 1, true))
            .unwrap();
        // S030 is deleted by a sync: a deleted row inside the range.
        let del = [rec(
            "S030",
            Some(OpType::Deleted),
            Some("2026-01-01T00:00:00Z"),
            "red",
        )];
        let st = s
            .apply_page(&page(&del, Phase::Sync, "c3", 1, false))
            .unwrap();
        assert_eq!(st.deleted, 1);
        // A re-fetch in one page: the first and last records are acme's first and last
        // rows, so the page is read by id range — a range that also holds the other
        // token's rows with the same serials. S010 changed, S020 is gone, S030 is back,
        // S999 is new.
        let mut again: Vec<DeviceRecord> = recs(0..150, "red")
            .into_iter()
            .filter(|r| r.device.serial_number != "S020")
            .collect();
        again[10].device.color = Some("gold".into());
        again.insert(75, rec("S999", None, None, "red"));
        {
            let tx = s.conn_mut().unwrap().transaction().unwrap();
            // The rows of acme's first and last serials: ids 1 and 230.
            assert_eq!(
                devices::id_range(&tx, "acme", &again).unwrap(),
                Some((1, 230))
            );
        }
        let st = s
            .apply_page(&page(&again, Phase::Fetch, "c4", 2, true))
            .unwrap();
        assert_eq!(
            (st.added, st.modified, st.deleted, st.unchanged),
            (2, 1, 1, 147)
        );
        let color = |token: &str, serial: &str| {
            s.devices(&DeviceFilter {
                token: Some(token.into()),
                serial: Some(serial.into()),
                ..Default::default()
            })
            .unwrap()
            .first()
            .and_then(|d| d.device.color.clone())
        };
        assert_eq!(color("acme", "S010").as_deref(), Some("gold"));
        assert_eq!(color("acme", "S020"), None);
        assert_eq!(color("acme", "S999").as_deref(), Some("red"));
        assert_eq!(color("acme", "S030").as_deref(), Some("red"));
        assert_eq!(color("other", "S010").as_deref(), Some("blue"));
        assert_eq!(s.device_counts("acme").unwrap(), (150, 1));
        assert_eq!(s.device_counts("other").unwrap(), (80, 0));
        // Nothing of the other token was taken for acme's: no event names it.
        let evs = s.events_after(0, None, 1000).unwrap();
        assert_eq!(evs.iter().filter(|e| e.token_name == "other").count(), 80);
    }

    #[test]
    fn devices_are_read_in_chunks_in_key_order_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        let recs: Vec<DeviceRecord> = (0..12_001)
            .map(|i| rec(&format!("S{:06}", (i * 7919) % 12_001), None, None, "red"))
            .collect();
        s.apply_page(&page(&recs, Phase::Fetch, "c1", 1, true))
            .unwrap();
        let mut serials = Vec::new();
        s.for_each_device(&DeviceFilter::default(), |d| {
            serials.push(d.device.serial_number);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert_eq!(serials.len(), 12_001);
        assert!(serials.windows(2).all(|w| w[0] < w[1]));
        let limited = s
            .devices(&DeviceFilter {
                limit: Some(10_001),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(limited.len(), 10_001);
        assert_eq!(limited[10_000].device.serial_number, serials[10_000]);
    }

    #[test]
    fn a_mirror_from_schema_5_opens_and_its_rows_get_digests_on_the_next_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        database_at(
            &path,
            5,
            r#"INSERT INTO devices (token_name, serial_number, model, color, first_seen_at, updated_at)
                   VALUES ('acme', 'A', 'iPad', 'red', 'x', 'x'), ('acme', 'B', 'iPad', 'blue', 'x', 'x');
                   INSERT INTO events (token_name, serial_number, kind, changes, occurred_at, device_json)
                   VALUES ('acme', 'A', 'added', NULL, 'x', '["A","iPad",null,"red",null,null,null,null,null,null,null,null,null,null]'),
                          ('acme', 'B', 'added', NULL, 'x', '["B","iPad",null,"blue",null,null,null,null,null,null,null,null,null,null]');"#,
        );
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        // The same devices again (A unchanged, B changed): compared field by field, one
        // event, and both rows now carry a digest.
        let p = [rec("A", None, None, "red"), rec("B", None, None, "gold")];
        let st = s
            .apply_page(&page(&p, Phase::Fetch, "c1", 1, true))
            .unwrap();
        assert_eq!((st.unchanged, st.modified, st.events()), (1, 1, 1));
        let hashed: i64 = s
            .conn()
            .unwrap()
            .query_row(
                "SELECT count(*) FROM devices WHERE content_hash IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(hashed, 2);
        // Old events keep their own snapshots.
        let colors: Vec<Option<String>> = event_snapshots(&s).into_iter().map(|e| e.1).collect();
        assert_eq!(
            colors,
            ["red", "blue", "gold"].map(|c| Some(c.to_owned())).to_vec()
        );
        // And the next fetch recognises both from the digest alone.
        let st = s
            .apply_page(&page(&p, Phase::Fetch, "c2", 2, true))
            .unwrap();
        assert_eq!((st.unchanged, st.events()), (2, 0));
    }

    #[test]
    fn a_mirror_from_schema_6_drops_devices_alive_and_counts_and_reconciles_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        database_at(
            &path,
            6,
            r#"INSERT INTO devices (token_name, serial_number, model, first_seen_at, updated_at, deleted_at)
                   VALUES ('acme', 'A', 'iPad', 'x', 'x', NULL), ('acme', 'B', 'iPad', 'x', 'x', 'y'),
                          ('acme', 'C', 'iPad', 'x', 'x', NULL), ('other', 'A', 'iPad', 'x', 'x', 'y');"#,
        );
        let mut s = Store::open(&path).unwrap();
        let indexes: Vec<String> = s
            .conn()
            .unwrap()
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'devices' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!indexes.contains(&"devices_alive".to_owned()));
        assert!(indexes.contains(&"devices_gone".to_owned()));
        assert_eq!(s.device_counts("acme").unwrap(), (2, 1));
        assert_eq!(s.device_counts("other").unwrap(), (0, 1));
        // A complete fetch without C deletes C, and only C (B already is).
        let p = [rec("A", None, None, "red")];
        let st = s
            .apply_page(&page(&p, Phase::Fetch, "c1", 1, true))
            .unwrap();
        assert_eq!((st.deleted, st.modified), (1, 1));
        assert_eq!(s.device_counts("acme").unwrap(), (1, 2));
        let by_status = s.profile_status_counts().unwrap();
        assert_eq!(by_status, vec![("acme".into(), "unknown".into(), 1)]);
    }

    #[test]
    fn a_mirror_from_schema_7_finds_a_devices_history_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        // A's first event keeps its own snapshot (as before schema 6), B's `added` defers
        // to its row, then A is modified and C (of another token) added.
        database_at(
            &path,
            7,
            r#"INSERT INTO devices (token_name, serial_number, model, first_seen_at, updated_at, snapshot_event_id)
                   VALUES ('acme', 'A', 'iPad', 'x', 'x', NULL), ('acme', 'B', 'iPad', 'x', 'x', 2),
                          ('zeta', 'B', 'iPad', 'x', 'x', 4);
               INSERT INTO events (id, token_name, serial_number, kind, occurred_at, device_json)
                   VALUES (1, 'acme', 'A', 'added', 'x', '["A","iPad"]'),
                          (2, 'acme', 'B', 'added', 'x', ''),
                          (3, 'acme', 'A', 'modified', 'x', '["A","iPad"]'),
                          (4, 'zeta', 'B', 'added', 'x', '');"#,
        );
        let s = Store::open(&path).unwrap();
        let ids = |token: Option<&str>, serial: &str, after: i64| -> Vec<i64> {
            s.events_of(after, token, Some(serial), 100)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect()
        };
        // (Only ids are compared: these snapshots are not in the stored form.)
        assert_eq!(ids(None, "A", 0), [1, 3]);
        assert_eq!(ids(None, "A", 1), [3]);
        assert_eq!(ids(None, "B", 0), [2, 4], "both tokens' rows name one");
        assert_eq!(ids(None, "B", 2), [4]);
        assert_eq!(ids(Some("zeta"), "B", 0), [4]);
        assert!(ids(None, "Z", 0).is_empty());
        // The statement `events_of` runs finds them by index, never reading every event.
        let plan: Vec<String> = s
            .conn()
            .unwrap()
            .prepare(&format!(
                "EXPLAIN QUERY PLAN {}",
                super::events::events_sql(true)
            ))
            .unwrap()
            .query_map(rusqlite::params![0, None::<String>, 100, "A"], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let has = |step: &str| plan.iter().any(|p| p == step);
        assert!(
            has("SEARCH e USING INTEGER PRIMARY KEY (rowid=?)"),
            "{plan:?}"
        );
        assert!(
            has("SEARCH events USING INDEX events_serial (serial_number=? AND rowid>?)"),
            "{plan:?}"
        );
        assert!(
            has("SEARCH devices USING INDEX sqlite_autoindex_devices_1 (token_name=? AND serial_number=?)"),
            "{plan:?}"
        );
        assert!(
            !plan
                .iter()
                .any(|p| p.starts_with("SCAN e") || p.starts_with("SCAN devices")),
            "{plan:?}"
        );
    }

    /// A deferred `added` event whose kept snapshot was pruned (the clock went back, so the
    /// later event was older) is still in its device's history once the device returns
    /// and the row names another event.
    #[test]
    fn a_device_history_keeps_an_added_event_whose_kept_snapshot_was_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        let at = |records, kind, cursor, now| {
            let mut p = page(records, kind, cursor, 1, kind == Phase::Fetch);
            p.now = now;
            p
        };
        let added = [rec("A", None, None, "red")];
        s.apply_page(&at(&added, Phase::Fetch, "c1", "2026-03-02T00:00:00.000Z"))
            .unwrap();
        let modified = [rec(
            "A",
            Some(OpType::Modified),
            Some("2026-03-01T00:00:01Z"),
            "blue",
        )];
        s.apply_page(&at(
            &modified,
            Phase::Sync,
            "c2",
            "2026-03-01T00:00:00.000Z",
        ))
        .unwrap();
        assert_eq!(s.prune_events(2, "2026-03-01T12:00:00.000Z").unwrap(), 1);
        let deleted = [rec(
            "A",
            Some(OpType::Deleted),
            Some("2026-03-01T00:00:02Z"),
            "blue",
        )];
        s.apply_page(&at(&deleted, Phase::Sync, "c3", "2026-03-03T00:00:00.000Z"))
            .unwrap();
        let back = [rec(
            "A",
            Some(OpType::Added),
            Some("2026-03-01T00:00:03Z"),
            "green",
        )];
        s.apply_page(&at(&back, Phase::Sync, "c4", "2026-03-04T00:00:00.000Z"))
            .unwrap();
        let all = s.events_after(0, None, 100).unwrap();
        let ids: Vec<i64> = all.iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 3, 4]);
        assert!(all[0].device.is_none(), "its snapshot is gone, as before");
        let history: Vec<i64> = s
            .events_of(0, None, Some("A"), 100)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(history, ids);
    }

    #[test]
    fn a_completed_fetch_reconciles_devices_it_did_not_return() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
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
        assert_eq!(s.device_counts("acme").unwrap(), (2, 1));
        // The next complete fetch does not return B either: B is already deleted, so
        // nothing happens to it again.
        let both = [rec("A", None, None, "r"), rec("C", None, None, "r")];
        let st = s
            .apply_page(&page(&both, Phase::Fetch, "g1", 3, true))
            .unwrap();
        assert_eq!(st.events(), 0);
        assert_eq!(s.device_counts("acme").unwrap(), (2, 1));
    }

    #[test]
    fn a_device_whose_record_could_not_be_read_is_not_reconciled_away() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
        let all = [rec("A", None, None, "r"), rec("B", None, None, "r")];
        s.apply_page(&page(&all, Phase::Fetch, "c1", 1, true))
            .unwrap();
        // Re-fetch: B's record arrives but cannot be read (a field of the wrong type).
        let p = [rec("A", None, None, "r")];
        let unreadable = ["B".to_owned()];
        let st = s
            .apply_page(&PageWrite {
                unreadable: &unreadable,
                ..page(&p, Phase::Fetch, "f1", 2, true)
            })
            .unwrap();
        assert_eq!(
            st.deleted, 0,
            "B is on the server; only its record was unreadable"
        );
        assert_eq!(s.device_counts("acme").unwrap(), (2, 0));
    }

    #[test]
    fn reconciliation_spans_bitmap_chunks_commits_and_abandoned_fetches() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
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
            .conn()
            .unwrap()
            .query_row("SELECT COUNT(*) FROM fetch_seen", [], |r| r.get(0))
            .unwrap();
        assert_eq!(marks, 0);
    }

    #[test]
    fn extra_fields_round_trip_and_are_diffed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path().join("x.db")).unwrap();
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

    #[test]
    fn migration_4_moves_protocol_10_fields_out_of_extra_json_and_old_events_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        database_at(
            &path,
            3,
            r#"INSERT INTO devices (token_name, serial_number, model, extra_json, first_seen_at, updated_at)
                   VALUES ('t', 'S1', 'iPhone', '{"imei":"35","meid":["1"],"eid":"E","wifi_mac_address":"aa","ethernet_mac_address":"","is_replacement_device":true,"released_by_replacement":false,"mdm_migration_deadline":"2026-01-01","other":1}', 'x', 'x'),
                          ('t', 'S2', 'iPad', '{"imei":["1","2"]}', 'x', 'x'),
                          ('t', 'S3', 'Mac', NULL, 'x', 'x');
                   INSERT INTO events (token_name, serial_number, kind, changes, occurred_at, device_json)
                   VALUES ('t', 'S2', 'added', NULL, '2026-01-01T00:00:00.000Z',
                           '["S2","iPad",null,null,null,null,null,null,null,null,null,null,null,"{\"imei\":[\"1\",\"2\"]}"]');"#,
        );
        let s = Store::open(&path).unwrap();
        let all = s
            .devices(&DeviceFilter {
                deleted: Some(false),
                ..DeviceFilter::default()
            })
            .unwrap();
        let extra = |serial: &str| {
            serde_json::Value::Object(
                all.iter()
                    .find(|d| d.device.serial_number == serial)
                    .unwrap()
                    .device
                    .extra
                    .clone(),
            )
        };
        assert_eq!(
            extra("S1"),
            serde_json::json!({"imei": ["35"], "meid": ["1"], "eid": "E", "wifi_mac_address": ["aa"],
                "ethernet_mac_address": "", "is_replacement_device": true,
                "released_by_replacement": false, "mdm_migration_deadline": "2026-01-01", "other": 1})
        );
        assert_eq!(extra("S2"), serde_json::json!({"imei": ["1", "2"]}));
        assert_eq!(extra("S3"), serde_json::json!({}));
        let (rest, imei, flag): (Option<String>, Option<String>, Option<i64>) = s
            .conn().unwrap()
            .query_row(
                "SELECT extra_json, imei, is_replacement_device FROM devices WHERE serial_number = 'S1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(rest.as_deref(), Some(r#"{"other":1}"#));
        assert_eq!(imei.as_deref(), Some(r#"["35"]"#));
        assert_eq!(flag, Some(1));
        let only_v10: Option<String> = s
            .conn()
            .unwrap()
            .query_row(
                "SELECT extra_json FROM devices WHERE serial_number = 'S2'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(only_v10, None, "nothing left beyond the columns");
        // An event stored before the columns still reads, with its fields.
        let ev = s.events_after(0, None, 10).unwrap();
        assert_eq!(
            ev[0].device.as_ref().unwrap().extra["imei"],
            serde_json::json!(["1", "2"])
        );
        assert_eq!(crate::events::event_json(&ev[0])["reason"], "assigned");
    }
}
