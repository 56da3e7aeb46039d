//! The PostgreSQL backend of [`Store`](super::Store): the same operations as the SQLite
//! code beside it, on a server several adesync processes may share.
//!
//! Driven synchronously (the `postgres` crate) from the same blocking threads as rusqlite,
//! so every caller of the store works unchanged whichever backend the config names; a page
//! write is a handful of round trips (arrays bound with `UNNEST`), not one per row.
//!
//! Key invariants, as on SQLite: a page's rows, its events and the cursor after it commit
//! in one transaction. Event ids are taken from `event_ids` by the transaction that
//! inserts the events, just before it commits, and that row stays locked until the commit:
//! two writers can never make a higher id visible before a lower one (see schema.rs).

use postgres::{Client, NoTls};

use super::StoreError;
use crate::config::PgTarget;

mod assign;
mod copy;
mod org;
mod read;
mod schema;
mod write;

pub use copy::CopyReport;
pub(crate) use write::PgBatch;

/// Advisory locks are per database, and one database may hold several mirrors (one per
/// schema): each lock is keyed by (its purpose, a hash of the schema the tables live in).
///
/// The lock held while migrating ("MIGR"), so replicas starting together on an empty
/// database migrate it once.
const MIGRATION_LOCK: i32 = 0x4d49_4752;

/// The lock a replica holds on a token while it syncs it ("TOKN"), keyed by a hash of the
/// schema and the token name. Held by the connection that commits the token's pages, so
/// it is also the fence: a replica that lost its connection lost the lock and can commit
/// nothing more, and the server releases it the moment the connection ends.
const TOKEN_LOCK: i32 = 0x544f_4b4e;

/// The lock a replica holds on a sink while it delivers to it ("SINK"), the same way: one
/// replica at a time delivers each sink, and its cursor moves on the locked connection.
const SINK_LOCK: i32 = 0x5349_4e4b;

/// The lock a replica holds on an organisation account while it walks it ("ORGA"), the
/// same way: one replica at a time walks each account, writing through the locked
/// connection.
const ACCOUNT_LOCK: i32 = 0x4f52_4741;

/// The advisory-lock key of a token, sink or account, as SQL over its name in `$2`.
const NAME_KEY: &str = "hashtext(current_schema() || '/' || $2)";

/// New device rows after which a writer refreshes the planner's statistics of `devices`
/// the first time; each later refresh waits for four times as many. A table filled within
/// one sync was never analysed, and the planner, believing it tiny, would read all of a
/// token's rows to find a page's thousand serials (measured: 40 ms a page at 300,000 rows).
const FIRST_ANALYZE: u64 = 5_000;

/// One connection to the server.
pub(crate) struct Pg {
    /// Always Some until dropped (see the Drop impl).
    client: Option<Client>,
    shown: String,
    /// Device rows this connection inserted since it last refreshed the planner's
    /// statistics, and the count that triggers the next refresh (see `PgBatch::commit`).
    inserted: (u64, u64),
    /// The same for `org_devices` (see `Pg::apply_org_page`).
    pub(super) org_inserted: (u64, u64),
    /// This connection took a token, sink or account (`Pg::own`): it lets go of them
    /// before closing (see the Drop impl).
    owns: bool,
}

/// Lets go of the session's advisory locks, then closes. The server would free them when
/// it notices the closed socket, but that happens after the client has moved on: the next
/// pass of this process could find its own token still held and skip it. No transaction
/// is open here (each is a `postgres::Transaction`, rolled back when dropped); should the
/// query fail anyway, the locks go with the disconnect.
fn close(mut client: Client, owns: bool, released: impl FnOnce()) {
    if owns && !client.is_closed() {
        let _ = client.batch_execute("SELECT pg_advisory_unlock_all()");
    }
    released();
    drop(client);
}

