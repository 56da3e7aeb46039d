//! The SQL behind token management: each token's MDM-server details from `GET /account`
//! and its expiry-warning memory (`accounts`), and forgetting a token.
//!
//! Key invariant: [`Store::purge_token`] deletes one token's rows from every per-token
//! table in one transaction, and nothing of any other token; sink cursors are left alone
//! because event ids are never reused, so a sink simply never sees the deleted ids again.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{Store, StoreError};

/// A token's stored `accounts` row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredAccount {
    /// The token's configured name.
    pub token_name: String,
    /// MDM server name in ABM/ASM.
    pub server_name: Option<String>,
    /// The server's ID; a token reporting another one belongs to another server.
    pub server_uuid: Option<String>,
    /// Organisation name.
    pub org_name: Option<String>,
    /// Apple's `org_type`: `org` (Apple Business Manager) or `edu` (Apple School Manager).
    pub org_type: Option<String>,
    /// Apple's customer ID of the organisation.
    pub org_id: Option<String>,
    /// The Apple Account that downloaded the token in use.
    pub admin_id: Option<String>,
    /// The largest page size Apple allows for fetch/sync, when `/account` says.
    pub page_limit_max: Option<u32>,
    /// The token's consumer key (`CK_…`, an OAuth identifier, not a secret).
    pub consumer_key: Option<String>,
    /// When `GET /account` last answered (RFC 3339); `None` if it never has.
    pub checked_at: Option<String>,
    /// The token expiry the warning memory below refers to (RFC 3339).
    pub token_expiry: Option<String>,
    /// The last expiry threshold, in days, a warning was logged for.
    pub expiry_warned_days: Option<i64>,
}

/// How many rows one token has in each per-token table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenFootprint {
    /// Rows in `devices` (assigned and deleted).
    pub devices: u64,
    /// Rows in `events`.
    pub events: u64,
    /// Rows in `sync_state` (0 or 1).
    pub sync_state: u64,
    /// Rows in `accounts` (0 or 1).
    pub account: u64,
}

impl TokenFootprint {
    /// Whether the token has no rows at all.
    pub fn is_empty(&self) -> bool {
        *self == TokenFootprint::default()
    }
}

const ACCOUNT_COLUMNS: &str = "token_name, server_name, server_uuid, org_name, org_type, \
    org_id, admin_id, page_limit_max, consumer_key, checked_at, token_expiry, expiry_warned_days";

fn account_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredAccount> {
    Ok(StoredAccount {
        token_name: r.get(0)?,
        server_name: r.get(1)?,
        server_uuid: r.get(2)?,
        org_name: r.get(3)?,
        org_type: r.get(4)?,
        org_id: r.get(5)?,
        admin_id: r.get(6)?,
        page_limit_max: r.get(7)?,
        consumer_key: r.get(8)?,
        checked_at: r.get(9)?,
        token_expiry: r.get(10)?,
        expiry_warned_days: r.get(11)?,
    })
}

/// The per-token tables `forget` empties, in deletion order.
pub(super) const TOKEN_TABLES: [&str; 4] = ["events", "devices", "sync_state", "accounts"];

/// The extra condition that keeps a table's rows to a token's own: the events table also
/// holds organisation events, keyed by account name, which are never a token's.
pub(super) fn token_rows_only(table: &str) -> &'static str {
    if table == "events" {
        " AND (scope IS NULL OR scope = 'profile')"
    } else {
        ""
    }
}