/// How long dropping a connection that took a lock waits for the server to free it (a
/// server gone from the network would otherwise hold the drop for minutes). On an async
/// worker thread (an error or a cancelled pass) this is how long that thread may wait.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Pg {
    fn drop(&mut self) {
        let owns = self.owns;
        let Some(client) = self.client.take() else {
            return;
        };
        if !owns && tokio::runtime::Handle::try_current().is_err() {
            return close(client, owns, || ());
        }
        // The client blocks on a runtime of its own, which tokio forbids on a thread that
        // drives async tasks (and a blocking task cannot be told apart from one here); and
        // letting go of locks waits on the server. Close it on a thread of its own, waiting
        // (at most RELEASE_WAIT) only until its locks are free.
        let (done, freed) = std::sync::mpsc::sync_channel::<()>(1);
        let cell = std::sync::Arc::new(std::sync::Mutex::new(Some(client)));
        let theirs = cell.clone();
        let closing = std::thread::Builder::new()
            .name("pg-close".into())
            .spawn(move || {
                if let Some(c) = theirs.lock().ok().and_then(|mut c| c.take()) {
                    close(c, owns, move || {
                        let _ = done.send(());
                    });
                }
            });
        match closing {
            Ok(_) if owns => {
                let _ = freed.recv_timeout(RELEASE_WAIT);
            }
            Ok(_) => {}
            Err(_) => {
                // No thread to close it on: leave the socket (and the locks) to the
                // process's exit rather than panic here.
                if let Ok(mut c) = cell.lock() {
                    std::mem::forget(c.take());
                }
            }
        }
    }
}

impl Pg {
    /// Connects and brings the schema up to date (under an advisory lock).
    pub(crate) fn open(target: &PgTarget) -> Result<Self, StoreError> {
        let mut pg = Self::connect(target)?;
        pg.migrate()?;
        Ok(pg)
    }

    /// Connects for reading: nothing is created. None when adesync never set the database
    /// up; a database that needs a migration says so.
    pub(crate) fn open_read_only(target: &PgTarget) -> Result<Option<Self>, StoreError> {
        let mut pg = Self::connect(target)?;
        let version = pg.schema_version()?;
        let known = schema::MIGRATIONS.len() as i64;
        if version == 0 {
            return Ok(None);
        }
        if version > known {
            return Err(StoreError::TooNew {
                path: target.shown().into(),
                found: version,
                known,
            });
        }
        if version < known {
            return Err(StoreError::NeedsUpgrade {
                path: target.shown().into(),
            });
        }
        pg.c()
            .batch_execute("SET default_transaction_read_only = on")
            .map_err(pg.err("configure"))?;
        Ok(Some(pg))
    }

    fn connect(target: &PgTarget) -> Result<Self, StoreError> {
        let shown = target.shown().to_owned();
        let (config, tls) =
            target
                .connect_config()
                .map_err(|reason| StoreError::PostgresConfig {
                    url: shown.clone(),
                    reason,
                })?;
        let connected = if tls {
            let connector =
                native_tls::TlsConnector::new().map_err(|e| StoreError::PostgresConfig {
                    url: shown.clone(),
                    reason: format!("cannot set up TLS: {e}"),
                })?;
            config.connect(postgres_native_tls::MakeTlsConnector::new(connector))
        } else {
            config.connect(NoTls)
        };
        let client = connected.map_err(|source| StoreError::Postgres {
            url: shown.clone(),
            action: "connect",
            source,
        })?;
        let mut pg = Pg {
            client: Some(client),
            shown,
            inserted: (0, FIRST_ANALYZE),
            org_inserted: (0, FIRST_ANALYZE),
            owns: false,
        };
        // The server notices a replica that vanished from the network (and frees its
        // tokens) within about 25 s, instead of the system's two hours. Ignored over a
        // unix socket.
        pg.c()
            .batch_execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5;
                 SET tcp_keepalives_count = 3",
            )
            .map_err(pg.err("configure the session"))?;
        Ok(pg)
    }

    /// The connection.
    pub(super) fn c(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("the connection is open until dropped")
    }

    pub(super) fn err(&self, action: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
        let url = self.shown.clone();
        move |source| StoreError::Postgres {
            url,
            action,
            source,
        }
    }

    /// Runs `f` in a transaction of its own, committed when it returns Ok (rolled back
    /// otherwise); an error names `action`.
    pub(super) fn in_tx<T>(
        &mut self,
        action: &'static str,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let err = self.err(action);
        let done = (|| {
            let mut tx = self.c().transaction()?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })();
        done.map_err(err)
    }

    /// Applies the missing migrations, each in its own transaction, under an advisory lock
    /// (a second replica waits, then finds nothing to do).
    fn migrate(&mut self) -> Result<(), StoreError> {
        self.c()
            .execute(
                "SELECT pg_advisory_lock($1, hashtext(current_schema()))",
                &[&MIGRATION_LOCK],
            )
            .map_err(self.err("lock the schema for migration"))?;
        let result = self.migrate_locked();
        let unlocked = self
            .c()
            .execute(
                "SELECT pg_advisory_unlock($1, hashtext(current_schema()))",
                &[&MIGRATION_LOCK],
            )
            .map_err(self.err("unlock the schema"));
        result.and(unlocked.map(drop))
    }

    fn migrate_locked(&mut self) -> Result<(), StoreError> {
        self.check_identity()?;
        if self.schema_version()? == 0 {
            self.c()
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS adesync_schema (
                     version    integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 )",
                )
                .map_err(self.err("create the schema table"))?;
        }
        let version = self.schema_version()?;
        let known = schema::MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: self.shown.clone().into(),
                found: version,
                known,
            });
        }
        for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
            self.in_tx("migrate the schema", |tx| {
                tx.batch_execute(sql)?;
                tx.execute(
                    "INSERT INTO adesync_schema (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .map(drop)
            })?;
        }
        Ok(())
    }

    /// Refuses a database whose `devices` table is another application's.
    fn check_identity(&mut self) -> Result<(), StoreError> {
        let row = self
            .c()
            .query_one(
                "SELECT to_regclass('adesync_schema') IS NOT NULL,
                        to_regclass('devices') IS NOT NULL,
                        (SELECT min(table_name::text) FROM information_schema.tables
                          WHERE table_schema = current_schema())",
                &[],
            )
            .map_err(self.err("read the database"))?;
        let (ours, devices, example): (bool, bool, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        if devices && !ours {
            return Err(StoreError::Foreign {
                path: self.shown.clone().into(),
                example_table: example
                    .map(|t| crate::model::printable(&t).chars().take(64).collect()),
            });
        }
        Ok(())
    }

    /// Migrations applied (0 on an empty database).
    pub(crate) fn schema_version(&mut self) -> Result<i64, StoreError> {
        let exists: bool = self
            .c()
            .query_one("SELECT to_regclass('adesync_schema') IS NOT NULL", &[])
            .map_err(self.err("read schema version"))?
            .get(0);
        if !exists {
            return Ok(0);
        }
        Ok(self
            .c()
            .query_one(
                "SELECT COALESCE(max(version), 0)::bigint FROM adesync_schema",
                &[],
            )
            .map_err(self.err("read schema version"))?
            .get(0))
    }

    /// Takes the token for this connection (see [`TOKEN_LOCK`]) without waiting: None
    /// when taken (or already held by this connection), else who holds it.
    pub(crate) fn own_token(&mut self, token: &str) -> Result<Option<String>, StoreError> {
        self.own(TOKEN_LOCK, token)
    }

    /// Takes the organisation account for this connection, as [`Pg::own_token`] does a
    /// token.
    pub(crate) fn own_account(&mut self, account: &str) -> Result<Option<String>, StoreError> {
        self.own(ACCOUNT_LOCK, account)
    }

    /// Which connection holds each of `accounts` that is held (see [`Pg::token_holders`]).
    pub(crate) fn account_holders(
        &mut self,
        accounts: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.holders(ACCOUNT_LOCK, accounts)
    }

    /// Takes the sink for this connection, as [`Pg::own_token`] does a token.
    pub(crate) fn own_sink(&mut self, sink: &str) -> Result<Option<String>, StoreError> {
        self.own(SINK_LOCK, sink)
    }

    fn own(&mut self, lock: i32, name: &str) -> Result<Option<String>, StoreError> {
        let taken: bool = self
            .c()
            .query_one(
                &format!("SELECT pg_try_advisory_lock($1, {NAME_KEY})"),
                &[&lock, &name],
            )
            .map_err(self.err("take a lock"))?
            .get(0);
        if taken {
            self.owns = true;
            return Ok(None);
        }
        let holder = self
            .holders(lock, &[name.to_owned()])?
            .pop()
            .map(|(_, h)| h);
        Ok(Some(holder.unwrap_or_else(|| "another adesync".into())))
    }

    /// Which connection holds each of `tokens` that is held: (token, "application_name
    /// at client address, pid N, since T").
    pub(crate) fn token_holders(
        &mut self,
        tokens: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.holders(TOKEN_LOCK, tokens)
    }

    fn holders(
        &mut self,
        lock: i32,
        names: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self
            .c()
            .query(
                "SELECT t, COALESCE(NULLIF(a.application_name, ''), 'adesync')
                           || ' at ' || COALESCE(host(a.client_addr), 'local socket')
                           || ', pid ' || COALESCE(l.pid::text, '?') || COALESCE(', since '
                           || to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '')
                   FROM unnest($2::text[]) AS t
                   JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                        AND l.classid::int8 = $1::int4
                        AND l.objid::int8 = (hashtext(current_schema() || '/' || t)::int8 & 4294967295)
                   LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                  ORDER BY t",
                &[&lock, &names],
            )
            .map_err(self.err("read who syncs each token"))?;
        // A session of another role shows NULLs to a user without pg_read_all_stats.
        Ok(rows
            .iter()
            .map(|r| {
                let who: Option<String> = r.try_get(1).ok().flatten();
                (r.get(0), who.unwrap_or_else(|| "another adesync".into()))
            })
            .collect())
    }

    /// Refreshes the planner's statistics of `table` when `since` new rows reached `next`
    /// (see [`FIRST_ANALYZE`]); returns the counter to keep. Called between transactions,
    /// holding no lock of adesync's: ANALYZE may wait behind a VACUUM, and no other writer
    /// should wait with it. A failure costs speed only.
    pub(super) fn analyze_if_due(&mut self, table: &str, (since, next): (u64, u64)) -> (u64, u64) {
        if since < next {
            return (since, next);
        }
        self.analyze(table);
        (0, next.saturating_mul(4))
    }

    /// Refreshes the planner's statistics of `table` now (between transactions, as above).
    pub(super) fn analyze(&mut self, table: &str) {
        if let Err(e) = self.c().batch_execute(&format!("ANALYZE {table}")) {
            tracing::debug!(error = %e, table, "refreshing the planner's statistics failed");
        }
    }

    /// Opens a write transaction for one or more pages (group commit).
    pub(crate) fn batch(&mut self) -> Result<PgBatch<'_>, StoreError> {
        self.inserted = self.analyze_if_due("devices", self.inserted);
        let err = self.err("begin a write");
        let client = self
            .client
            .as_mut()
            .expect("the connection is open until dropped");
        let tx = client.transaction().map_err(err)?;
        Ok(PgBatch::new(tx, &self.shown, &mut self.inserted))
    }
}