impl Store {
    /// The token's `accounts` row, if any.
    pub fn account(&self, token: &str) -> Result<Option<StoredAccount>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.account(token);
        }
        self.conn()?
            .query_row(
                &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE token_name = ?1"),
                [token],
                account_from_row,
            )
            .optional()
            .map_err(self.err("read account"))
    }

    /// Every `accounts` row, by token name.
    pub fn accounts(&self) -> Result<Vec<StoredAccount>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.accounts();
        }
        let mut stmt = self
            .conn()?
            .prepare(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY token_name"
            ))
            .map_err(self.err("read accounts"))?;
        let rows = stmt
            .query_map([], account_from_row)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read accounts"))
    }

    /// Stores what `GET /account` reported (the server, organisation and limits, the
    /// consumer key and `checked_at`); the expiry-warning memory is left as it is.
    pub fn save_account(&mut self, a: &StoredAccount) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.save_account(a);
        }
        self.conn()?
            .execute(
                "INSERT INTO accounts (token_name, server_name, server_uuid, org_name, org_type,
                     org_id, admin_id, page_limit_max, consumer_key, checked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (token_name) DO UPDATE SET
                     server_name = excluded.server_name, server_uuid = COALESCE(excluded.server_uuid, accounts.server_uuid),
                     org_name = excluded.org_name, org_type = excluded.org_type,
                     org_id = excluded.org_id, admin_id = excluded.admin_id,
                     page_limit_max = excluded.page_limit_max,
                     consumer_key = excluded.consumer_key, checked_at = excluded.checked_at",
                params![
                    a.token_name,
                    a.server_name,
                    a.server_uuid,
                    a.org_name,
                    a.org_type,
                    a.org_id,
                    a.admin_id,
                    a.page_limit_max,
                    a.consumer_key,
                    a.checked_at
                ],
            )
            .map(drop)
            .map_err(self.err("store account"))
    }

    /// Remembers which expiry threshold was last warned about for the token expiring at
    /// `expiry` (`None`: none yet).
    pub fn set_expiry_warning(
        &mut self,
        token: &str,
        expiry: &str,
        warned_days: Option<i64>,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.set_expiry_warning(token, expiry, warned_days);
        }
        self.conn()?
            .execute(
                "INSERT INTO accounts (token_name, token_expiry, expiry_warned_days)
                 VALUES (?1, ?2, ?3)
                 ON CONFLICT (token_name) DO UPDATE SET token_expiry = excluded.token_expiry,
                     expiry_warned_days = excluded.expiry_warned_days",
                params![token, expiry, warned_days],
            )
            .map(drop)
            .map_err(self.err("store expiry warning"))
    }

    /// How many rows `token` has in each per-token table.
    pub fn token_footprint(&self, token: &str) -> Result<TokenFootprint, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.token_footprint(token);
        }
        let count = |table: &str| -> Result<u64, StoreError> {
            self.conn()?
                .query_row(
                    &format!(
                        "SELECT COUNT(*) FROM {table} WHERE token_name = ?1{}",
                        token_rows_only(table)
                    ),
                    [token],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n as u64)
                .map_err(self.err("count a token's rows"))
        };
        Ok(TokenFootprint {
            devices: count("devices")?,
            events: count("events")?,
            sync_state: count("sync_state")?,
            account: count("accounts")?,
        })
    }

    /// Deletes every row of `token` — devices, events, sync state, account — in one
    /// transaction, and returns how many of each there were.
    pub fn purge_token(&mut self, token: &str) -> Result<TokenFootprint, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.purge_token(token);
        }
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            action: "forget a token",
            source,
        };
        let tx = self
            .conn_mut()?
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(wrap)?;
        let mut deleted = [0u64; TOKEN_TABLES.len()];
        for (i, table) in TOKEN_TABLES.iter().enumerate() {
            deleted[i] = tx
                .execute(
                    &format!(
                        "DELETE FROM {table} WHERE token_name = ?1{}",
                        token_rows_only(table)
                    ),
                    [token],
                )
                .map_err(wrap)? as u64;
        }
        // A full fetch in progress: which devices it has returned so far; and the token's
        // profile definitions and assignments.
        for table in [
            "fetch_seen",
            "profiles",
            "profile_assignments",
            "assign_state",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE token_name = ?1"),
                [token],
            )
            .map_err(wrap)?;
        }
        tx.commit().map_err(wrap)?;
        Ok(TokenFootprint {
            events: deleted[0],
            devices: deleted[1],
            sync_state: deleted[2],
            account: deleted[3],
        })
    }

    /// Every token name that has rows in any per-token table, sorted.
    pub fn stored_token_names(&self) -> Result<Vec<String>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.stored_token_names();
        }
        let sql = TOKEN_TABLES
            .iter()
            .map(|t| format!("SELECT DISTINCT token_name FROM {t}"))
            .collect::<Vec<_>>()
            .join(" UNION ")
            + " ORDER BY 1";
        let mut stmt = self
            .conn()?
            .prepare(&sql)
            .map_err(self.err("list stored tokens"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("list stored tokens"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceRecord, Phase};
    use crate::store::{CursorState, PageWrite};

    fn store_with(tokens: &[(&str, usize)]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path().join("t.db")).unwrap();
        for (token, n) in tokens {
            let records: Vec<DeviceRecord> = (0..*n)
                .map(|i| {
                    serde_json::from_value(serde_json::json!({
                        "serial_number": format!("SER{i:05}"), "model": "iPad"
                    }))
                    .unwrap()
                })
                .collect();
            store
                .apply_page(&PageWrite {
                    token,
                    kind: Phase::Fetch,
                    records: &records,
                    next: CursorState {
                        phase: Phase::Sync,
                        cursor: Some("c1".into()),
                        fetch_run: 1,
                    },
                    fetched_until: None,
                    completes_fetch: true,
                    now: "2026-01-01T00:00:00.000Z",
                    unreadable: &[],
                    expect_new: false,
                    prepared: None,
                })
                .unwrap();
            store
                .save_account(&StoredAccount {
                    token_name: token.to_string(),
                    server_uuid: Some(format!("UUID-{token}")),
                    ..Default::default()
                })
                .unwrap();
        }
        (dir, store)
    }

    #[test]
    fn purge_deletes_one_token_and_nothing_of_the_others() {
        let (_dir, mut store) = store_with(&[("acme", 5), ("beta", 3)]);
        let before = store.token_footprint("beta").unwrap();
        assert_eq!(
            store.token_footprint("acme").unwrap(),
            TokenFootprint {
                devices: 5,
                events: 5,
                sync_state: 1,
                account: 1
            }
        );
        let deleted = store.purge_token("acme").unwrap();
        assert_eq!((deleted.devices, deleted.events), (5, 5));
        assert!(store.token_footprint("acme").unwrap().is_empty());
        assert_eq!(store.token_footprint("beta").unwrap(), before);
        assert_eq!(store.stored_token_names().unwrap(), vec!["beta"]);
        assert!(store.account("beta").unwrap().is_some());
        // Forgetting twice is harmless.
        assert!(store.purge_token("acme").unwrap().is_empty());
    }

    #[test]
    fn account_and_expiry_memory_are_stored_independently() {
        let (_dir, mut store) = store_with(&[]);
        store
            .set_expiry_warning("acme", "2027-01-01T00:00:00Z", Some(30))
            .unwrap();
        store
            .save_account(&StoredAccount {
                token_name: "acme".into(),
                server_name: Some("Acme MDM".into()),
                page_limit_max: Some(500),
                ..Default::default()
            })
            .unwrap();
        let a = store.account("acme").unwrap().unwrap();
        assert_eq!(a.server_name.as_deref(), Some("Acme MDM"));
        assert_eq!(a.page_limit_max, Some(500));
        assert_eq!(a.expiry_warned_days, Some(30));
        assert_eq!(a.token_expiry.as_deref(), Some("2027-01-01T00:00:00Z"));
        assert_eq!(store.accounts().unwrap().len(), 1);
    }
}