/// Advice for the PostgreSQL errors a person can act on, appended to the message.
pub(super) fn advice(e: &postgres::Error) -> String {
    use postgres::error::SqlState;
    let detail = match e.as_db_error() {
        Some(db) => format!(": {}", crate::model::printable(db.message())),
        None => match std::error::Error::source(e) {
            Some(s) => format!(": {}", crate::model::printable(&s.to_string())),
            None => String::new(),
        },
    };
    let hint = match e.code() {
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            "; check the user in the URL and its password (database_password_file, or PGPASSWORD in the service's environment)"
        }
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
            "; the user lacks a privilege: grant it CREATE on the schema and ownership of adesync's tables (README, \"PostgreSQL\")"
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            "; the database does not exist: create it (createdb -O USER NAME) or fix the URL"
        }
        Some(c) if *c == SqlState::READ_ONLY_SQL_TRANSACTION => {
            "; the server is a read-only standby: point the URL at the primary"
        }
        Some(c) if c.code().starts_with("53") => {
            "; the server is out of a resource (disk, memory or connections): free it, then run again (nothing half-written was kept)"
        }
        None if e.is_closed()
            || e.to_string().starts_with("error connecting")
            || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()) =>
        {
            "; check that the server is running and reachable at the URL's host and port (nothing half-written was kept)"
        }
        _ => "",
    };
    format!("{detail}{hint}")
}
